#!/usr/bin/env python
"""Forward time of the Triton target against the number of sequence segments (and, for GLA, the chunk length),
one process, same inputs: the data behind the segment heuristic (targets/kernel_runtime.pick_segments).

    python bench/schedule_sweep.py [--mamba S2 L64K] [--segments 1 2 4 8 16] [--gla G1] [--gla-chunks 16 32 64]

Mamba2 with mixed precision inputs (bench/gpu.py's shapes), GLA with bf16 q, k, v and an fp32 log-gate (GLA_SPEC).
Each (shape, chunk, segments) is its own compiled kernel (`ssmc.compile(..., segments=N)`); "auto" is the
heuristic's pick. Timing: bench/gpu.py's host loop (median).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import gpu  # noqa: E402
import new_length  # noqa: E402


def gla_inputs(s, key):
    import jax
    import jax.numpy as jnp
    b, l, h, dk, dv = (s[d] for d in ("b", "l", "h", "dk", "dv"))
    ks = jax.random.split(key, 4)
    q = (jax.random.normal(ks[0], (b, l, h, dk)) * dk ** -0.5).astype(jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, l, h, dk)).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, l, h, dv)).astype(jnp.bfloat16)
    g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, l, h, dk)) + 3.0) / 16.0   # fla's convention: fp32
    return q, k, v, g


def sweep(label, spec, args, segs, chunk=None, repeats=10):
    import jax
    import ssmc
    for n in segs:
        t0 = time.perf_counter()
        try:
            k = ssmc.compile(spec, target="triton", chunk_size=chunk, segments=None if n == "auto" else int(n))
            f = jax.jit(lambda *a, k=k: k(*a)[0])
            jax.block_until_ready(f(*args))
            setup = time.perf_counter() - t0
            ms = gpu.time_jax(f, [args], repeats=repeats)
            print(f"{label} chunk={chunk or 'default'} segments={n}: {ms:.3f} ms (setup {setup:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"{label} chunk={chunk} segments={n}: {gpu.short_error(e)}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mamba", nargs="*", default=["S2", "L64K"])
    ap.add_argument("--segments", nargs="*", default=["auto", "1", "2", "4", "8", "16"])
    ap.add_argument("--gla", nargs="*", default=["G1"])
    ap.add_argument("--gla-chunks", type=int, nargs="*", default=[16, 64])
    a = ap.parse_args(argv)
    import jax
    for shape in a.mamba:
        args = new_length.inputs(gpu.SHAPES[shape], jax.random.PRNGKey(0))
        sweep(shape, gpu.SPEC.read_text(), args, a.segments)
    for shape in a.gla:
        args = gla_inputs(gpu.GLA_SHAPES[shape], jax.random.PRNGKey(0))
        for c in a.gla_chunks:
            sweep(shape, gpu.GLA_SPEC, args, a.segments, chunk=c)


if __name__ == "__main__":
    main()
