"""ssmc.compile: spec -> passes -> a target's generated module -> Kernel (ssmc/kernel.py); the in-process and disk
caches of compiled kernels."""
from __future__ import annotations

import collections
import functools
import os
import pathlib
import re
import sys
import threading
import time
import warnings

import jax
import jax.numpy as jnp

from . import __version__
from .cache import DiskCache, cache_key, code_fingerprint
from .errors import SSMCError
from .frontend import parse, parser
from .ir import Program, to_dot
# activation_dtype and decay_inputs lived here before ssmc/kernel.py: still importable from here
from .kernel import _FLOATS, Kernel, activation_dtype, decay_inputs  # noqa: F401
from .semantic import lower
from ssmc.targets.base import ACROSS

# In-process kernel cache: compile's memo, keyed by the lowered IR (without source positions, so specs that differ
# only in comments or layout share a kernel) and the options; least recently used dropped beyond MEMORY_KERNELS.
MEMORY_KERNELS = 64
_MEMORY: "collections.OrderedDict[tuple, Kernel]" = collections.OrderedDict()
_LOCK = threading.Lock()
_SPAN = re.compile(r"  @\d+:\d+(?:-\d+:\d+)?$", re.M)


def clear_cache() -> None:
    """Empty the in-process kernel cache (compile's memo of recent kernels). Kernels you hold stay usable. The disk
    cache is not touched: `ssmc cache clear` (or ssmc.cache.DiskCache().clear()) removes its entries."""
    with _LOCK:
        _MEMORY.clear()


def _read_spec(spec) -> tuple[str, str]:
    """Spec text, or a path to a .ssm file -> (text, filename). A UTF-8 byte order mark (editors on Windows
    save one) is not part of the text."""
    looks_like_path = isinstance(spec, str) and "{" not in spec and "\n" not in spec and (
        spec.strip().endswith(".ssm") or os.path.exists(spec))
    if isinstance(spec, (pathlib.Path, os.PathLike)) or looks_like_path:
        path = pathlib.Path(spec)
        try:
            return path.read_text(encoding="utf-8-sig"), str(path)
        except OSError as e:
            raise SSMCError(f"cannot read spec file '{path}': {e.strerror}") from None
    if not isinstance(spec, str):
        raise SSMCError(f"spec must be text or a path to a .ssm file, got {type(spec).__name__}")
    return spec.removeprefix("\ufeff"), "<spec>"


def check(spec) -> Program:
    """Parse and check a spec; returns its step IR or raises SpecError with line:column and a caret."""
    text, filename = _read_spec(spec)
    return lower(parse(text, filename))


def compile(spec, target: str = "xla", chunk_size: int | None = None, dump: bool | str = False,
            cache: bool = True, matmul: str = "auto", interpret: bool = False, out_dtype=None,
            segments: int | None = None, backward_matmul: str = "auto") -> "Kernel":
    """Compile a spec (text or .ssm path) for a target ("xla", "triton"/"gpu", "tpu"/"pallas_tpu", "auto").

    Precision follows the activations: the narrowest floating dtype among the inputs (bf16 x, B, C next to fp32
    A, D, dt_bias -> bf16) is the matmul operand dtype and the outs' dtype; elementwise math, accumulation and
    states stay fp32 (see `activation_dtype`).
    matmul: "auto" feeds bfloat16/float16 activations to the matmuls at their own precision (fp32 accumulation,
    as the hand-written kernels do) and float32 at full precision; "float32" always uses full precision.
    out_dtype: the outs' dtype (default: the activations' dtype); states are float32 (float64 on float64 inputs).
    interpret: kernel targets only (triton, tpu): run the generated kernels in their CPU interpreter.
    segments: kernel targets, chunked forms: split the sequence into this many segments (1: one walk); None picks
    per call from the sizes and the device (targets/kernel_runtime.pick_segments).
    backward_matmul: the derived backward kernels' matmul operands (kernel targets under jax.grad), as `matmul`:
    "auto" (default) the activations' dtype (bf16 dots for bf16 activations, as the forward's), "float32" full
    precision (fp32 operands, several times slower on tensor cores). The decays' gradient is summed per chunk from
    terms that never cancel (passes/adjoint.py), so bf16 dots keep it as accurate as the hand-written kernels'."""
    from ssmc.targets import get_target

    for opt, v in (("matmul", matmul), ("backward_matmul", backward_matmul)):
        if v not in ("auto", "float32"):
            raise SSMCError(f"{opt} must be 'auto' or 'float32', got {v!r}")
    out_dtype = _out_dtype_option(out_dtype)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise SSMCError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    text, filename = _read_spec(spec)
    tgt = get_target(target)
    if interpret and not tgt.kernels:
        raise SSMCError(f"interpret=True applies to the kernel targets (triton, tpu); target '{tgt.name}' runs "
                        f"through XLA on any backend")
    tgt.prepare(bool(interpret))
    dump_dir = _dump_dir(dump)
    t0 = time.perf_counter()
    parser(disk_cache=cache)  # built once per process; with cache=True its tables come from the disk cache
    program = lower(parse(text, filename))
    pipeline = tgt.pipeline(chunk_size)
    ir = program.text()
    if segments is not None and (not isinstance(segments, int) or segments < 1 or not tgt.kernels):
        raise SSMCError(f"segments must be None or a positive int, for the kernel targets (triton, tpu); got "
                        f"{segments!r} for target '{tgt.name}'")
    # SSMC_AUTOSCHEDULE decides whether compile attaches a measured schedule (ssmc/autoschedule.py): part of the key
    mkey = (_SPAN.sub("", ir), tgt.name, pipeline, matmul, bool(interpret), str(out_dtype), segments,
            os.environ.get("SSMC_AUTOSCHEDULE", "1") != "0", backward_matmul)
    hit = _memo_get(mkey) if cache and dump_dir is None else None
    if hit is not None:
        _warn_unused_chunk_size(hit, chunk_size)
        _warn_unused_segments(hit, segments)
        return hit
    k = _build(program, tgt, pipeline, matmul, interpret, out_dtype, cache, dump_dir is None, t0)
    k.backward_matmul = backward_matmul
    if segments is not None:
        k._opts["segments"] = segments
    from .autoschedule import attach
    attach(k, text, chunk_size, cache)  # CPU default: the faster of chunked / sequential per shape bucket
    if dump_dir is not None:
        k.dump(dump_dir)
    if cache:
        _memo_put(mkey, k)
    _warn_unused_chunk_size(k, chunk_size)
    _warn_unused_segments(k, segments)
    return k


def _build(program, tgt, pipeline: str, matmul: str, interpret: bool, out_dtype, cache: bool, use_disk: bool,
           t0: float) -> "Kernel":
    """Run the pipeline on a lowered program and emit it for a target (or read both from the disk cache)."""
    from ssmc.passes import parse_pipeline, run_pipeline
    from ssmc.targets import ENTRY_CONTRACT

    ir = program.text()
    key = cache_key(ir=ir, target=tgt.name, options=pipeline, version=__version__, contract=ENTRY_CONTRACT,
                    compiler=_compiler_fingerprint(), jax=jax.__version__)
    disk = DiskCache() if cache else None
    entry = disk.get(key) if disk is not None and use_disk else None
    from_disk = entry is not None and _valid_entry(entry)
    level = _debug_level()
    if not from_disk:
        trace = (lambda name, prog: _log(f"-- IR after {name}\n{prog.text()}")) if level >= 3 else None
        final, texts = run_pipeline(program, parse_pipeline(pipeline), trace)
        final = tgt.annotate(final)  # the target's notes (the kernel targets' schedule)
        source = tgt.emit(final, pipeline)
        entry = {"source": source, "ir": final.text(), "passes": [list(x) for x in texts],
                 "dot": to_dot(final)}
        if disk is not None:
            disk.put(key, entry)
    k = Kernel(program, tgt, pipeline, entry, program.filename, from_disk, time.perf_counter() - t0, matmul,
               bool(interpret), out_dtype, compiler=compile, program_compiler=compile_program)
    if level >= 1:
        _log(f"ssmc: compiled {k.name} for {k.target} in {k.compile_seconds * 1e3:.1f} ms "
             f"({'disk cache' if from_disk else 'passes ran'}); pipeline {pipeline}")
    if level == 2:
        _log(k.ir)
    if level >= 4:
        _log(k.source)
    return k


def compile_program(program, target: str, pipeline: str, matmul: str = "auto", interpret: bool = False,
                    out_dtype=None, cache: bool = True) -> "Kernel":
    """A program built by a pass rather than parsed (the derived backward's, passes/adjoint.py) through the
    target's pipeline `pipeline` and emitter; memoized like compile."""
    from ssmc.targets import get_target

    tgt = get_target(target)
    tgt.prepare(bool(interpret))
    out_dtype = _out_dtype_option(out_dtype)
    mkey = ("program", _SPAN.sub("", program.text()), tgt.name, pipeline, matmul, bool(interpret), str(out_dtype))
    hit = _memo_get(mkey) if cache else None
    if hit is not None:
        return hit
    k = _build(program, tgt, pipeline, matmul, interpret, out_dtype, cache, True, time.perf_counter())
    if cache:
        _memo_put(mkey, k)
    return k


def _memo_get(mkey):
    """The in-process kernel memo (an LRU of MEMORY_KERNELS kernels): the kernel under mkey, now most recent."""
    with _LOCK:
        hit = _MEMORY.get(mkey)
        if hit is not None:
            _MEMORY.move_to_end(mkey)
    return hit


def _memo_put(mkey, k) -> None:
    with _LOCK:
        _MEMORY[mkey] = k
        _MEMORY.move_to_end(mkey)
        while len(_MEMORY) > MEMORY_KERNELS:
            _MEMORY.popitem(last=False)


def _warn_unused_chunk_size(k: "Kernel", chunk_size) -> None:
    """chunk_size given for a spec that has no chunked form: say so (a warning, not an error, so that code passing
    one chunk_size to every spec keeps working); the IR's chunk note says it too."""
    m = re.search(r"# chunk: sequential scan, not chunkable[^:]*: (.*)", k.ir)
    if chunk_size is not None and chunk_size > 1 and m:
        warnings.warn(f"ssmc.compile: chunk_size={chunk_size} is ignored for '{k.name}': it is not chunkable and runs "
                      f"as a sequential scan ({m.group(1)})", UserWarning, stacklevel=3)


def _warn_unused_segments(k: "Kernel", segments) -> None:
    """segments=N for a kernel whose schedule has no segments (a sequential form): say it is ignored. The entries
    with segment kernels are the ones that also take `across` (targets/base.py)."""
    if segments is not None and segments > 1 and ACROSS not in k._info.options:
        warnings.warn(f"ssmc.compile: segments={segments} is ignored for '{k.name}' on {k.target}: its kernel "
                      f"schedule has no segments (the sequential form walks every step in order; see k.ir)",
                      UserWarning, stacklevel=3)


def _out_dtype_option(out_dtype):
    if out_dtype is None:
        return None
    try:
        dt = jnp.dtype(out_dtype)
    except TypeError:
        dt = None
    if dt is None or dt not in _FLOATS:
        raise SSMCError(f"out_dtype must be None or one of {', '.join(map(str, _FLOATS))}, got {out_dtype!r}")
    return dt


def _debug_level() -> int:
    """SSMC_DEBUG: 1 = one line per compile, 2 = + final IR, 3 = + IR after every pass, 4 = + generated source."""
    try:
        return int(os.environ.get("SSMC_DEBUG", "0") or 0)
    except ValueError:
        return 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


@functools.cache
def _compiler_fingerprint() -> str:
    return code_fingerprint()


def _valid_entry(e) -> bool:
    return isinstance(e.get("source"), str) and isinstance(e.get("ir"), str) and isinstance(e.get("passes"), list) \
        and isinstance(e.get("dot"), str)


def _dump_dir(dump) -> pathlib.Path | None:
    env = os.environ.get("SSMC_DUMP_DIR")
    if isinstance(dump, (str, os.PathLike)) and dump:
        return pathlib.Path(dump)
    if dump is True:
        return pathlib.Path(env or "ssmc_dump")
    return pathlib.Path(env) if env else None


