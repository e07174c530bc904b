#!/usr/bin/env python
"""What jax.grad through an ssmc kernel keeps between its forward and backward: XLA's own accounting of the compiled
forward+backward (temp bytes: everything live besides the arguments and results), next to the bytes of the inputs
and of the per-chunk states, for Mamba2 (mixed precision: x, dt, B, C bf16; A, D fp32) on the current backend.

    python bench/grad_memory.py [--b 2] [--t 4096] [--h 8] [--p 64] [--n 64] [--target xla]

loss = sum(y * w) with a fixed random w; gradients w.r.t. x, dt, A, B, C, D.
"""
from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp

import ssmc

SPEC = str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "mamba2.ssm")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    for d, v in (("b", 2), ("t", 4096), ("h", 8), ("p", 64), ("n", 64), ("chunk", 64)):
        ap.add_argument(f"--{d}", type=int, default=v)
    ap.add_argument("--target", default="xla")
    a = ap.parse_args()
    k = ssmc.compile(SPEC, target=a.target, chunk_size=a.chunk, interpret=a.target != "xla" and
                     jax.default_backend() == "cpu")
    ks = jax.random.split(jax.random.PRNGKey(0), 7)
    bf = jnp.bfloat16
    x = jax.random.normal(ks[0], (a.b, a.t, a.h, a.p), bf)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (a.b, a.t, a.h)) - 3.0).astype(bf)
    A = -jnp.exp(jax.random.uniform(ks[2], (a.h,)))
    B = jax.random.normal(ks[3], (a.b, a.t, 1, a.n), bf)
    C = jax.random.normal(ks[4], (a.b, a.t, 1, a.n), bf)
    D = jax.random.normal(ks[5], (a.h,))
    w = jax.random.normal(ks[6], (a.b, a.t, a.h, a.p), bf)

    def loss(x, dt, A, B, C, D):
        return jnp.sum(k(x, dt, A, B, C, D)[0].astype(jnp.float32) * w)
    args = (x, dt, A, B, C, D)
    mem = jax.jit(jax.grad(loss, argnums=tuple(range(6)))).lower(*args).compile().memory_analysis()
    fwd = jax.jit(loss).lower(*args).compile().memory_analysis()
    inputs = sum(v.size * v.dtype.itemsize for v in args)
    nc = -(-a.t // a.chunk)
    chunk_states = a.b * nc * a.h * a.p * a.n * 4
    per_step_state = a.b * a.t * a.h * a.p * a.n * 4
    mib = 2 ** 20
    print(f"mamba2 {a.target} b={a.b} t={a.t} h={a.h} p={a.p} n={a.n} chunk={a.chunk} on {jax.default_backend()}")
    print(f"| inputs | per-chunk states (fp32) | per-step states (fp32) | forward temp | forward+backward temp |")
    print(f"|---:|---:|---:|---:|---:|")
    print(f"| {inputs / mib:.1f} MiB | {chunk_states / mib:.1f} MiB | {per_step_state / mib:.1f} MiB | "
          f"{fwd.temp_size_in_bytes / mib:.1f} MiB | {mem.temp_size_in_bytes / mib:.1f} MiB |")


if __name__ == "__main__":
    main()
