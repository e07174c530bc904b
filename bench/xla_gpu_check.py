#!/usr/bin/env python
"""Check and time the XLA target on the default (GPU) backend: every example, chunked vs sequential.

    python bench/xla_gpu_check.py --t 2048 --repeats 20

For each examples/*.ssm: compile with target="xla" twice (chunk_size=None: the class default schedule;
chunk_size=1: the sequential scan), draw inputs with ssmc.sampling.random_inputs, run both under jax.jit on
the same inputs, report the max rel L2 error (chunked vs sequential, over every out and final state) and the
median wall time of `--repeats` calls after warm-up (block_until_ready). Mamba2 is also run on bf16 inputs.
Does NOT force JAX_PLATFORMS=cpu: run it on a GPU machine.
"""
from __future__ import annotations

import argparse
import atexit
import math
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time
import traceback

os.environ["SSMC_CACHE_DIR"] = _cache_dir = tempfile.mkdtemp(prefix="ssmc-gpu-check-")
atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
try:
    import ssmc
except ImportError:  # not installed: run from the checkout
    sys.path.insert(0, str(ROOT))
    import ssmc
from ssmc.cli import default_dims, notes, rel_l2, short_schedule
from ssmc.sampling import random_inputs, zero_states_for_unsized
from ssmc.timing import time_calls

# Sizes: batch 2, heads 8, group dims 1, every other non-scan dim 64; Mamba1 gets d=512 channels, n=16 states.
OVERRIDES = {"mamba1": {"d": 512, "n": 16}}
TOL = {"float32": 1e-3, "bfloat16": 5e-2}


def sizes_for(k, t: int) -> dict[str, int]:
    prog = k.program
    groups = {g for g, _ in prog.groups}
    given = {}
    for d in prog.dims:
        if d == prog.scan:
            given[d] = t
        elif d == "b":
            given[d] = 2
        elif d == "h":
            given[d] = 8
        elif d in groups:
            given[d] = 1
        else:
            given[d] = 64
    given.update(OVERRIDES.get(k.name, {}))
    return default_dims(k, given)


def check(path: pathlib.Path, t: int, dtype: str, warmup: int, repeats: int, seed: int):
    chunked = ssmc.compile(str(path), target="xla", chunk_size=None)
    seq = ssmc.compile(str(path), target="xla", chunk_size=1)
    sizes = sizes_for(chunked, t)
    inputs = random_inputs(chunked, sizes, seed=seed, dtype=getattr(jnp, dtype))
    inputs = {n: jnp.asarray(v) for n, v in inputs.items()}
    init = zero_states_for_unsized(chunked, sizes)

    def wrap(k):
        return jax.jit(lambda xs, st: k(**xs, initial_states=st or None))

    _, c_ms, rc = time_calls(wrap(chunked), (inputs, init), warmup, repeats)
    _, s_ms, rs = time_calls(wrap(seq), (inputs, init), warmup, repeats)
    names = [f"out {n}" for n, _ in chunked.outs] + [f"state {n}" for n, _ in chunked.states]
    errs = {n: rel_l2(a, b) for n, a, b in zip(names, rc, rs)}
    finite = all(bool(np.all(np.isfinite(np.asarray(r, np.float32)))) for r in list(rc) + list(rs))
    worst = max((e if math.isfinite(e) else math.inf) for e in errs.values())
    sched = short_schedule(notes(chunked.ir)["schedule"])
    dims = " ".join(f"{d}={n}" for d, n in sizes.items())
    return sched, dims, c_ms, s_ms, worst, errs, finite


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("examples", nargs="*", help="spec files (default: examples/*.ssm)")
    args = ap.parse_args()

    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, numpy {np.__version__}, python "
          f"{platform.python_version()}; backend {jax.default_backend()}; device {dev.device_kind} ({dev.platform})",
          flush=True)
    if jax.default_backend() == "cpu":
        print("WARNING: running on the CPU backend", flush=True)

    paths = [pathlib.Path(p) for p in args.examples] or sorted((ROOT / "examples").glob("*.ssm"))
    runs = [(p, "float32") for p in paths] + [(p, "bfloat16") for p in paths if p.stem == "mamba2"]
    rows, failures = [], []
    for path, dtype in runs:
        label = path.stem + ("" if dtype == "float32" else f" ({dtype})")
        t0 = time.perf_counter()
        try:
            sched, dims, c_ms, s_ms, worst, errs, finite = check(path, args.t, dtype, args.warmup, args.repeats,
                                                                  args.seed)
        except Exception:
            tb = traceback.format_exc()
            print(f"== {label}: ERROR\n{tb}", flush=True)
            failures.append((label, tb.strip().splitlines()[-1]))
            rows.append((label, "ERROR", "-", "-", "-", "-"))
            continue
        ok = finite and worst <= TOL[dtype]
        if not ok:
            failures.append((label, f"rel err {worst:.2e} > {TOL[dtype]:g} or non-finite (finite={finite})"))
        print(f"== {label}: {sched}; {dims}; chunked {c_ms:.3f} ms, sequential {s_ms:.3f} ms; errors "
              + ", ".join(f"{n}: {e:.2e}" for n, e in errs.items())
              + f"; {'OK' if ok else 'FAIL'} ({time.perf_counter() - t0:.1f} s incl. compile)", flush=True)
        rows.append((label, sched, f"{c_ms:.3f}", f"{s_ms:.3f}", f"{s_ms / c_ms:.1f}x",
                     f"{worst:.1e}" + ("" if ok else " FAIL")))

    print(f"\nXLA target on {dev.device_kind}, jax {jax.__version__}, t={args.t}, b=2, h=8, other dims 64 "
          f"(mamba1 d=512 n=16), median of {args.repeats} calls after {args.warmup} warm-up; "
          f"rel err = max rel L2 over outs and final states, chunked vs sequential\n")
    print("| example | schedule | chunked ms | sequential ms | seq/chunked | rel err |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if failures:
        print("\nFAILURES:")
        for label, why in failures:
            print(f"- {label}: {why}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
