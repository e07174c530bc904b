#!/usr/bin/env python
"""Accuracy table: every example against its float64 numpy reference (tests/reference.py).

    python bench/accuracy.py --t 150

Max rel L2 error over all outs and final states, with random initial states, for the default schedule, chunk
length 16, the sequential scan (chunk_size=1), and bf16 inputs (reference computed on the bf16-rounded inputs).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ssmc  # noqa: E402
from reference import VARIANTS, rel_l2  # noqa: E402


def max_err(res, outs, finals) -> float:
    return max(rel_l2(np.asarray(jnp.asarray(a, jnp.float32)), b) for a, b in zip(res, tuple(outs) + tuple(finals)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", type=int, default=150)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print("| variant | default schedule | fp32 default | fp32 chunk 16 | fp32 sequential | bf16 inputs |")
    print("|---|---|---:|---:|---:|---:|")
    for name, v in VARIANTS.items():
        inp = v.make_inputs(rng, {"t": args.t})
        ini = v.make_initial_states(rng, {"t": args.t})
        outs, finals = v.reference(inp, ini)
        row = []
        for cs in (None, 16, 1):
            k = ssmc.compile(str(v.path), chunk_size=cs)
            row.append(max_err(k(**inp, initial_states=ini), outs, finals))
        k = ssmc.compile(str(v.path))
        schedule = next(ln for ln in k.ir.splitlines() if "# chunk:" in ln).split("# chunk: ")[1].split(" (")[0]
        bf = {n: jnp.asarray(a, jnp.bfloat16) for n, a in inp.items()}
        ro, rf = v.reference({n: np.asarray(a.astype(jnp.float32)) for n, a in bf.items()}, ini)
        row.append(max_err(k(**bf, initial_states=ini), ro, rf))
        print(f"| {name} | {schedule[:60]} | " + " | ".join(f"{e:.1e}" for e in row) + " |")


if __name__ == "__main__":
    main()
