#!/usr/bin/env python
"""ssmc.shard on two GPUs of one host against one GPU: the Mamba2-2.7B layer forward (h=80 p=64 n=128 g=1; x, dt,
B, C bfloat16, A and D float32 as models hold them) through target="triton".

    python3 bench/multi_gpu.py [--cases L128K L512K B8] [--repeats 10] [--grad]

Cases: b=1 L=131072 and b=1 L=524288 with the sequence split over 2 GPUs (`{"t": "sp"}`), b=8 L=8192 with the
batch split over 2 GPUs (`{"b": "dp"}`). Each (case, devices) runs in a fresh process, so the peak memory a device
reports (`memory_stats()["peak_bytes_in_use"]`) is that run's: inputs placed, one checked call, then the timing.
Timing: jax.jit of the call, 3 back-to-back calls per sample ended by block_until_ready, median of the samples
(inputs rotate among 2 fresh sets). The 2-GPU output is compared (rel L2) with the 1-GPU output on the same
inputs, both against an fp32 ssmc-xla run on a slice where that fits. NCCL's NVLink multicast stays off.
The table is printed and written to $OUT/multi_gpu.json when $OUT is set.
--grad: forward+backward instead, `jax.value_and_grad` of loss = sum(y * w) (w a fixed random bf16 array placed
like y) with respect to every input, through the derived backward kernels (a sequence split chains the adjoint's
parts across the GPUs); the 2-GPU gradients are compared with the 1-GPU ones (dx's last 4096 steps, dA, dD).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _tree  # noqa: E402,F401  (ssmc from the working tree, installed or not)
SPEC = str(ROOT / "examples" / "mamba2.ssm")
CASES = {  # name: (b, L, dim split, how many GPUs)
    "L128K": (1, 131072, "t"),
    "L512K": (1, 524288, "t"),
    "B8": (8, 8192, "b"),
}
H, P, N, G = 80, 64, 128, 1


def inputs(b, L, seed):
    import jax
    import jax.numpy as jnp
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    bf = jnp.bfloat16
    return {
        "x": jax.random.normal(ks[0], (b, L, H, P), bf),
        "dt": jax.nn.softplus(jax.random.normal(ks[1], (b, L, H), jnp.float32) - 3.0).astype(bf),
        "A": -jnp.exp(jax.random.uniform(ks[2], (H,), jnp.float32, 0.0, 2.5)),
        "B": jax.random.normal(ks[3], (b, L, G, N), bf),
        "C": jax.random.normal(ks[4], (b, L, G, N), bf),
        "D": jax.random.normal(ks[5], (H,), jnp.float32),
    }


def one(case: str, ndev: int, repeats: int, grad: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    import ssmc
    b, L, split = CASES[case]
    k = ssmc.compile(SPEC, target="triton")
    devs = jax.devices()[:ndev]
    sizes = {"b": b, "t": L, "h": H, "p": P, "n": N, "g": G}
    if ndev == 1:
        call = k
        place = lambda name, a: jax.device_put(a, devs[0])  # noqa: E731
        mode = "one GPU"
    else:
        axis = {"t": "sp", "b": "dp"}[split]
        mesh = Mesh(np.array(devs), (axis,))
        call = sk = ssmc.shard(k, mesh, {split: axis})
        place = lambda name, a: jax.device_put(a, sk.sharding(name, sizes))  # noqa: E731
        mode = f"{ndev} GPUs, {split} split ({sk.mode})"
    sets = [{n: place(n, a) for n, a in inputs(b, L, seed).items()} for seed in (1, 2)]
    if grad:  # forward+backward: the loss and the gradients of every input
        w = place("x", jax.random.normal(jax.random.PRNGKey(7), (b, L, H, P), jnp.bfloat16))

        def loss(kw):
            y, final = call(**kw)
            return jnp.sum(y.astype(jnp.float32) * w.astype(jnp.float32)) + jnp.sum(final)
        run = jax.jit(jax.value_and_grad(loss))
        mode += ", forward+backward"
    else:
        run = jax.jit(lambda kw: call(**kw))
    t0 = time.perf_counter()
    res = jax.block_until_ready(run(sets[0]))
    first_s = time.perf_counter() - t0
    for s in sets:
        jax.block_until_ready(run(s))
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for i in range(3):
            out = run(sets[i % 2])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / 3 * 1e3)
    peaks = [int((d.memory_stats() or {}).get("peak_bytes_in_use", 0)) for d in devs]
    tag = f"/tmp/multi_{case}_{ndev}{'_grad' if grad else ''}"
    rec = {"case": case, "b": b, "L": L, "devices": ndev, "mode": mode, "ms": statistics.median(times),
           "ms_min": min(times), "first_call_s": first_s, "peak_GiB": [p / 2**30 for p in peaks]}
    if grad:
        _, g = res
        np.save(f"{tag}_y.npy", np.asarray(jax.device_get(g["x"])).astype(np.float32)[:, -4096:])
        np.save(f"{tag}_h.npy", np.concatenate([np.asarray(jax.device_get(g[n])).astype(np.float32).ravel()
                                                for n in ("A", "D")]))
        return rec
    y, h = res
    y0 = np.asarray(jax.device_get(y)).astype(np.float32)
    h0 = np.asarray(jax.device_get(h)).astype(np.float32)
    # a cheap independent check on the first 2048 steps: fp32 ssmc-xla on the same values
    kx = ssmc.compile(SPEC, target="xla", matmul="float32")
    cut = {n: (np.asarray(jax.device_get(a)).astype(np.float32)[:, :2048] if a.ndim > 1 else
               np.asarray(jax.device_get(a)).astype(np.float32)) for n, a in sets[0].items()}
    yx = np.asarray(kx(**{n: jax.device_put(a, devs[0]) for n, a in cut.items()})[0])
    err = float(np.linalg.norm(y0[:, :2048] - yx) / np.linalg.norm(yx))
    np.save(f"{tag}_y.npy", y0[:, -4096:])
    np.save(f"{tag}_h.npy", h0)
    return {**rec, "err_first2048_vs_xla_fp32": err}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--one", nargs=2, metavar=("CASE", "NDEV"))
    ap.add_argument("--grad", action="store_true", help="forward+backward (value_and_grad of sum(y * w))")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one[0], int(args.one[1]), args.repeats, args.grad)), flush=True)
        return
    import numpy as np
    rows = []
    for case in args.cases:
        for ndev in (1, 2):
            extra = ["--grad"] if args.grad else []
            proc = subprocess.run([sys.executable, __file__, "--one", case, str(ndev), "--repeats",
                                   str(args.repeats)] + extra, capture_output=True, text=True, timeout=560)
            got = [json.loads(ln[7:]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not got:
                print(f"{case} x{ndev}: failed\n{proc.stderr[-3000:]}", flush=True)
                continue
            rows.append(got[0])
            print(json.dumps(got[0]), flush=True)
        try:  # the two runs on the same inputs (--grad: dx's tail, and dA, dD)
            g = "_grad" if args.grad else ""
            y1, y2 = (np.load(f"/tmp/multi_{case}_{n}{g}_y.npy") for n in (1, 2))
            h1, h2 = (np.load(f"/tmp/multi_{case}_{n}{g}_h.npy") for n in (1, 2))
            rows[-1]["rel_vs_one_gpu_y_last4096"] = float(np.linalg.norm(y2 - y1) / np.linalg.norm(y1))
            rows[-1]["rel_vs_one_gpu_h"] = float(np.linalg.norm(h2 - h1) / np.linalg.norm(h1))
        except (OSError, ValueError):
            pass
    what = "dx tail / dA, dD" if args.grad else "y tail / h"
    print(f"\n| case | devices | ms | speed-up | peak GiB per device | rel L2 vs 1 GPU ({what}) | err vs fp32 xla |")
    print("|---|---|---:|---:|---|---|---:|")
    base = {}
    for r in rows:
        if r["devices"] == 1:
            base[r["case"]] = r["ms"]
        up = base.get(r["case"], float("nan")) / r["ms"]
        vs = (f"{r['rel_vs_one_gpu_y_last4096']:.1e} / {r['rel_vs_one_gpu_h']:.1e}"
              if "rel_vs_one_gpu_h" in r else "")
        err = r.get("err_first2048_vs_xla_fp32", float("nan"))  # forward runs only
        print(f"| {r['case']} b={r['b']} L={r['L']} | {r['mode']} | {r['ms']:.2f} | {up:.2f}x | "
              f"{', '.join(f'{p:.2f}' for p in r['peak_GiB'])} | {vs} | {err:.1e} |")
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "multi_gpu.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
