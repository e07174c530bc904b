#!/usr/bin/env python
"""ssmc's XLA target on a GPU at the Mamba2 shapes the Triton issue names, against the memory floor.

    python bench/xla_gpu_shapes.py

S1 = b=4 h=80 p=64 n=128 g=1 L=2048 (a Mamba2-2.7B layer), S2 = the same at L=8192, S3 = b=8 h=32 p=64 n=64 L=4096.
For each shape and input dtype: median forward time (jax.jit, warm-up, median of `--repeats` calls with
block_until_ready, fresh random inputs), and the memory floor = bytes of x, dt, B, C read + y written over the
copy bandwidth measured in the same run. bf16 runs both matmul modes ("auto": bf16 operands, fp32 accumulation;
"float32": full precision); every result is checked against the float32-input full-precision run.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile

os.environ.setdefault("SSMC_CACHE_DIR", tempfile.mkdtemp(prefix="ssmc-gpu-shapes-"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
import ssmc  # noqa: E402  (installed: `pip install -e .` maps ssmc.passes / ssmc.targets)
from ssmc.timing import time_calls  # noqa: E402

SHAPES = {"S1": dict(b=4, h=80, p=64, n=128, g=1, t=2048), "S2": dict(b=4, h=80, p=64, n=128, g=1, t=8192),
          "S3": dict(b=8, h=32, p=64, n=64, g=1, t=4096)}
MAMBA_SSM_BF16_MS = {"S1": 0.476, "S2": 1.62, "S3": 0.474}  # the figures for this workplace's H100


def inputs(s, seed):
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    b, t, h, p, n, g = (s[d] for d in "bthpng")
    return dict(x=jax.random.normal(k[0], (b, t, h, p)), dt=jax.nn.softplus(jax.random.normal(k[1], (b, t, h)) - 2),
                A=-jnp.exp(jax.random.uniform(k[2], (h,), minval=0.0, maxval=2.0)),
                B=jax.random.normal(k[3], (b, t, g, n)), C=jax.random.normal(k[4], (b, t, g, n)),
                D=jax.random.normal(k[5], (h,)))


def copy_bandwidth(repeats):
    x = jnp.ones((256 * 2**20,), jnp.float32)  # 1 GiB
    f = jax.jit(lambda a: a * 1.0001)
    _, ms, _ = time_calls(f, (x,), 2, repeats)
    return 2 * x.nbytes / (ms * 1e-3)  # read + write


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--chunks", type=int, nargs="*", default=[64, 128, 256])
    args = ap.parse_args()
    bw = copy_bandwidth(args.repeats)
    spec = ROOT / "examples" / "mamba2.ssm"
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s\n")
    print("| shape | inputs | matmul | chunk | ms | floor ms | % of floor | rel err vs fp32 | mamba_ssm bf16 ms (issue) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, s in SHAPES.items():
        x32 = inputs(s, 0)
        ref = None
        runs = [("float32", "float32", c) for c in args.chunks[:1]]
        runs += [("bfloat16", "auto", c) for c in args.chunks] + [("bfloat16", "float32", args.chunks[0])]
        for dt, mm, chunk in runs:
            x = {k: v.astype(dt) for k, v in x32.items()}
            k = ssmc.compile(spec, chunk_size=chunk, matmul=mm)
            f = jax.jit(lambda *a, k=k: k(*a))
            arrs = [x[n] for n in ("x", "dt", "A", "B", "C", "D")]
            _, ms, (y, h) = time_calls(f, arrs, 2, args.repeats)
            if ref is None:
                ref = y
            nbytes = sum(x[n].nbytes for n in ("x", "dt", "B", "C")) + y.nbytes
            floor = nbytes / bw * 1e3
            anchor = MAMBA_SSM_BF16_MS[name] if dt == "bfloat16" else ""
            print(f"| {name} | {dt} | {mm} | {chunk} | {ms:.3f} | {floor:.3f} | {100 * floor / ms:.0f}% | "
                  f"{rel(jnp.asarray(y, jnp.float32), ref):.1e} | {anchor} |", flush=True)


if __name__ == "__main__":
    main()
