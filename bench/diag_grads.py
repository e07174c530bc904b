"""Diagnosis: ssmc-triton's gradients of the Mamba2 layer against ssmc-xla's float32 jax.grad and mamba_ssm's at
one shape, with checksums of the inputs before and after each call (an out-of-bounds store shows as a change).

    python3 bench/diag_grads.py SHAPE [chunk ...]      (DIAG_MM=auto,float32: the backward_matmul values
                                                       to try; DIAG_QUICK=1: no segments=1 run, no mamba_ssm)
"""
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _tree  # noqa: E402,F401

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def main():
    import jax
    import jax.numpy as jnp
    import torch

    import anchors as an
    import ssmc
    from backward import ORDER, SHAPES, SPEC, rel
    name = sys.argv[1]
    qs = [int(q) for q in sys.argv[2:]] or [64]
    s = SHAPES[name]
    st = an.make_inputs(s["b"], s["l"], s["h"], s["p"], s["n"], s["g"], "mixed", seed=1)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(7)
    w = torch.randn(s["b"], s["l"], s["h"], s["p"], generator=gen, device="cuda").to(torch.bfloat16)
    js = tuple(an.to_jax(st[n]) for n in ORDER)
    jw = an.to_jax(w)

    def sums():
        return [float(st[n].double().sum()) for n in ORDER] + [float(w.double().sum())]
    s0 = sums()
    kx = ssmc.compile(SPEC, target="xla", matmul="float32")

    def loss32(x, dt, A, B, C, D, w):
        return jnp.sum(kx(x, dt, A, B, C, D)[0] * w)
    f32 = [a.astype(jnp.float32) for a in js]
    ref = jax.jit(jax.grad(loss32, argnums=tuple(range(6))))(*f32, jw.astype(jnp.float32))
    yref = jax.jit(lambda *a: kx(*a)[0])(*f32)
    print("xla ref done; inputs unchanged:", sums() == s0, flush=True)
    mms = os.environ.get("DIAG_MM", "auto").split(",")
    quick = os.environ.get("DIAG_QUICK") == "1"
    for q in qs:
        for opts in [{"backward_matmul": mm} for mm in mms] + ([] if quick else [{"backward_matmul": mms[0], "segments": 1}]):
            k = ssmc.compile(SPEC, target="triton", chunk_size=q, **opts)

            def loss(x, dt, A, B, C, D, w, k=k):
                return jnp.sum(k(x, dt, A, B, C, D)[0].astype(jnp.float32) * w.astype(jnp.float32))
            y = jax.block_until_ready(jax.jit(lambda *a, k=k: k(*a)[0])(*js))
            g = jax.block_until_ready(jax.jit(jax.grad(loss, argnums=tuple(range(6))))(*js, jw))
            errs = {n: rel(an.to_torch(a).float(), an.to_torch(r).float()) for n, a, r in zip(ORDER, g, ref)}
            ye = rel(an.to_torch(y).float(), an.to_torch(yref).float())
            print(f"Q={q} {opts}: y {ye:.2e} grads vs fp32 " + " ".join(f"{n} {e:.2e}" for n, e in errs.items()),
                  "inputs unchanged:", sums() == s0, flush=True)
    if quick:
        return
    f = an.mamba_chunk_scan_combined_fn()
    leaves = [st[n].detach().clone().requires_grad_(True) for n in ORDER]
    yt = f(*leaves[:5], chunk_size=256, D=leaves[5])
    (yt.float() * w.float()).sum().backward()
    print("mamba_ssm: y", f"{rel(yt.float(), an.to_torch(yref).float()):.2e}", "grads vs fp32 " +
          " ".join(f"{n} {rel(t.grad.float(), an.to_torch(r).float()):.2e}" for n, t, r in zip(ORDER, leaves, ref)),
          "inputs unchanged:", sums() == s0, flush=True)


if __name__ == "__main__":
    main()
