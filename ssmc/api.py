"""ssmc.compile and the Kernel it returns."""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import linecache
import os
import pathlib
import re
import sys
import threading
import time
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from . import __version__
from .cache import DiskCache, cache_key, code_fingerprint
from .errors import ShapeError, SSMCError, TargetError
from .frontend import parse, parser
from .ir import Program, to_dot
from .layout import from_ir, to_ir
from .semantic import lower
from .window import derive_sizes, is_window_dim
from ssmc.passes.expand_groups import split_name, split_order

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
            segments: int | None = None) -> "Kernel":
    """Compile a spec (text or .ssm path) for a target ("xla", "triton"/"gpu", "tpu"/"pallas_tpu", "auto").

    Precision follows the activations: the narrowest floating dtype among the inputs (bf16 x, B, C next to fp32
    A, D, dt_bias -> bf16) is the matmul operand dtype and the outs' dtype; elementwise math, accumulation and
    states stay fp32 (see `activation_dtype`).
    matmul: "auto" feeds bfloat16/float16 activations to the matmuls at their own precision (fp32 accumulation,
    as the hand-written kernels do) and float32 at full precision; "float32" always uses full precision.
    out_dtype: the outs' dtype (default: the activations' dtype); states are float32 (float64 on float64 inputs).
    interpret: kernel targets only (triton, tpu): run the generated kernels in their CPU interpreter.
    segments: kernel targets, chunked forms: split the sequence into this many segments (1: one walk); None picks
    per call from the sizes and the device (targets/kernel_runtime.pick_segments)."""
    from ssmc.passes import parse_pipeline, run_pipeline
    from ssmc.targets import get_target

    if matmul not in ("auto", "float32"):
        raise SSMCError(f"matmul must be 'auto' or 'float32', got {matmul!r}")
    out_dtype = _out_dtype_option(out_dtype)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise SSMCError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    text, filename = _read_spec(spec)
    tgt = get_target(target)
    if interpret and not getattr(tgt, "kernels", False):
        raise SSMCError(f"interpret=True applies to the kernel targets (triton, tpu); target '{tgt.name}' runs "
                        f"through XLA on any backend")
    if hasattr(tgt, "prepare"):
        tgt.prepare(bool(interpret))
    dump_dir = _dump_dir(dump)
    t0 = time.perf_counter()
    parser(disk_cache=cache)  # built once per process; with cache=True its tables come from the disk cache
    program = lower(parse(text, filename))
    pipeline = tgt.pipeline(chunk_size)
    ir = program.text()
    if segments is not None and (not isinstance(segments, int) or segments < 1 or not getattr(tgt, "kernels", False)):
        raise SSMCError(f"segments must be None or a positive int, for the kernel targets (triton, tpu); got "
                        f"{segments!r} for target '{tgt.name}'")
    mkey = (_SPAN.sub("", ir), tgt.name, pipeline, matmul, bool(interpret), str(out_dtype), segments)
    if cache and dump_dir is None:
        with _LOCK:
            hit = _MEMORY.get(mkey)
            if hit is not None:
                _MEMORY.move_to_end(mkey)
        if hit is not None:
            _warn_unused_chunk_size(hit, chunk_size)
            return hit
    key = cache_key(ir=ir, target=tgt.name, options=pipeline, version=__version__,
                    compiler=_compiler_fingerprint(), jax=jax.__version__)
    disk = DiskCache() if cache else None
    entry = disk.get(key) if disk is not None and dump_dir is None else None
    from_disk = entry is not None and _valid_entry(entry)
    level = _debug_level()
    if not from_disk:
        trace = (lambda name, prog: _log(f"-- IR after {name}\n{prog.text()}")) if level >= 3 else None
        final, texts = run_pipeline(program, parse_pipeline(pipeline), trace)
        final = tgt.annotate(final) if getattr(tgt, "kernels", False) else final  # the kernel schedule's note
        source = tgt.emit(final, pipeline)
        entry = {"source": source, "ir": final.text(), "passes": [list(x) for x in texts],
                 "dot": to_dot(final)}
        if disk is not None:
            disk.put(key, entry)
    k = Kernel(program, tgt.name, pipeline, entry, filename, from_disk, time.perf_counter() - t0, matmul,
               bool(interpret), out_dtype)
    if level >= 1:
        _log(f"ssmc: compiled {k.name} for {k.target} in {k.compile_seconds * 1e3:.1f} ms "
             f"({'disk cache' if from_disk else 'passes ran'}); pipeline {pipeline}")
    if level == 2:
        _log(k.ir)
    if level >= 4:
        _log(k.source)
    if segments is not None:
        k._opts["segments"] = segments
    from .autoschedule import attach
    attach(k, text, chunk_size, cache)  # CPU default: the faster of chunked / sequential per shape bucket
    if dump_dir is not None:
        k.dump(dump_dir)
    if cache:
        with _LOCK:
            _MEMORY[mkey] = k
            _MEMORY.move_to_end(mkey)
            while len(_MEMORY) > MEMORY_KERNELS:
                _MEMORY.popitem(last=False)
    _warn_unused_chunk_size(k, chunk_size)
    return k


def _warn_unused_chunk_size(k: "Kernel", chunk_size) -> None:
    """chunk_size given for a spec that has no chunked form: say so (a warning, not an error, so that code passing
    one chunk_size to every spec keeps working); the IR's chunk note says it too."""
    m = re.search(r"# chunk: sequential scan, not chunkable[^:]*: (.*)", k.ir)
    if chunk_size is not None and chunk_size > 1 and m:
        warnings.warn(f"ssmc.compile: chunk_size={chunk_size} is ignored for '{k.name}': it is not chunkable and runs "
                      f"as a sequential scan ({m.group(1)})", UserWarning, stacklevel=3)


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


_LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_FLOATS = _LOW + (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


def activation_dtype(who: str, dtypes: dict):
    """The dtype a call computes its contractions and outs in: the narrowest floating dtype among the inputs
    ({input name: dtype}), so fp32 parameters (A, D, dt_bias, norm and conv weights) and fp32 gates never widen
    bf16/fp16 activations. bfloat16 next to float16 has no narrowest: a ShapeError naming both. float64 only when
    every input is float64 (and jax runs with x64; otherwise jax itself takes float64 as float32)."""
    low = {}
    for name, dt in dtypes.items():
        if dt in _LOW:
            low.setdefault(dt, name)
    if len(low) > 1:
        (d1, n1), (d2, n2) = low.items()
        raise ShapeError(f"{who}: input '{n1}' is {d1} but input '{n2}' is {d2}; the activations take one "
                         f"low-precision dtype (the narrowest input dtype): cast them to one of the two")
    if low:
        return next(iter(low))
    if dtypes and all(dt == jnp.float64 for dt in dtypes.values()) and jax.config.jax_enable_x64:
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


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


class Kernel:
    """A compiled spec: call it with the `in` arrays; read .source, .ir, .passes, .target."""

    def __init__(self, program: Program, target: str, pipeline: str, entry: dict, filename: str,
                 from_disk: bool, compile_seconds: float, matmul: str = "auto", interpret: bool = False,
                 out_dtype=None):
        self.program = program
        self.matmul = matmul
        self.out_dtype = out_dtype  # None: the outs take the activations' dtype
        self.interpret = interpret
        # keyword options of the generated function: kernel targets take `interpret`
        self._opts = {"interpret": True} if interpret else {}
        self.target = target
        self.pipeline = pipeline
        self.source: str = entry["source"]
        self.ir: str = entry["ir"]
        self.passes: list[tuple[str, str]] = [tuple(x) for x in entry["passes"]]
        self.dot: str = entry["dot"]
        self.name = program.name
        self.filename = filename
        self.from_disk_cache = from_disk
        self.compile_seconds = compile_seconds
        self.decay_inputs = decay_inputs(program)
        self.inputs = [(a.name, a.dims) for a in program.inputs]
        self.states = [(a.name, a.dims) for a in program.states]
        self.outs = [(a.name, a.dims) for a in program.outs]
        mod = types.ModuleType(f"ssmc_generated_{program.name}")
        # unique per source: the file name keys linecache, where Triton reads its kernels' source back
        mod.__file__ = f"<ssmc {target} {program.name} {hashlib.sha256(self.source.encode()).hexdigest()[:10]}>"
        # registered like a file, so tracebacks show the generated lines and Triton can read its kernels' source
        linecache.cache[mod.__file__] = (len(self.source), None, self.source.splitlines(True), mod.__file__)
        try:
            exec(compile_source(self.source, mod.__file__), mod.__dict__)
        except Exception as e:  # a bad cache entry or an emitter bug: say which
            raise SSMCError(f"generated {target} code for '{program.name}' failed to load: {e}") from e
        self._module = mod
        self._fn = getattr(mod, mod.ENTRY)  # the generated function (its name is the spec's, made unique)
        self._params = mod.PARAMS       # (py name, array/state name, kind, IR dims)
        self._returns = mod.RETURNS     # (kind, name, IR dims)
        self._splits = {h: (g, split_name(h)) for g, h in program.groups
                        if any(split_name(h) in d.split(",") for *_, d in self._params)}
        self._canon = _canon(program.dims, self._splits)
        from ssmc.targets import get_target  # kernel targets take and return arrays as declared (the target
        self._declared = getattr(get_target(target), "declared_layout", False)  # says so, not a module global)
        self._jitted = jax.jit(self._run, static_argnums=(0,))
        self._auto = None  # a measured default schedule (ssmc/autoschedule.py), set by compile

    def __repr__(self):
        extra = " interpret" if self.interpret else ""
        return f"<ssmc.Kernel {self.name} target={self.target}{extra} pipeline='{self.pipeline}'>"

    def graph_dot(self) -> str:
        return self.dot

    def dump(self, directory) -> pathlib.Path:
        d = pathlib.Path(directory) / self.name
        d.mkdir(parents=True, exist_ok=True)
        for k, (name, text) in enumerate(self.passes):
            (d / f"{k:02d}-{name}.ir").write_text(text)
        (d / f"{self.target}.py").write_text(self.source)
        (d / "graph.dot").write_text(self.dot)
        return d

    # ---- calling ------------------------------------------------------------------------------------
    # Inputs are passed by their spec names, which can be any identifier: `self` is positional-only, and a call
    # option (initial_state, initial_states; step's state) is taken for the option only when no input has its
    # name. An input's name always wins; `apply` takes everything by dict and meets no name at all.
    def __call__(self, /, *args, **kwargs):
        """k(x, dt, ...) or k(x=..., dt=...): the `in` arrays positionally (declared order) or by name; set the
        initial states with initial_state=array (one state) or initial_states={name: array}. Returns the outs
        then the final states. Where an input is itself named initial_state(s), use k.apply."""
        names = {n for n, _ in self.inputs}
        opts = {o: kwargs.pop(o) for o in ("initial_state", "initial_states") if o in kwargs and o not in names}
        return self._call(args, kwargs, opts.get("initial_state"), opts.get("initial_states"))

    def apply(self, inputs, initial_states=None):
        """The call with everything in containers (no keyword can meet an input's name): `inputs` a dict {input
        name: array} or a sequence in declared order; `initial_states` None (zeros), a dict {state name: array},
        a sequence in k.states order, or one array when there is one state."""
        if isinstance(inputs, dict):
            args, kwargs = (), dict(inputs)
        elif isinstance(inputs, (list, tuple)):
            args, kwargs = tuple(inputs), {}
        else:
            raise ShapeError(f"{self.name}.apply: inputs must be a dict {{name: array}} or a list in declared "
                             f"order, got {type(inputs).__name__}")
        return self._call(args, kwargs, None, self._states_arg(initial_states, f"{self.name}.apply"))

    def _call(self, args, kwargs, initial_state, initial_states):
        arrays, sizes, act = self._bind(args, kwargs, initial_state, initial_states)
        meta = _Meta(tuple(sorted(sizes.items())), str(act), str(self.out_dtype or act))
        if self._auto is not None:
            return self._auto(meta, arrays)
        return self._jitted(meta, arrays)

    @property
    def schedule(self) -> str:
        """Which form runs (chunked or sequential) and why; on the CPU backend, per shape bucket as measured."""
        from .autoschedule import describe
        return describe(self)

    def _states_arg(self, states, who: str, what: str = "them") -> dict | None:
        """States as a dict, a sequence in k.states order, one array (one state) or None -> a dict or None."""
        if states is None or isinstance(states, dict):
            return states
        names = [s for s, _ in self.states]
        if isinstance(states, (list, tuple)):
            if len(states) != len(names):
                raise ShapeError(f"{who}: got {len(states)} states, expected {len(names)} ({', '.join(names)})")
            return dict(zip(names, states))
        if len(names) != 1:
            raise ShapeError(f"{who}: has {len(names)} states ({', '.join(names)}); pass {what} as a dict "
                             f"{{name: array}} or a sequence in that order")
        return {names[0]: states}

    def step(self, /, *args, **inputs):
        """One decode step from `state` (what a previous call or step returned: a dict {state name: array}, the
        states as a tuple in `k.states` order, a single array when there is one state, or None for zeros).
        Inputs with the scan dim come without it (one token) or with a scan length of 1..8 (multi-token or
        speculative decode); the others (weights) as usual. Returns (outs..., new states...) like the kernel
        call, outs without the scan dim when the inputs came without it. Same numerics as the full call: a
        prefill of t tokens then s steps equals one call on t + s tokens. See ssmc/step.py.
        k.step(state, *inputs, **inputs): `state` is the first positional argument, or the keyword state= when
        no input is named `state`."""
        from .step import step
        if "state" in inputs and "state" not in {n for n, _ in self.inputs}:
            state = inputs.pop("state")
        else:
            state, args = (args[0], args[1:]) if args else (None, ())
        return step(self, state, args, inputs)

    def _run(self, meta: "_Meta", arrays: dict):
        if self._declared:
            return self._run_declared(meta, arrays)
        sizes = dict(meta.sizes)
        for h, (g, inner) in self._splits.items():
            sizes[inner] = sizes[h] // sizes[g]
        base, mm, out_dtype = meta.dtypes(self.matmul)
        call = []
        for py, name, kind, dims in self._params:
            decl = dict(self.inputs + self.states)[name]
            x = arrays.get(name) if kind == "input" else arrays.get("state:" + name)
            if x is None:  # a state without an initial value starts at zero
                x = jnp.zeros(tuple(sizes[d] for d in decl), base)
            # elementwise math in base (fp32); the contractions cast their operands to mm themselves
            call.append(to_ir(jnp.asarray(x, base), decl, _split(dims), self._splits, sizes))
        res = self._fn(*call, mm=mm, **self._opts)
        out = []
        for (kind, name, dims), v in zip(self._returns, res):
            decl = dict(self.outs if kind == "out" else self.states)[name]
            v = from_ir(v, _split(dims), decl, self._splits, sizes, self._canon)
            out.append(v.astype(out_dtype) if kind == "out" else v.astype(base))
        return tuple(out)

    def _run_declared(self, meta: "_Meta", arrays: dict):
        """Kernel targets take the arrays as declared and in their own dtype (the kernel reads bf16 as bf16)."""
        sizes = dict(meta.sizes)
        _, mm, out_dtype = meta.dtypes(self.matmul)
        call = []
        for py, name, kind, dims in self._params:
            x = arrays.get(name) if kind == "input" else arrays.get("state:" + name)
            if x is None:  # a state without an initial value starts at zero
                x = jnp.zeros(tuple(sizes[d] for d in _split(dims)), jnp.float32)
            x = jnp.asarray(x)
            call.append(x.astype(jnp.float32) if kind == "state" or x.dtype == jnp.float64 else x)
        return tuple(self._fn(*call, mm=mm, out_dtype=out_dtype, **self._opts))

    def named_inputs(self, args, kwargs, who: str = "") -> dict:
        """Positional and keyword inputs -> {input name: array}, with errors naming the input."""
        who = who or self.name
        names = [n for n, _ in self.inputs]
        if len(args) > len(names):
            raise ShapeError(f"{who}: takes {len(names)} inputs ({', '.join(names)}), got {len(args)} "
                             f"positional arguments")
        given = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                states = [s for s, _ in self.states]
                hint = "; to set a state use initial_state= / initial_states={...} (or k.apply)" if k in states else ""
                raise ShapeError(f"{who}: unknown input '{k}'; inputs are {', '.join(names)}{hint}")
            if k in given:
                raise ShapeError(f"{who}: input '{k}' given both positionally and by keyword")
            given[k] = v
        return given

    def _bind(self, args, kwargs, initial_state, initial_states):
        names = [n for n, _ in self.inputs]
        given = self.named_inputs(args, kwargs)
        missing = [n for n in names if n not in given]
        if missing:
            raise ShapeError(f"{self.name}: missing input{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                             f"expected {_decls(self.inputs)}")
        states = self._initial(initial_state, initial_states)
        sizes: dict[str, int] = {}
        where: dict[str, str] = {}
        floats = {}
        arrays = {}
        for (name, dims), kind in [(x, "input") for x in self.inputs] + [(x, "state") for x in self.states]:
            x = given.get(name) if kind == "input" else states.get(name)
            if x is None:
                continue
            label = f"input '{name}'" if kind == "input" else f"initial state '{name}'"
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                x = np.asarray(x)
            dt = jnp.dtype(x.dtype)
            if not jnp.issubdtype(dt, jnp.floating):
                raise ShapeError(f"{self.name}: {label} has dtype {dt}; ssmc kernels take float32, bfloat16 or "
                                 f"float16 arrays (float64 on the xla target with jax_enable_x64)")
            if len(x.shape) != len(dims):
                raise ShapeError(f"{self.name}: {label} has rank {len(x.shape)} (shape {tuple(x.shape)}) but is "
                                 f"declared {name}[{','.join(dims)}] (rank {len(dims)})")
            for ax, (d, n) in enumerate(zip(dims, x.shape)):
                if d in sizes and sizes[d] != n:
                    raise ShapeError(f"{self.name}: dim '{d}' is {sizes[d]} in {where[d]} but {n} in {label} "
                                     f"(axis {ax} of {name}[{','.join(dims)}])")
                sizes.setdefault(d, int(n))
                where.setdefault(d, f"{label} (axis {ax})")
            if kind == "input":
                floats[name] = dt
            arrays[name if kind == "input" else "state:" + name] = x
        derive_sizes(self.name, self.program, sizes, where)  # conv windows: size(k) - 1
        for d in self.program.dims:
            if d not in sizes:
                raise ShapeError(f"{self.name}: dim '{d}' appears in no input; pass an initial state to set its size")
        for g, h in self.program.groups:
            if sizes[g] < 1 or sizes[h] % sizes[g]:
                raise ShapeError(f"{self.name}: `group {g} -> {h}` needs dim '{h}' ({sizes[h]}) to be a multiple of "
                                 f"dim '{g}' ({sizes[g]})")
        for d, n in sizes.items():
            if n < 1 and not is_window_dim(d):
                raise ShapeError(f"{self.name}: dim '{d}' has size {n} ({where[d]}); sizes must be >= 1")
        act = activation_dtype(self.name, floats)
        if act == jnp.float64 and self.target != "xla":
            first = next(n for n, dt in floats.items() if dt == jnp.float64)
            raise TargetError(f"{self.name}: input '{first}' is float64 (as are all inputs); the {self.target} "
                              f"kernels compute in float32/bfloat16/float16: cast the inputs to float32, or use "
                              f"target='xla', which computes in float64")
        return arrays, sizes, act

    def _initial(self, initial_state, initial_states) -> dict:
        snames = [s for s, _ in self.states]
        if initial_state is not None and initial_states is not None:
            raise ShapeError(f"{self.name}: pass initial_state or initial_states, not both")
        if initial_state is not None:
            if len(snames) != 1:
                raise ShapeError(f"{self.name}: has {len(snames)} states ({', '.join(snames)}); pass "
                                 f"initial_states={{name: array}} instead of initial_state")
            return {snames[0]: initial_state}
        if initial_states is None:
            return {}
        if not isinstance(initial_states, dict):
            raise ShapeError(f"{self.name}: initial_states must be a dict {{state name: array}}")
        for k in initial_states:
            if k not in snames:
                raise ShapeError(f"{self.name}: unknown state '{k}' in initial_states; states are {', '.join(snames)}")
        return {k: v for k, v in initial_states.items() if v is not None}


@dataclasses.dataclass(frozen=True)
class _Meta:
    sizes: tuple
    act: str   # the activations' dtype (activation_dtype)
    out: str   # the outs' dtype

    def dtypes(self, matmul: str):
        """(base, mm, out): elementwise math and states in base (fp32; fp64 for fp64 activations), matmul
        operands in mm (the activations' bf16/fp16 unless matmul="float32", else full precision in base)."""
        act = jnp.dtype(self.act)
        base = act if act == jnp.float64 else jnp.dtype(jnp.float32)
        mm = act if act in _LOW and matmul == "auto" else base
        return base, mm, jnp.dtype(self.out)


def decay_inputs(program: Program) -> tuple[str, ...]:
    """Names of the `in` arrays the states' decays a_t depend on (to sample stable random inputs, for example)."""
    from ssmc.passes.plan import make_plan
    try:
        plan = make_plan(program)
    except SSMCError:
        return ()
    by = plan.analysis.by
    seen, stack, found = set(), [f for sp in plan.states.values() for f in sp.decay], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        i = by[n]
        if i.op == "input":
            found.append(i.attr("array"))
        stack.extend(i.args)
    return tuple(a.name for a in program.inputs if a.name in found)


def _decls(arrays) -> str:
    return ", ".join(n + "[" + ",".join(d) + "]" for n, d in arrays)


def _split(dims: str) -> list[str]:
    return [d for d in dims.split(",") if d]


def _canon(dims, splits) -> list[str]:
    return list(split_order(dims, {h: g for h, (g, _) in splits.items()}))


def compile_source(source: str, filename: str):
    """Python's built-in compile (this module's `compile` is ssmc's)."""
    import builtins
    return builtins.compile(source, filename, "exec")
