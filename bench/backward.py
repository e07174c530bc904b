"""Forward+backward of the Mamba2 layer on a GPU: ssmc-triton's derived backward kernels (passes/adjoint.py)
against mamba_ssm's `mamba_chunk_scan_combined` with torch autograd, in one process on the same values.

loss = sum(y * w) with a fixed random w; gradients w.r.t. x, dt, A, B, C, D. Mixed precision as models hold
the inputs: x, dt, B, C bfloat16, A and D float32 (anchors.make_inputs(dtype="mixed")). Shapes: S1-S3 of
bench/gpu.py and b=1 L=65536 with S1's heads.

    python3 bench/backward.py [--shapes S1 S2 S3 L64K] [--repeats 20]

Timing: a host loop of 10 back-to-back calls per sample ended by a sync, median (bench/gpu.py's time_jax /
time_torch_loop); ssmc's is jax.jit(jax.grad(loss)). Peak memory: torch's max_memory_allocated over one
forward+backward minus the inputs' bytes; ssmc's from XLA's accounting of the compiled forward+backward (temp +
output bytes: everything besides the inputs, the Triton kernels' buffers included). Gradients: each of ssmc's
against mamba_ssm's (rel. L2), and both against ssmc-xla's jax.grad in float32 on the same rounded values at every
shape (--no-ref: S1 and S3 only), so a disagreement says which side is off. The table is printed and written to
$OUT/backward.json when $OUT is set.
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

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # jax and torch share the GPU

SPEC = str(ROOT / "examples" / "mamba2.ssm")
SHAPES = {"S1": dict(b=4, l=2048, h=80, p=64, n=128, g=1),
          "S2": dict(b=4, l=8192, h=80, p=64, n=128, g=1),
          "S3": dict(b=8, l=4096, h=32, p=64, n=64, g=1),
          "L64K": dict(b=1, l=65536, h=80, p=64, n=128, g=1)}
ORDER = ("x", "dt", "A", "B", "C", "D")
# compile's backward_matmul -> (record key prefix, label): the default, then the bf16-dot backward
BACKWARD_MATMUL = {"float32": ("ssmc", "fp32"), "auto": ("ssmc_bf16bwd", "bf16")}


def rel(a, b) -> float:
    import torch
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _tag(base: str, q) -> str:
    """The record key prefix of one ssmc setting: the backward dots' tag, and the chunk length when one is forced."""
    return base if q is None else f"{base}_q{q}"


def run_shape(name, s, repeats, check_ref, profile=False, matmuls=tuple(BACKWARD_MATMUL), chunks=(None,)):
    import jax
    import jax.numpy as jnp
    import torch

    import anchors as an
    import gpu
    import ssmc
    st = an.make_inputs(s["b"], s["l"], s["h"], s["p"], s["n"], s["g"], "mixed", seed=1)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(7)
    w = torch.randn(s["b"], s["l"], s["h"], s["p"], generator=gen, device="cuda").to(torch.bfloat16)
    in_bytes = sum(t.numel() * t.element_size() for t in st.values()) + w.numel() * w.element_size()
    rec = dict(shape=name, **s)

    # ssmc: jax.grad through the triton kernel (its derived backward), with the backward's dots at full precision
    # (the default) and in bf16 (backward_matmul="auto": faster, the decays' gradient loses precision)
    js = tuple(an.to_jax(st[n]) for n in ORDER)
    jw = an.to_jax(w)
    all_grads = {}
    for bm, (tag0, _), q in [(bm, t, q) for bm, t in BACKWARD_MATMUL.items() for q in chunks]:
        if bm not in matmuls:
            continue
        tag = _tag(tag0, q)  # each chunk length timed side by side
        k = ssmc.compile(SPEC, target="triton", backward_matmul=bm, chunk_size=q)

        def loss(x, dt, A, B, C, D, w, k=k):
            return jnp.sum(k(x, dt, A, B, C, D)[0].astype(jnp.float32) * w.astype(jnp.float32))
        # value_and_grad: the loss needs the forward's y, as in training (jax.grad alone would let XLA drop the
        # forward kernel, whose value the gradient does not use)
        g = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))
        _, all_grads[tag] = jax.block_until_ready(g(*js, jw))
        rec["ssmc_backward"] = k.backward_note
        ma = g.lower(*js, jw).compile().memory_analysis()
        rec[f"{tag}_peak_MB"] = (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**20 + in_bytes / 2**20 \
            if ma is not None else None
        rec[f"{tag}_ms"] = gpu.time_jax(g, [(*js, jw)], repeats=repeats)
        if profile:
            rec[f"{tag}_kernels"] = kernel_times(lambda g=g: g(*js, jw))
        del g
    fwd = jax.jit(lambda *a: k(*a)[0])
    rec["ssmc_fwd_ms"] = gpu.time_jax(fwd, [js], repeats=repeats)

    # mamba_ssm: torch autograd through mamba_chunk_scan_combined
    f = an.mamba_chunk_scan_combined_fn()
    leaves = [st[n].detach().clone().requires_grad_(True) for n in ORDER]

    def torch_step():
        for t in leaves:
            t.grad = None
        x, dt, A, B, C, D = leaves
        y = f(x, dt, A, B, C, chunk_size=256, D=D)
        (y.float() * w.float()).sum().backward()
        return [t.grad for t in leaves]
    torch_step()
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tg = torch_step()
    torch.cuda.synchronize()
    rec["mamba_ssm_peak_MB"] = (torch.cuda.max_memory_allocated() - base + in_bytes) / 2**20
    rec["mamba_ssm_ms"] = gpu.time_torch_loop(lambda: torch_step(), [()], repeats=repeats)
    rec["mamba_ssm_fwd_ms"] = gpu.time_torch_loop(
        lambda: f(*[t.detach() for t in leaves[:5]], chunk_size=256, D=leaves[5].detach()), [()], repeats=repeats)
    if profile:
        rec["mamba_ssm_kernels"] = kernel_times(torch_step, sync=lambda o: torch.cuda.synchronize())
    for tag, grads in all_grads.items():
        rec[f"{tag}_ratio"] = rec[f"{tag}_ms"] / rec["mamba_ssm_ms"]
        for n, a, b in zip(ORDER, grads, tg):
            rec[f"err_{n}_{tag}_vs_mamba_ssm"] = rel(an.to_torch(a).float(), b.float())
    if check_ref:  # float32 jax.grad of ssmc-xla (matmuls at full precision) on the same rounded values
        kx = ssmc.compile(SPEC, target="xla", matmul="float32")

        def loss32(x, dt, A, B, C, D, w):
            return jnp.sum(kx(x, dt, A, B, C, D)[0] * w)
        ref = jax.jit(jax.grad(loss32, argnums=tuple(range(6))))(*[a.astype(jnp.float32) for a in js],
                                                                  jw.astype(jnp.float32))
        for k_, n in enumerate(ORDER):
            rr = an.to_torch(ref[k_]).float()
            for tag, grads in all_grads.items():
                rec[f"err_{n}_{tag}_vs_fp32"] = rel(an.to_torch(grads[k_]).float(), rr)
            rec[f"err_{n}_mamba_ssm_vs_fp32"] = rel(tg[k_].float(), rr)
    del all_grads, tg, leaves
    torch.cuda.empty_cache()
    return rec


def _worst(rec, tag) -> str:
    """The largest of a side's gradient errors against the float32 reference, with its input ("-" if not run)."""
    errs = {n: rec[f"err_{n}_{tag}_vs_fp32"] for n in ORDER if f"err_{n}_{tag}_vs_fp32" in rec}
    if not errs:
        return "-"
    n = max(errs, key=errs.get)
    return f"d{n} {errs[n]:.1e}"


def kernel_times(f, calls=5, top=30, sync=None) -> list:
    """Per GPU kernel: (name, calls per step, us per step) over `calls` steps of f, from torch's profiler (CUPTI
    records every kernel the process launches: XLA's fusions and the Triton kernels jax runs included)."""
    import jax
    import torch
    from torch.profiler import ProfilerActivity, profile
    sync = sync or jax.block_until_ready
    sync(f())
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            out = f()
        sync(out)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us:
            rows.append((e.key[:90], e.count / calls, us / calls))
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    print(f"  kernels per step: {total:.0f} us in all", flush=True)
    for name, n, us in rows[:top]:
        print(f"  {us:9.1f} us  x{n:4.1f}  {name}", flush=True)
    return [dict(name=n, calls=c, us=u) for n, c, u in rows[:top]] + [dict(name="(all)", us=total)]


def parts(name, s, repeats, matmul="auto", cancelling=False) -> list[dict]:
    """Each derived kernel of the Mamba2 layer (the forward storing the entering states, dq from such states, adj's
    state walk and its pieces from such states)
    alone at one shape, on the dtypes the backward feeds it (x, B, C, dt, dy bf16; log-decays fp32): where the
    backward's time goes. With `cancelling`, also the kernels of
    the form without the per-chunk pieces (whose dots then run at full precision, as a call would run them)."""
    import jax

    import gpu
    import ssmc
    from kernel_modules import random_input
    from ssmc.api import compile_program
    from ssmc.backward import Backward
    k = ssmc.compile(SPEC, target="triton", backward_matmul=matmul)
    sizes = dict(b=s["b"], t=s["l"], h=s["h"], p=s["p"], n=s["n"], g=s["g"])
    out = []
    for pairs in (True, False) if cancelling else (True,):
        bw = Backward(k, compile_program, pairs=pairs)
        sizes["t#"] = -(-s["l"] // bw.Q) if bw.Q else 0
        key = jax.random.PRNGKey(0)
        for kind, part, kk in bw.parts():
            ins = {}
            for n, dims in kk.inputs:
                key, sub = jax.random.split(key)
                ins[n] = random_input(n, [sizes[d] for d in dims], sub)
            opts = {}
            # as a call runs them: every chunk from given states (dq from the forward's, adj's pieces from adj_entering's)
            if (part == "dq" or part.startswith("adj:")) and bw.forward_kernel is not None:
                opts["entering"] = {}
                for n, dims in kk.states:
                    key, sub = jax.random.split(key)
                    opts["entering"][n] = random_input(n, [sizes["t#"]] + [sizes[d] for d in dims], sub)
            f = jax.jit(lambda i, kk=kk, opts=opts: kk.apply(i, **opts))
            rec = dict(shape=name, part=f"{kind} {part}", per_chunk=pairs, matmul=matmul)
            try:
                rec["ms"] = gpu.time_jax(f, [(ins,)], repeats=repeats)
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(json.dumps(rec), flush=True)
            out.append(rec)
    from ssmc.targets import triton_runtime as tr
    for kk, v in list(tr._TUNED.items())[-8:]:
        print("tuned", str(kk)[:160], v, flush=True)
    return out


def check_examples(seed=0) -> list[dict]:
    """Every example's gradients through ssmc-triton on this GPU (derived backward where the spec has one)
    against the full float64 finite-difference gradient of tests/reference.py's loops, on the CPU: small shapes
    with a partial last chunk, groups, random initial states and cotangents (tests/test_adjoint.py's problem)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import gpu
    import ssmc
    R = gpu.load_test_reference()
    tune = os.environ.get("SSMC_AUTOTUNE")
    os.environ["SSMC_AUTOTUNE"] = "0"  # correctness only: the heuristic configs (tuning is for the timings)
    tiny = {"mamba2": {"b": 2, "t": 37, "h": 4, "g": 2, "p": 8, "n": 16},
            "mamba2_gated": {"b": 1, "t": 37, "h": 4, "g": 2, "p": 8, "n": 16},
            "mamba2_conv": {"b": 1, "t": 37, "h": 4, "g": 2, "p": 8, "n": 16, "k": 4},
            "mamba1": {"b": 1, "t": 37, "d": 8, "n": 16}}
    kv = {"b": 1, "t": 37, "h": 2, "dk": 16, "dv": 16}
    out = []
    for name, v in R.VARIANTS.items():
        rng = np.random.default_rng(seed)
        dims = tiny.get(name, kv)
        inputs, init = v.make_inputs(rng, dims), v.make_initial_states(rng, dims)
        outs, states = v.reference(inputs, init)
        wo = [rng.standard_normal(o.shape) for o in outs]
        ws = [rng.standard_normal(x.shape) for x in states]
        rec = dict(example=name)
        try:
            k = ssmc.compile(str(v.path), target="triton", chunk_size=16)
            w = [jnp.asarray(x, jnp.float32) for x in wo + ws]
            one = len(v.state_names) == 1

            def loss(i, st):
                kw = dict(initial_state=st[v.state_names[0]]) if one else dict(initial_states=st)
                return sum(jnp.sum(r * c) for r, c in zip(k(**i, **kw), w))
            gi, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))({n: jnp.asarray(a) for n, a in inputs.items()},
                                                            {n: jnp.asarray(a) for n, a in init.items()})
            got = {**gi, **{"state:" + n: a for n, a in gs.items()}}
            want = R.reference_gradients(v, inputs, init, wo, ws)
            rec["backward"] = k.backward_note
            rec["max_rel_err"] = max(R.rel_l2(np.asarray(got[n], np.float64), g) for n, g in want.items())
            rec["ok"] = rec["max_rel_err"] < 1e-4
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(rec), flush=True)
        out.append(rec)
    if tune is None:
        os.environ.pop("SSMC_AUTOTUNE")
    else:
        os.environ["SSMC_AUTOTUNE"] = tune
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--check-examples", action="store_true", help="first: every example's gradients on the GPU "
                    "against the float64 references")
    ap.add_argument("--parts", nargs="*", default=[], choices=list(SHAPES), help="time each derived kernel "
                    "alone at these shapes, by segment count and out dtype (and nothing else)")
    ap.add_argument("--parts-cancelling", action="store_true", help="with --parts: also the kernels of the "
                    "cancelling form (fp32 dots; slow)")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of ssmc's forward+backward")
    ap.add_argument("--chunk-sizes", nargs="+", type=int, default=[None], help="ssmc's chunk lengths to time side "
                    "by side (default: the compiler's)")
    ap.add_argument("--no-ref", action="store_true", help="the float32 reference gradients at S1 and S3 only")
    ap.add_argument("--backward-matmul", nargs="+", default=list(BACKWARD_MATMUL), choices=list(BACKWARD_MATMUL),
                    help="the backward settings to time (compile's backward_matmul)")
    args = ap.parse_args()
    import anchors as an
    import jax
    if args.parts:
        for name in args.parts:
            parts(name, SHAPES[name], args.repeats, cancelling=args.parts_cancelling)
        return
    checks = check_examples() if args.check_examples else []
    recs = []
    for name in args.shapes:
        try:
            rec = run_shape(name, SHAPES[name], args.repeats, check_ref=not args.no_ref or name in ("S1", "S3"),
                            profile=args.profile, matmuls=args.backward_matmul, chunks=args.chunk_sizes)
        except Exception as e:  # noqa: BLE001
            rec = dict(shape=name, error=f"{type(e).__name__}: {str(e)[:400]}")
        recs.append(rec)
        print(json.dumps(rec), flush=True)
        # a short line per shape (the JSON above can be long), and the file written so far: a run cut off by a
        # time limit keeps every finished shape
        print("SUMMARY", name, {k: (round(v, 5) if isinstance(v, float) else v) for k, v in rec.items()
                                if not k.endswith("_kernels")}, flush=True)
        if os.environ.get("OUT"):
            pathlib.Path(os.environ["OUT"], "backward.json").write_text(
                json.dumps(dict(records=recs, checks=checks), indent=1))
    print("\nshape | backward dots | ssmc fwd+bwd ms | mamba_ssm fwd+bwd ms | ratio | ssmc peak MB | mamba_ssm peak MB "
          "| dA err vs mamba_ssm | worst grad err vs fp32: ssmc, mamba_ssm")
    for r in recs:
        if "error" in r:
            print(f"{r['shape']} | error: {r['error']}")
            continue
        for tag, dots in [(_tag(t, q), d + ("" if q is None else f" Q={q}"))
                          for t, d in BACKWARD_MATMUL.values() for q in args.chunk_sizes]:
            if f"{tag}_ms" in r:
                print(f"{r['shape']} | {dots} | {r[f'{tag}_ms']:.2f} | {r['mamba_ssm_ms']:.2f} | "
                      f"{r[f'{tag}_ratio']:.2f} | {r[f'{tag}_peak_MB'] or float('nan'):.0f} | "
                      f"{r['mamba_ssm_peak_MB']:.0f} | {r[f'err_A_{tag}_vs_mamba_ssm']:.1e} | "
                      f"{_worst(r, tag)}, {_worst(r, 'mamba_ssm')}")
    import torch
    env = dict(an.versions(), device=torch.cuda.get_device_name(0), jax_backend=jax.default_backend())
    print(json.dumps(env))
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "backward.json").write_text(
            json.dumps(dict(env=env, records=recs, checks=checks), indent=1))


if __name__ == "__main__":
    main()
