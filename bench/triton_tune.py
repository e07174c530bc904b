#!/usr/bin/env python
"""Sweep the configs of ssmc's generated Triton kernel for one spec and shape on a GPU: time (CUDA events,
triton.testing.do_bench median), registers and spills per (Q, blocks, num_warps, num_stages).

    python bench/triton_tune.py --shape S1 --dtype bf16          # examples/mamba2.ssm at the Mamba2-2.7B shape

The kernel is launched straight from torch tensors (no jax in the loop), so the numbers are the kernel's own.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import gpu  # noqa: E402,F401  (finds ssmc in an uninstalled checkout)

SHAPES = {"S1": dict(b=4, t=2048, h=80, p=64, n=128, g=1), "S2": dict(b=4, t=8192, h=80, p=64, n=128, g=1),
          "S3": dict(b=8, t=4096, h=32, p=64, n=64, g=1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="examples/mamba2.ssm")
    ap.add_argument("--shape", default="S1", choices=list(SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--qs", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--bp", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args()

    import jax.numpy as jnp
    import torch
    import triton

    import ssmc
    from ssmc.targets import kernel_runtime as kr
    from ssmc.targets import triton_runtime as tr

    s = SHAPES[args.shape]
    k = ssmc.compile(args.spec, target="triton")
    mod = k._module
    kernel = getattr(mod, next(n for n in dir(mod) if n.endswith("_chunked") or n.endswith("_sequential")))
    layout = mod.LAYOUT
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    mm = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    g = torch.Generator(device="cuda").manual_seed(0)
    b, t, h, p, n, G = s["b"], s["t"], s["h"], s["p"], s["n"], s["g"]
    arrays = {
        "x": torch.randn(b, t, h, p, device="cuda", generator=g).to(dt),
        "dt": (torch.rand(b, t, h, device="cuda", generator=g) * 0.1 + 0.01).to(dt),
        "A": -torch.rand(h, device="cuda", generator=g).to(dt) - 0.5,
        "B": torch.randn(b, t, G, n, device="cuda", generator=g).to(dt),
        "C": torch.randn(b, t, G, n, device="cuda", generator=g).to(dt),
        "D": torch.randn(h, device="cuda", generator=g).to(dt),
        "h": torch.randn(b, h, p, n, device="cuda", generator=g) * 0.1,
    }
    sizes = {d: int(x) for name, a in arrays.items() for d, x in zip(layout["arrays"][name], a.shape)}
    ins = [arrays[nm] for nm in layout["inputs"]]
    specs = kr.out_specs(layout, sizes, jnp.bfloat16 if args.dtype == "bf16" else jnp.float32)
    tdt = {jnp.dtype(jnp.bfloat16): torch.bfloat16, jnp.dtype(jnp.float32): torch.float32}
    outs = [torch.empty(shape, dtype=tdt[jnp.dtype(d)], device="cuda") for shape, d in specs]
    nbytes = sum(a.numel() * a.element_size() for nm, a in arrays.items() if nm in ("x", "dt", "B", "C")) + \
        outs[0].numel() * outs[0].element_size()
    rows = []
    ref = None
    for Q, bp, nw, ns in itertools.product(args.qs, args.bp, args.warps, args.stages):
        blocks = {d: kr.pow2_block(sizes[d]) for d in layout["tile"]}
        for d in layout["split"]:
            blocks[d] = min(blocks[d], bp)
        cfg = {"blocks": blocks, "Q": Q, "num_warps": nw, "num_stages": ns}
        meta = tr._meta(layout, sizes, cfg, mm)
        grid = kr.grid(layout, sizes, blocks)
        try:
            ck = kernel[grid](*ins, *outs, num_warps=nw, num_stages=ns, **meta)
            torch.cuda.synchronize()
            y = outs[0].float().clone()
            if ref is None:
                ref = y
            err = ((y - ref).norm() / ref.norm()).item()
            ms = triton.testing.do_bench(lambda: kernel[grid](*ins, *outs, num_warps=nw, num_stages=ns, **meta),
                                         warmup=25, rep=100, return_mode="median")
            row = dict(Q=Q, bp=bp, warps=nw, stages=ns, ms=ms, regs=getattr(ck, "n_regs", None),
                       spills=getattr(ck, "n_spills", None), err_vs_first=err, GBps=nbytes / ms / 1e6)
        except Exception as e:  # noqa: BLE001
            row = dict(Q=Q, bp=bp, warps=nw, stages=ns, error=f"{type(e).__name__}: {str(e)[:200]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    print(f"\n{args.spec} {args.shape} {args.dtype}: best 8 of {len(ok)}")
    for r in ok[:8]:
        print(r)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"tune_{args.shape}_{args.dtype}.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
