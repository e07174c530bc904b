"""The default schedule on the CPU backend against the chunked and the sequential form (issue 12, item 6).

    JAX_PLATFORMS=cpu python bench/cpu_schedule.py [--runs 7] [name ...]

For each spec at the issue's sizes: the XLA target's default (`chunk_size=None`: on CPU the faster form per shape
bucket, measured on the first call, ssmc/autoschedule.py), the chunked form (the class's chunk length) and the
sequential scan (`chunk_size=1`), each jitted, timed interleaved after a warm-up, best of --runs, on the same
random inputs. Also the first call of the default (compile of both forms + measuring, or a disk-cache hit).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import ssmc  # noqa: E402
from ssmc import autoschedule  # noqa: E402
from ssmc.sampling import random_inputs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# HGRN2: key-wise forget gate f, input (1 - f) (its k is tied to the decay)
HGRN2 = """ssm hgrn2 {
  dims b, t, h, dk, dv
  scan t
  in q[b,t,h,dk], f_raw[b,t,h,dk], v[b,t,h,dv]
  state S[b,h,dk,dv]
  out o[b,t,h,dv]
  lf = -softplus(-f_raw)
  S = exp(lf)*S + (1 - exp(lf))⊗v
  o = q·S
}"""

# mLSTM: scalar forget gate per head, an input gate, a normaliser state and max(|q·n|, 1) in the readout
MLSTM = """ssm mlstm {
  dims b, t, h, dk, dv
  scan t
  in q[b,t,h,dk], k[b,t,h,dk], v[b,t,h,dv], f_raw[b,t,h], i_raw[b,t,h]
  state C[b,h,dk,dv], n[b,h,dk]
  out o[b,t,h,dv]
  lf = -softplus(-f_raw)
  ig = exp(min(i_raw, 0.0))
  C = exp(lf)*C + ig*k⊗v
  n = exp(lf)*n + ig*k
  qn[b,t,h] = q·n
  num[b,t,h,dv] = q·C
  o = num / max(abs(qn), 1.0)
}"""

GLA = os.path.join(ROOT, "examples", "gla.ssm")
MAMBA2 = os.path.join(ROOT, "examples", "mamba2.ssm")

CASES = [
    ("gla-k16", GLA, {"b": 1, "t": 2048, "h": 4, "dk": 16, "dv": 16}),
    ("gla-k64", GLA, {"b": 1, "t": 2048, "h": 4, "dk": 64, "dv": 64}),
    ("hgrn2", HGRN2, {"b": 1, "t": 2048, "h": 4, "dk": 32, "dv": 32}),
    ("mlstm", MLSTM, {"b": 1, "t": 2048, "h": 4, "dk": 64, "dv": 64}),
    ("mamba2", MAMBA2, {"b": 2, "t": 4096, "h": 8, "p": 64, "n": 64, "g": 1}),
]


def best_of(fns: dict, args, runs: int) -> dict:
    """Best wall time in ms of each function after a warm-up call, run interleaved (so machine load hits them
    alike). tests/test_cpu_schedule.py times with it too."""
    for f in fns.values():
        jax.block_until_ready(f(args))
    times = {n: [] for n in fns}
    for _ in range(runs):
        for n, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(args))
            times[n].append(time.perf_counter() - t0)
    return {n: min(v) * 1e3 for n, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("names", nargs="*")
    args = ap.parse_args(argv)
    if os.environ.get(autoschedule.ENV) == "0":
        print(f"{autoschedule.ENV}=0 turns the measured default off; unset it", file=sys.stderr)
        return 2
    print(f"jax {jax.__version__} ({jax.default_backend()}), {platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; best of {args.runs} interleaved runs, ms")
    head = (f"{'spec':8s} {'sizes':34s} {'default':>9s} {'chosen':>10s} {'chunked':>9s} {'sequential':>10s} "
            f"{'def/seq':>7s} {'chunk/seq':>9s} {'1st call s':>10s}")
    print(head)
    print("-" * len(head))
    for name, spec, sizes in CASES:
        if args.names and name not in args.names:
            continue
        default = ssmc.compile(spec)
        Q = autoschedule.default_chunk(default)
        chunked = ssmc.compile(spec, chunk_size=Q) if Q else default
        seq = ssmc.compile(spec, chunk_size=1)
        xs = {n: jnp.asarray(v) for n, v in random_inputs(default, sizes, probe=False).items()}
        t0 = time.perf_counter()
        jax.block_until_ready(default(**xs))  # the first call: compiles, measures (or reads the disk cache)
        first = time.perf_counter() - t0
        fns = {n: jax.jit(lambda a, k=k: k(**a)) for n, k in (("default", default), ("chunked", chunked),
                                                                 ("sequential", seq))}
        ms = best_of(fns, xs, args.runs)
        dims = " ".join(f"{d}={n}" for d, n in sizes.items())
        print(f"{name:8s} {dims:34s} {ms['default']:9.2f} {autoschedule.chosen_form(default):>10s} "
              f"{ms['chunked']:9.2f} {ms['sequential']:10.2f} {ms['default'] / ms['sequential']:7.2f} "
              f"{ms['chunked'] / ms['sequential']:9.2f} {first:10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
