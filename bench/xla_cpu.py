#!/usr/bin/env python
"""Benchmark: chunked vs sequential XLA forms of Mamba2 on CPU.

    python bench/xla_cpu.py --t 1024 4096 --repeats 10

Prints a markdown table (median wall time per call, seq/chunked ratio, relative error of the
chunked outputs against the sequential ones) followed by the device and versions.
"""
from __future__ import annotations

import argparse
import atexit
import os
import pathlib
import platform
import shutil
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported: this benchmark is about XLA:CPU
# A private kernel cache, so the kernels timed are the ones the current compiler emits, not stale entries.
os.environ["SSMC_CACHE_DIR"] = _cache_dir = tempfile.mkdtemp(prefix="ssmc-bench-")
atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "mamba2.ssm"
try:
    import ssmc
except ImportError:  # not installed: run from the checkout
    sys.path.insert(0, str(ROOT))
    import ssmc
from ssmc.timing import time_calls  # noqa: E402

B, H, P, N, G = 2, 8, 64, 64, 1


def make_inputs(t: int, seed: int) -> dict[str, jax.Array]:
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    f32 = jnp.float32
    return {
        "x": jax.random.normal(ks[0], (B, t, H, P), f32),
        "dt": jax.nn.softplus(jax.random.normal(ks[1], (B, t, H), f32)) * 0.1 + 1e-3,  # > 0
        "A": -jax.random.uniform(ks[2], (H,), f32, 1.0, 16.0),  # < 0, Mamba2's init range
        "B": jax.random.normal(ks[3], (B, t, G, N), f32),
        "C": jax.random.normal(ks[4], (B, t, G, N), f32),
        "D": jax.random.normal(ks[5], (H,), f32),
    }


def jitted(kernel):
    # Positional wrapper so jax.jit sees plain array arguments whatever the kernel object is.
    return jax.jit(lambda x, dt, A, B, C, D: kernel(x=x, dt=dt, A=A, B=B, C=C, D=D))


def temp_mib(fn, args) -> float:
    """XLA's scratch memory for one call (beyond arguments and outputs), from the compiled executable."""
    m = fn.lower(*args).compile().memory_analysis()
    return m.temp_size_in_bytes / 2**20 if m is not None else float("nan")


def rel_err(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", type=int, nargs="+", default=[1024, 4096], help="sequence lengths")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per form (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first (includes compilation)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    chunked = jitted(ssmc.compile(str(SPEC), target="xla", chunk_size=None))
    sequential = jitted(ssmc.compile(str(SPEC), target="xla", chunk_size=1))

    rows = []
    for t in args.t:
        inp = make_inputs(t, args.seed + t)
        arrays = [inp[k] for k in ("x", "dt", "A", "B", "C", "D")]
        _, c_ms, (yc, hc) = time_calls(chunked, arrays, args.warmup, args.repeats)
        _, s_ms, (ys, hs) = time_calls(sequential, arrays, args.warmup, args.repeats)
        mem = (temp_mib(chunked, arrays), temp_mib(sequential, arrays), B * t * H * P * N * 4 / 2**20)
        rows.append((t, c_ms, s_ms, s_ms / c_ms, rel_err(yc, ys), rel_err(hc, hs)) + mem)
        print(f"t={t}: chunked {c_ms:.2f} ms, sequential {s_ms:.2f} ms", file=sys.stderr, flush=True)

    print(f"Mamba2, b={B} h={H} p={P} n={N} g={G}, float32, median of {args.repeats} calls after {args.warmup} warm-up\n")
    print("| t | chunked ms | sequential ms | seq/chunked | rel err y | rel err h_final | chunked temp MiB | "
          "sequential temp MiB | one state per step MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t, c, s, r, ey, eh, mc, ms, mstep in rows:
        print(f"| {t} | {c:.2f} | {s:.2f} | {r:.1f}x | {ey:.1e} | {eh:.1e} | {mc:.1f} | {ms:.1f} | {mstep:.0f} |")

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print()
    print(f"- device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {cpu_model()}")
    print(f"- cores: {os.cpu_count()} logical, {affinity} usable by this process")
    print(f"- jax {jax.__version__}, jaxlib {jaxlib.__version__}, numpy {np.__version__}, "
          f"python {platform.python_version()}, ssmc {getattr(ssmc, '__version__', '?')}")
    print(f"- {platform.platform()}")


if __name__ == "__main__":
    main()
