"""Each derived backward kernel of Mamba2 on the GPU against the same program on the xla target (fp32 matmuls),
on the inputs the GPU kernel was given: which derived out (if any) is off, and the decay gradients' errors.

    python3 bench/backward_parts_check.py [--shape S1] [--autotune 0|1]

Prints one line per derived out: max abs error / max abs value (the xla value as the reference), then the gradients
of the whole call (the GPU's derived backward against fp32 jax.grad of the xla target).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import _tree  # noqa: E402,F401  (ssmc from this checkout: bench/_tree.py)
SHAPES = {"S1": dict(b=4, l=2048, h=80, p=64, n=128, g=1), "small": dict(b=1, l=1024, h=8, p=64, n=128, g=1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="S1", choices=list(SHAPES))
    ap.add_argument("--autotune", default="1")
    ap.add_argument("--interpret", action="store_true", help="Triton's interpreter on the CPU (small shapes)")
    ap.add_argument("--matmul", default="auto", help="the kernels' matmul operands: auto (the activations' dtype) or "
                    "float32")
    args = ap.parse_args()
    os.environ["SSMC_AUTOTUNE"] = args.autotune
    import jax
    import jax.numpy as jnp
    import numpy as np

    import anchors as an
    import ssmc
    s = SHAPES[args.shape]
    st = an.make_inputs(s["b"], s["l"], s["h"], s["p"], s["n"], s["g"], "mixed", seed=1,
                        device="cpu" if args.interpret else "cuda")
    order = ("x", "dt", "A", "B", "C", "D")
    ins = {n: an.to_jax(st[n]) for n in order}
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.standard_normal((s["b"], s["l"], s["h"], s["p"])), jnp.float32)
    spec = (ROOT / "examples" / "mamba2.ssm").read_text()
    from ssmc.api import compile_program
    k = ssmc.compile(spec, target="triton", interpret=args.interpret, matmul=args.matmul)
    kx = ssmc.compile(spec, target="xla", matmul="float32")
    bw = k._derived_backward()
    rec = {}
    for part, kk in bw.kernels.items():
        orig = kk.apply

        def spy(inputs, initial_states=None, cu_seqlens=None, _o=orig, _p=part):
            res = _o(inputs, initial_states, cu_seqlens=cu_seqlens)
            rec[_p] = (dict(inputs), initial_states, res)
            return res
        kk.apply = spy
    meta, arrays = k._bound((), dict(ins), None, {}, None)
    cts = {"y": w, "state:h": jnp.zeros((s["b"], s["h"], s["p"], s["n"]), jnp.float32)}
    grads = bw.vjp(meta, arrays, cts, jnp.float32)
    jax.block_until_ready(grads)
    for part, (inputs, init, res) in rec.items():
        kp = compile_program(bw.d.programs[part], target="xla", pipeline=kx.pipeline, matmul="float32")
        f32 = {n: jnp.asarray(v, jnp.float32) for n, v in inputs.items()}
        i32 = None if init is None else {n: jnp.asarray(v, jnp.float32) for n, v in init.items()}
        ref = kp.apply(f32, i32)
        names = [n for n, _ in kp.outs] + ["final:" + n for n, _ in kp.states]
        for n, got, r in zip(names, res, ref):
            a, r = np.asarray(got, np.float64), np.asarray(r, np.float64)
            print(f"{args.shape} autotune={args.autotune} {part}.{n} dtype={got.dtype} "
                  f"err={np.abs(a - r).max() / max(np.abs(r).max(), 1e-30):.3e} "
                  f"rel2={np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30):.3e}", flush=True)
    def loss32(*a):
        return jnp.sum(kx(*a)[0] * w)
    ref = jax.grad(loss32, argnums=tuple(range(6)))(*[ins[n].astype(jnp.float32) for n in order])
    for n, r in zip(order, ref):
        a = np.asarray(grads[n], np.float64)
        r = np.asarray(r, np.float64)
        err = np.linalg.norm(a - r) / np.linalg.norm(r)
        print(f"{args.shape} autotune={args.autotune} matmul={args.matmul} grad {n}: rel {err:.3e}", flush=True)


if __name__ == "__main__":
    main()
