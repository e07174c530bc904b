"""Does every tuning candidate of every Triton kernel give the same outputs? A Mamba2 forward+backward (the layer of
bench/backward.py) is traced once with the GPU launch recorded instead of run; each recorded kernel then runs on the
same random inputs under every config the tuner may pick (triton_runtime.candidates, the heuristic's first) and its
outputs are compared with the heuristic config's. A config that the compiler gets wrong shows as a large difference;
a right one differs by the reassociation of fp32 sums only.

    python3 bench/check_configs.py L64K [--chunk 64] [--backward-matmul auto] [--kernels dq fwd]
    python3 bench/check_configs.py tiny --interpret        # the same on the CPU (Triton's interpreter), small sizes
    python3 bench/check_configs.py L64K --kernels adj_entering --extra-splits 16   # configs the tuner does not offer

Every run also checks that a kernel left its inputs as they were (an out-of-bounds store into a neighbouring
buffer shows as a changed input): stop 28 saw the L65536 gradients of dt, A and C wrong whenever the tuner was
offered split blocks of 16 (docs/benchmarks.md).

Inputs: uniform in [1e-3, 1e-2] (as the tuner times them: every decay stays finite), offsets of packed sequences
as the launch had them.
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

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
SHAPES = {"tiny": dict(b=1, l=200, h=2, p=32, n=16, g=1), "S1": dict(b=4, l=2048, h=80, p=64, n=128, g=1),
          "S2": dict(b=4, l=8192, h=80, p=64, n=128, g=1), "L64K": dict(b=1, l=65536, h=80, p=64, n=128, g=1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=list(SHAPES))
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--backward-matmul", default="auto")
    ap.add_argument("--kernels", nargs="*", default=[], help="only kernels whose name contains one of these")
    ap.add_argument("--interpret", action="store_true", help="Triton's CPU interpreter (small shapes only)")
    ap.add_argument("--extra-splits", nargs="*", type=int, default=[], help="also configs with the split dims' "
                    "blocks capped at these sizes (4 and 8 warps, 1 and 2 stages)")
    args = ap.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ssmc
    from ssmc.targets import triton_runtime as tr

    s = SHAPES[args.shape]
    os.environ["SSMC_AUTOTUNE"] = "0"  # the trace must not tune (it records)
    k = ssmc.compile(str(ROOT / "examples" / "mamba2.ssm"), target="triton", chunk_size=args.chunk,
                     backward_matmul=args.backward_matmul)
    b, t, h, p, n, g = (s[x] for x in ("b", "l", "h", "p", "n", "g"))
    bf, f32 = jnp.bfloat16, jnp.float32
    shapes = (((b, t, h, p), bf), ((b, t, h), bf), ((h,), f32), ((b, t, g, n), bf), ((b, t, g, n), bf), ((h,), f32))
    with tr.recorded_launches() as launched:  # traced only: nothing runs
        jax.eval_shape(jax.grad(lambda *a: jnp.sum(k(*a)[0].astype(f32)), argnums=tuple(range(6))),
                       *[jax.ShapeDtypeStruct(sh, d) for sh, d in shapes])

    def run(kernel, layout, sizes, cfg, ins, specs, mm):
        if args.interpret:
            return tr._interpret(kernel, layout, sizes, cfg, ins, specs, mm)
        return jax.jit(lambda *a: tr._gpu_call(kernel, layout, sizes, cfg, a, specs, mm))(*ins)

    rng = np.random.default_rng(0)
    worst = 0.0
    for kernel, layout, sizes, _, ins, specs, mm in launched:
        name = getattr(kernel, "__name__", str(kernel))
        if args.kernels and not any(x in name for x in args.kernels):
            continue
        real = [jnp.asarray(x) if isinstance(x, np.ndarray) else
                jnp.asarray(rng.uniform(1e-3, 1e-2, x.shape).astype(np.float32)).astype(x.dtype) for x in ins]
        base = tr.heuristic(layout, sizes)
        ref = [np.asarray(o, np.float64) for o in run(kernel, layout, sizes, base, real, specs, mm)]
        cands = [base] if args.interpret else tr.candidates(layout, sizes, mm)
        for sb in args.extra_splits if layout["split"] else []:
            blocks = {d: min(bl, sb) if d in layout["split"] else bl for d, bl in base["blocks"].items()}
            cands += [dict(base, blocks=blocks, num_warps=nw, num_stages=ns) for nw in (4, 8) for ns in (1, 2)]
        kept = [np.asarray(x) for x in real]
        for cfg in cands:
            try:
                outs = run(kernel, layout, sizes, cfg, real, specs, mm)
            except Exception as e:  # noqa: BLE001  (the tuner skips a config that does not launch)
                print(json.dumps({"kernel": name, "config": cfg, "skipped": f"{type(e).__name__}"[:80]}), flush=True)
                continue
            changed = [i for i, (x, y) in enumerate(zip(real, kept)) if not np.array_equal(np.asarray(x), y)]
            if changed:
                worst = float("inf")
                print(json.dumps({"kernel": name, "config": cfg, "inputs_changed": changed}), flush=True)
            errs = []
            for o, r in zip(outs, ref):
                o = np.asarray(o, np.float64)
                errs.append(float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30)) if np.all(np.isfinite(o))
                            else float("inf"))
            worst = max([worst] + errs)
            print(json.dumps({"kernel": name, "config": cfg, "max_rel_diff": max(errs, default=0.0)}), flush=True)
    print(f"worst relative difference from the heuristic config: {worst:.2e} "
          f"({'configs agree' if worst < 1e-2 else 'SOME CONFIG DIFFERS'})")


if __name__ == "__main__":
    main()
