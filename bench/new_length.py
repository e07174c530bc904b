#!/usr/bin/env python
"""Where the first call at a new sequence length goes, in a warm process (target="triton" on a GPU).

    python bench/new_length.py [--shape S1] [--lengths 1952 1500 1024]

Mamba2 at a bench/gpu.py shape with mixed-precision inputs (x, dt, B, C bf16; A, D fp32). The first call at the
shape's length warms the process (Triton compile, autotune). Then, per unseen length: the wall time of `k(...)`
to a result, and for a further unseen length the same call taken apart - jax's trace of the kernel's jitted
function, its lowering to StableHLO (jax-triton's custom call, the Triton kernel from its in-memory cache), XLA's
compile, the run - and a cProfile of one more fresh call (top functions by cumulative time). For scale, the
first call of a trivial jitted function at a new shape (the floor jax's own trace + compile sets).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pathlib
import pstats
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu  # noqa: E402  (the shapes, the spec and the uninstalled-checkout finder)


def ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def inputs(s: dict, key):
    import jax
    import jax.numpy as jnp
    b, l, h, p, n, g = (s[d] for d in ("b", "l", "h", "p", "n", "g"))
    ks = jax.random.split(key, 6)
    x = jax.random.normal(ks[0], (b, l, h, p), jnp.float32).astype(jnp.bfloat16)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, l, h)) - 2.0).astype(jnp.bfloat16)
    A = -jnp.exp(jax.random.uniform(ks[2], (h,), minval=0.0, maxval=2.0))
    B = jax.random.normal(ks[3], (b, l, g, n)).astype(jnp.bfloat16)
    C = jax.random.normal(ks[4], (b, l, g, n)).astype(jnp.bfloat16)
    D = jax.random.normal(ks[5], (h,))
    return x, dt, A, B, C, D


def cut(args, l2):
    """Time-indexed arguments cut to length l2 (a fresh device array: no slice left in the timed call)."""
    import jax
    out = tuple(a[:, :l2] + 0 if a.ndim >= 3 else a for a in args)
    jax.block_until_ready(out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="S1", choices=sorted(gpu.SHAPES))
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import ssmc

    s = gpu.SHAPES[a.shape]
    l = s["l"]
    args = inputs(s, jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    k = ssmc.compile(gpu.SPEC.read_text(), target="triton")
    print(f"compile (spec -> module): {ms(t0):.1f} ms")
    t0 = time.perf_counter()
    jax.block_until_ready(k(*args))
    print(f"first call at L={l} (Triton compile + autotune): {ms(t0):.0f} ms")
    t0 = time.perf_counter()
    jax.block_until_ready(k(*args))
    print(f"second call at L={l}: {ms(t0):.2f} ms")

    lengths = a.lengths or [l - 96, l - 200, l // 2 + 40, l - 300]
    for l2 in lengths:
        a2 = cut(args, l2)
        t0 = time.perf_counter()
        jax.block_until_ready(k(*a2))
        first = ms(t0)
        t0 = time.perf_counter()
        jax.block_until_ready(k(*a2))
        print(f"new length L={l2}: first call {first:.1f} ms, second {ms(t0):.2f} ms")

    # one more fresh length, taken apart
    l3 = l - 152
    a3 = cut(args, l3)
    t0 = time.perf_counter()
    meta, arrays = k._bound(a3, {}, None, None)  # what k(...) passes its jitted entry
    bind = ms(t0)
    t0 = time.perf_counter()
    traced = k._jitted.trace(meta, arrays)
    trace = ms(t0)
    t0 = time.perf_counter()
    lowered = traced.lower()
    lower = ms(t0)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    comp = ms(t0)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(arrays))
    run = ms(t0)
    print(f"taken apart at L={l3}: bind {bind:.1f} ms, trace {trace:.1f} ms, lower {lower:.1f} ms, "
          f"XLA compile {comp:.1f} ms, run {run:.2f} ms")
    hlo = lowered.as_text()
    print(f"  lowered module: {len(hlo)} chars, {hlo.count('stablehlo.')} stablehlo ops, "
          f"{hlo.count('custom_call')} custom calls")
    import re
    print("  ops:", sorted(set(re.findall(r"stablehlo\.[a-z_]+", hlo))))
    print("  compiled HLO:\n" + "\n".join(ln[:200] for ln in compiled.as_text().splitlines() if "backend_config" not in ln
                                          or len(ln) < 300)[:3000])

    # with the initial state given (no zeros built inside the jitted function)
    b, h, p, n = (s[d] for d in ("b", "h", "p", "n"))
    h0 = jax.random.normal(jax.random.PRNGKey(1), (b, h, p, n))
    jax.block_until_ready(k(*args, initial_state=h0))
    for l2 in (l - 104, l - 112):
        a2 = cut(args, l2)
        t0 = time.perf_counter()
        jax.block_until_ready(k(*a2, initial_state=h0))
        print(f"new length L={l2} with initial_state given: first call {ms(t0):.1f} ms")

    # a profile of one more fresh call
    a4 = cut(args, l - 248)
    pr = cProfile.Profile()
    pr.enable()
    jax.block_until_ready(k(*a4))
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(35)
    print(buf.getvalue()[:9000])

    # the floor: a trivial jitted function at a new shape
    f = jax.jit(lambda x, y: (x.astype(jnp.float32) * 2 + 1).astype(x.dtype) + y)
    ident = jax.jit(lambda x: x)
    copy = jax.jit(lambda x: x + 0)
    for l2 in (l - 96, l - 100):
        a2 = cut(args, l2)
        t0 = time.perf_counter()
        jax.block_until_ready(f(a2[0], a2[0]))
        t1 = ms(t0)
        t0 = time.perf_counter()
        jax.block_until_ready(ident(a2[0]))
        t2 = ms(t0)
        t0 = time.perf_counter()
        jax.block_until_ready(copy(a2[0]))
        print(f"at L={l2}, first call: an elementwise jit {t1:.1f} ms, identity jit {t2:.1f} ms, x + 0 {ms(t0):.1f} ms")
    for opts in ({"xla_gpu_autotune_level": 0}, {"xla_gpu_enable_command_buffer": ""}):
        try:
            a2 = cut(args, l - 400)
            meta, arrays = k._bound(a2, {}, None, None)
            t0 = time.perf_counter()
            c = k._jitted.trace(meta, arrays).lower().compile(compiler_options=opts)
            jax.block_until_ready(c(arrays))
            print(f"new length with compiler_options={opts}: {ms(t0):.1f} ms")
        except Exception as e:  # noqa: BLE001
            print(f"compiler_options={opts}: {type(e).__name__}: {e}"[:300])


if __name__ == "__main__":
    main()
