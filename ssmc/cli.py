"""The `ssmc` command line: check, compile, run and cache subcommands.

    ssmc check examples/mamba2.ssm
    ssmc compile examples/mamba2.ssm --emit passes
    ssmc run examples/mamba2.ssm --dims b=1,t=4096 --repeats 10
    ssmc cache info
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import sys

EMITS = ("ir", "passes", "source", "graph")
DTYPES = ("float32", "bfloat16", "float16")
TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}  # rel L2, chunked vs sequential
DEFAULT_SCAN, DEFAULT_BATCH, DEFAULT_GROUP, DEFAULT_OTHER = 1024, 2, 1, 16


class CLIError(Exception):
    """A usage problem found after argument parsing (bad --dims, missing file): message, exit 1."""


# ---- helpers -----------------------------------------------------------------------------------------

def _spec_path(file: str) -> pathlib.Path:
    p = pathlib.Path(file)
    if not p.exists():
        raise CLIError(f"spec file '{file}' not found")
    if p.is_dir():
        raise CLIError(f"'{file}' is a directory, not a .ssm spec file")
    return p


def notes(ir_text: str) -> dict:
    """The pass notes of a final IR: {"classes": {state: class}, "schedule": full chunk note or ""}."""
    classes, schedule = {}, ""
    for line in ir_text.splitlines():
        s = line.strip()
        m = re.match(r"# classify: state (\S+) is ([\w-]+)", s)
        if m:
            classes[m.group(1)] = m.group(2)
        elif s.startswith("# chunk:") and not schedule:
            schedule = s[len("# chunk:"):].strip()
    return {"classes": classes, "schedule": schedule}


def short_schedule(note: str) -> str:
    """'chunk-parallel form, chunk length 64 (h: scalar)' -> 'chunked, chunk length 64', etc."""
    m = re.match(r"chunk-parallel form, chunk length (\d+)", note)
    if m:
        return f"chunked, chunk length {m.group(1)}"
    if note.startswith("sequential scan"):
        if "not chunkable" in note:
            return "sequential scan (not chunkable)"
        m = re.search(r"\(([^)]*)\)", note)
        return f"sequential scan ({m.group(1)})" if m else "sequential scan"
    return note or "unknown"


def _decl(name, dims) -> str:
    return f"{name}[{','.join(dims)}]"


def parse_dims(text: str | None) -> dict[str, int]:
    """'b=2,t=4096' -> {'b': 2, 't': 4096}."""
    out: dict[str, int] = {}
    if not text:
        return out
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, val = part.partition("=")
        name, val = name.strip(), val.strip()
        if not eq or not name or not val:
            raise CLIError(f"--dims: expected NAME=SIZE items separated by commas (e.g. b=2,t=4096), got '{part}'")
        try:
            n = int(val)
        except ValueError:
            raise CLIError(f"--dims: size of '{name}' must be an integer, got '{val}'") from None
        if n < 1:
            raise CLIError(f"--dims: size of '{name}' must be >= 1, got {n}")
        out[name] = n
    return out


def default_dims(k, given: dict[str, int]) -> dict[str, int]:
    """Sizes for every dim of the spec: `given` first, then batch-like dims 2, the scan dim 1024, group dims 1
    and all others 16 (a mapped dim is rounded up to a multiple of its group dim's size)."""
    from .sampling import batch_dims

    prog = k.program
    unknown = [d for d in given if d not in prog.dims]
    if unknown:
        raise CLIError(f"--dims: {k.name} has no dim{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                       f"its dims are {', '.join(prog.dims)}")
    batch = set(batch_dims(k))
    groups = dict(prog.groups)             # g -> h
    mapped = {h: g for g, h in prog.groups}
    sizes = {}
    for d in prog.dims:
        if d in given:
            sizes[d] = given[d]
        elif d == prog.scan:
            sizes[d] = DEFAULT_SCAN
        elif d in groups:
            sizes[d] = DEFAULT_GROUP
        elif d in batch:
            sizes[d] = DEFAULT_BATCH
        else:
            sizes[d] = DEFAULT_OTHER
    for h, g in mapped.items():
        if h not in given and sizes[h] % sizes[g]:
            sizes[h] = -(-sizes[h] // sizes[g]) * sizes[g]
        if sizes[h] % sizes[g]:
            raise CLIError(f"--dims: `group {g} -> {h}` needs {h} ({sizes[h]}) to be a multiple of {g} ({sizes[g]})")
    return sizes


def rel_l2(a, ref) -> float:
    import numpy as np

    a = np.asarray(a, np.float64)
    ref = np.asarray(ref, np.float64)
    num = float(np.linalg.norm((a - ref).ravel()))
    den = float(np.linalg.norm(ref.ravel()))
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.nan
    return num / den if den > 0 else num


def _fmt_err(e: float) -> str:
    return f"{e:.2e}" if math.isfinite(e) else str(e)


def _table(rows: list[list[str]], out) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths), file=out)


# ---- subcommands ---------------------------------------------------------------------------------------

def cmd_check(args, out) -> int:
    import ssmc

    path = _spec_path(args.file)
    ssmc.check(path)                          # parse + semantic check: SpecError with a caret
    k = ssmc.compile(path, target=args.target)
    info = notes(k.ir)
    states = ", ".join(f"{_decl(n, d)} {info['classes'].get(n, '?')}" for n, d in k.states)
    print(f"{path}: ok: ssm {k.name}; in {', '.join(_decl(n, d) for n, d in k.inputs)}; state {states}; "
          f"out {', '.join(_decl(n, d) for n, d in k.outs)}; schedule: {short_schedule(info['schedule'])}",
          file=out)
    return 0


def cmd_compile(args, out) -> int:
    import ssmc

    path = _spec_path(args.file)
    k = ssmc.compile(path, target=args.target, chunk_size=args.chunk_size, dump=args.dump or False)
    if args.backward:
        return _emit_backward(k, args, out)
    if args.emit == "ir":
        text = k.ir
    elif args.emit == "passes":
        parts = []
        for i, (name, body) in enumerate(k.passes):
            parts.append(f"// ===== pass {i}: {name} =====\n{body.rstrip()}\n")
        text = "\n".join(parts)
    elif args.emit == "source":
        text = k.source
    else:
        text = k.graph_dot()
    out.write(text if text.endswith("\n") else text + "\n")
    if args.dump:
        print(f"ssmc: dumped passes and source under {pathlib.Path(args.dump) / k.name}", file=sys.stderr)
    return 0


def _emit_backward(k, args, out) -> int:
    """--backward: the derived backward programs (passes/adjoint.py) instead of the forward."""
    from .errors import SSMCError
    bw = k._derived_backward()
    if bw is None:
        raise SSMCError(f"{k.name}: no derived backward: {k.backward_note}")
    if args.emit == "source":
        text = bw.source
    elif args.emit == "passes":
        text = "\n".join(f"// ===== {name} =====\n{body.rstrip()}\n" for name, body in bw.passes)
    elif args.emit == "ir":
        text = "\n".join(f"// ===== {kind} part '{part}' =====\n{kk.ir.rstrip()}\n" for kind, part, kk in bw.parts())
    else:
        text = "\n".join(kk.graph_dot() for _, _, kk in bw.parts())
    out.write(text if text.endswith("\n") else text + "\n")
    return 0


def cmd_run(args, out) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ssmc
    from .sampling import random_inputs, zero_states_for_unsized
    from .timing import time_calls

    if args.repeats < 1:
        raise CLIError("--repeats must be >= 1")
    from .autoschedule import chosen_form, default_chunk
    path = _spec_path(args.file)
    given = parse_dims(args.dims)
    default = ssmc.compile(path, target=args.target, chunk_size=args.chunk_size, interpret=args.interpret)
    seq = ssmc.compile(path, target=args.target, chunk_size=1, interpret=args.interpret)
    # on CPU the default form is measured per shape bucket (ssmc/autoschedule.py): time the chunked form too
    Q = default_chunk(default)
    chunked = ssmc.compile(path, target=args.target, chunk_size=Q, interpret=args.interpret) if Q else default
    sizes = default_dims(chunked, given)
    inputs = random_inputs(chunked, sizes, seed=args.seed, dtype=getattr(jnp, args.dtype))
    inputs = {n: jnp.asarray(v) for n, v in inputs.items()}
    init = zero_states_for_unsized(chunked, sizes)

    def wrap(k):
        return jax.jit(lambda xs, st: k.apply(xs, st or None))

    forms = ([("default", default)] if Q else []) + [("chunked", chunked), ("sequential", seq)]
    results = {}
    for label, k in forms:
        first, ms, res = time_calls(wrap(k), (inputs, init), 1, args.repeats)
        results[label] = (k, first, ms, res)

    info = notes(chunked.ir)
    names = [("out", n) for n, _ in chunked.outs] + [("state", n) for n, _ in chunked.states]
    errors = [(kind, n, rel_l2(a, b)) for (kind, n), a, b in
              zip(names, results["chunked"][3], results["sequential"][3])]
    tol = args.tol if args.tol is not None else TOLERANCE[args.dtype]

    print(f"ssmc run: {chunked.name} ({path})", file=out)
    print(f"  target    {chunked.target} (jax {jax.__version__}, {jax.default_backend()})", file=out)
    sched = info['schedule'] or 'unknown'
    if Q:
        sched = f"auto: {sched}, or the sequential scan where that measures faster (per shape bucket)"
    print(f"  schedule  {sched}", file=out)
    classes = ", ".join(f"{n}: {c}" for n, c in info["classes"].items())
    if classes:
        print(f"  states    {classes}", file=out)
    print(f"  dims      {' '.join(f'{d}={n}' for d, n in sizes.items())}", file=out)
    print(f"  dtype     {args.dtype}, seed {args.seed}, median of {args.repeats} runs", file=out)
    print("", file=out)
    rows = [["form", "schedule", "compile s", "first call s", "run ms"]]
    for label, _ in forms:
        k, first, ms, _ = results[label]
        cached = " (cached)" if k.from_disk_cache else ""
        sched = short_schedule(notes(k.ir)["schedule"])
        if label == "default":
            sched = f"auto: {chosen_form(k)}"
        rows.append([label, sched, f"{k.compile_seconds:.3f}{cached}", f"{first:.3f}", f"{ms:.3f}"])
    _table(rows, out)

    def speedup(label):
        return results["sequential"][2] / results[label][2] if results[label][2] > 0 else math.inf

    if Q:
        print(f"  speedup   {speedup('default'):.2f}x default, {speedup('chunked'):.2f}x chunked (sequential / "
              f"run time)", file=out)
        print(f"  chosen    {default.schedule.splitlines()[-1].strip()}", file=out)
    else:
        print(f"  speedup   {speedup('chunked'):.2f}x (sequential / chunked run time)", file=out)
    print("", file=out)
    rows = [["result", "shape", "rel L2 error (chunked vs sequential)"]]
    for (kind, n, e), r in zip(errors, results["chunked"][3]):
        rows.append([f"{kind} {n}", "x".join(map(str, r.shape)), _fmt_err(e)])
    _table(rows, out)
    worst = max((e if math.isfinite(e) else math.inf) for _, _, e in errors) if errors else 0.0
    finite = all(bool(np.all(np.isfinite(np.asarray(r, np.float32)))) for r in results["chunked"][3])
    if not finite or not math.isfinite(worst):
        print("FAIL: non-finite results or error (the random inputs may make this recurrence diverge)",
              file=out)
        return 1
    if worst > tol:
        print(f"FAIL: max rel L2 error {worst:.2e} > tolerance {tol:g} ({args.dtype})", file=out)
        return 1
    print(f"OK: max rel L2 error {worst:.2e} <= {tol:g} ({args.dtype})", file=out)
    return 0


def cmd_cache(args, out) -> int:
    from .cache import DiskCache

    c = DiskCache()
    if args.action == "info":
        i = c.info()
        print(f"root     {i['root']}", file=out)
        print(f"entries  {i['entries']}", file=out)
        print(f"bytes    {i['bytes']}", file=out)
    else:
        n = c.clear()
        for space in ("lark", "fingerprint"):  # the parser's tables and the compiler's fingerprint: rebuilt on use
            DiskCache(space=space).clear()
        print(f"removed {n} entr{'y' if n == 1 else 'ies'} from {c.root}", file=out)
    return 0


# ---- entry point ---------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="ssmc", description="Compile state-space-model specs (.ssm) to JAX kernels.")
    p.add_argument("--version", action="version", version=f"ssmc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser("check", help="parse and check a spec; print a one-line summary")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--target", default="xla", help="target whose pipeline decides the schedule (default xla)")
    c.set_defaults(func=cmd_check)

    c = sub.add_parser("compile", help="compile a spec and print its IR, passes, generated source or graph")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--target", default="xla", help="xla (default), triton/gpu, tpu/pallas_tpu, auto")
    c.add_argument("--chunk-size", type=_positive_int, default=None, help="chunk length (1: sequential scan)")
    c.add_argument("--emit", choices=EMITS, default="ir", help="what to print (default ir)")
    c.add_argument("--dump", metavar="DIR", default=None, help="also write every pass's IR and the source under DIR")
    c.add_argument("--backward", action="store_true",
                   help="print the derived backward (the adjoint programs through the same passes) instead")
    c.set_defaults(func=cmd_compile)

    c = sub.add_parser("run", help="run chunked and sequential forms on random inputs; compare time and error")
    c.add_argument("file", metavar="FILE")
    c.add_argument("--target", default="xla")
    c.add_argument("--interpret", action="store_true",
                   help="kernel targets (triton, tpu): run the kernels in their CPU interpreter")
    c.add_argument("--dims", default=None, metavar="D=N,...",
                   help="dim sizes, e.g. b=2,t=4096 (defaults: scan dim 1024, batch 2, group dims 1, others 16)")
    c.add_argument("--chunk-size", type=_positive_int, default=None, help="chunk length of the chunked form")
    c.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the inputs and outs")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--repeats", type=_positive_int, default=5, help="timed runs (median reported)")
    c.add_argument("--tol", type=float, default=None,
                   help="max rel L2 error (default 1e-3 float32, 1e-2 float16, 5e-2 bfloat16)")
    c.set_defaults(func=cmd_run)

    c = sub.add_parser("cache", help="inspect or clear the kernel disk cache ($SSMC_CACHE_DIR)")
    c.add_argument("action", choices=("info", "clear"))
    c.set_defaults(func=cmd_cache)
    return p


def main(argv=None) -> int:
    """Entry point of the `ssmc` console script and `python -m ssmc`; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import SpecError, SSMCError

    try:
        return args.func(args, sys.stdout)
    except SpecError as e:
        print(str(e), file=sys.stderr)
    except (SSMCError, CLIError) as e:
        print(f"ssmc: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("ssmc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `ssmc compile ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
