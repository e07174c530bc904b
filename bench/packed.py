#!/usr/bin/env python
"""Packed variable-length sequences on a GPU: the Mamba2-2.7B layer forward (h=80 p=64 n=128 g=1; x, dt, B, C
bfloat16, A and D float32 as models hold them) over a packed batch, three ways in one process on the same values:

  ssmc-triton packed   k(..., cu_seqlens=cu): inputs [1, total, ...], one program per (sequence, head)
  ssmc-triton padded   the sequences padded to the longest as a batch [num_seqs, longest, ...] (what one does
                       without packing; its padded steps are wasted work)
  mamba_ssm packed     mamba_chunk_scan_combined(..., seq_idx=, cu_seqlens=, return_varlen_states=True)

    python3 bench/packed.py [--seqs 64] [--lo 64] [--hi 8192] [--seed 0] [--repeats 20]

Lengths are drawn log-uniformly from [lo, hi]. Timing: jax.jit / torch calls in a host loop of 10 back-to-back
calls per sample ended by a sync, median (bench/gpu.py's time_jax / time_torch_loop). Checks: ssmc packed's
outputs and per-sequence final states against mamba_ssm's and against ssmc-xla packed with fp32 matmuls (an
independent implementation of the packing: the chunk-aligned layout in jnp), rel. L2. The table is printed and
written to $OUT/packed.json when $OUT is set. Needs .whl and .anchors carried (bench/gpu.py's docstring).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _tree  # noqa: E402,F401  (ssmc from the working tree, installed or not)

SPEC = str(ROOT / "examples" / "mamba2.ssm")
H, P, N, G = 80, 64, 128, 1


def lengths(n, lo, hi, seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    return np.exp(rng.uniform(np.log(lo), np.log(hi), n)).astype(np.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--lo", type=int, default=64)
    ap.add_argument("--hi", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    import anchors as an
    import gpu
    import ssmc
    lens = lengths(args.seqs, args.lo, args.hi, args.seed)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    T, longest = int(cu[-1]), int(lens.max())
    print(f"{args.seqs} sequences, {T} tokens, lengths {lens.min()}..{longest} (median {int(np.median(lens))})",
          flush=True)
    rng = np.random.default_rng(args.seed + 1)
    bf = jnp.bfloat16
    vals = {"x": rng.standard_normal((1, T, H, P)), "dt": np.log1p(np.exp(rng.standard_normal((1, T, H)) - 3.0)),
            "A": -np.exp(rng.uniform(0.0, 2.5, H)), "B": rng.standard_normal((1, T, G, N)),
            "C": rng.standard_normal((1, T, G, N)), "D": rng.standard_normal(H)}
    dtypes = {"x": bf, "dt": bf, "A": jnp.float32, "B": bf, "C": bf, "D": jnp.float32}
    packed = {n: jnp.asarray(v, jnp.float32).astype(dtypes[n]) for n, v in vals.items()}
    cu_j = jnp.asarray(cu)
    k = ssmc.compile(SPEC, target="triton")
    rows = {}

    f_packed = jax.jit(lambda kw, c: k(**kw, cu_seqlens=c))
    y, h = jax.block_until_ready(f_packed(packed, cu_j))
    rows["ssmc-triton packed"] = gpu.time_jax(f_packed, [(packed, cu_j)], repeats=args.repeats)
    print("ssmc-triton packed", rows["ssmc-triton packed"], flush=True)

    # padded to the longest: [num_seqs, longest, ...] (zeros past each end)
    idx = np.minimum(cu[:-1, None] + np.arange(longest)[None, :], T - 1)
    inside = np.arange(longest)[None, :] < lens[:, None]

    def pad(name):
        a = packed[name]
        if a.ndim == 1:
            return a
        g = jnp.take(a[0], jnp.asarray(idx.reshape(-1)), axis=0).reshape((args.seqs, longest) + a.shape[2:])
        return jnp.where(jnp.asarray(inside).reshape(inside.shape + (1,) * (a.ndim - 2)), g, 0).astype(a.dtype)
    padded = {n: pad(n) for n in packed}
    f_padded = jax.jit(lambda kw: k(**kw))
    jax.block_until_ready(f_padded(padded))
    rows["ssmc-triton padded"] = gpu.time_jax(f_padded, [(padded,)], repeats=args.repeats)
    print("ssmc-triton padded", rows["ssmc-triton padded"], flush=True)
    del padded

    # mamba_ssm on the same values
    import torch
    f_m = an.mamba_chunk_scan_combined_fn()
    tt = {n: torch.from_numpy(np.asarray(jnp.asarray(v, jnp.float32))).cuda() for n, v in packed.items()}
    for n in ("x", "dt", "B", "C"):
        tt[n] = tt[n].to(torch.bfloat16)
    seq_idx = torch.from_numpy(np.repeat(np.arange(args.seqs), lens).astype(np.int32)).cuda()[None]
    cu_t = torch.from_numpy(cu.astype(np.int64)).cuda()

    def mamba(x, dt, A, B, C, D):
        return f_m(x, dt, A, B, C, chunk_size=256, D=D, seq_idx=seq_idx, cu_seqlens=cu_t, return_varlen_states=True)
    ym, hm = mamba(tt["x"], tt["dt"], tt["A"], tt["B"], tt["C"], tt["D"])
    torch.cuda.synchronize()
    sets = [(tt["x"], tt["dt"], tt["A"], tt["B"], tt["C"], tt["D"])]
    rows["mamba_ssm packed"] = gpu.time_torch_loop(mamba, sets, repeats=args.repeats)
    print("mamba_ssm packed", rows["mamba_ssm packed"], flush=True)

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))
    y0, h0 = np.asarray(jnp.asarray(y, jnp.float32)), np.asarray(h)
    checks = {"y vs mamba_ssm": rel(y0, ym.float().cpu().numpy()), "h vs mamba_ssm": rel(h0, hm.float().cpu().numpy())}
    # ssmc-xla packed, fp32 matmuls, on the first sequences (up to 16384 tokens)
    m = int(np.searchsorted(cu, 16384, side="right")) - 1
    m = max(m, 1)
    sub = {n: (v[:, :int(cu[m])] if v.ndim > 1 else v) for n, v in packed.items()}
    kx = ssmc.compile(SPEC, target="xla", matmul="float32")
    yx, hx = kx(**sub, cu_seqlens=jnp.asarray(cu[:m + 1]))
    checks["y vs ssmc-xla fp32 (first seqs)"] = rel(y0[:, :int(cu[m])], yx)
    checks["h vs ssmc-xla fp32 (first seqs)"] = rel(h0[:m], hx)

    print("\n| implementation | ms | tokens/s (M) | vs mamba_ssm |")
    print("|---|---:|---:|---:|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.3f} | {T / ms / 1e3:.1f} | {ms / rows['mamba_ssm packed']:.2f}x |")
    print("\nchecks (rel. L2): " + ", ".join(f"{n} {v:.1e}" for n, v in checks.items()))
    out = {"seqs": args.seqs, "tokens": T, "lengths": lens.tolist(), "ms": rows, "checks": checks,
           "versions": an.versions(), "device": jax.devices()[0].device_kind}
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "packed.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
