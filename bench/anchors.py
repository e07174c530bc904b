"""Hand-written Mamba2 kernels to measure ssmc against (the "anchors"), run on torch CUDA tensors.

    python bench/anchors.py            # check both anchors against a float64 numpy reference (needs a GPU)

Anchors:
- mamba_ssm 2.3.2.post1 `mamba_chunk_scan_combined` (Triton SSD kernels). Only the sdist's Python package is
  used: it lies in .anchors/mamba_ssm (ignored by git, carried to the device machine). `register_mamba_ssm()`
  puts a bare `mamba_ssm` package module in sys.modules whose __path__ points there, so mamba_ssm/__init__.py
  (which imports the selective-scan CUDA extension and the model classes) never runs. Nothing else is stubbed:
  ssd_combined and the modules it imports (ssd_bmm, ssd_chunk_state, ssd_state_passing, ssd_chunk_scan,
  layernorm_gated, k_activations, softplus, utils.determinism, utils.torch) need only torch, triton, einops and
  packaging; its `causal_conv1d` import is wrapped in try/except ImportError by mamba_ssm itself, and
  `selective_scan_fn` / `selective_scan` (CUDA extension) are imported only inside reference functions we don't
  call. `selective_state_update` (decode step) is pure Triton too.
- fla-core 0.6.0 `fla.ops.simple_gla.chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None,
  initial_state=None, output_final_state=False, state_v_first=False, cu_seqlens=None, ...)`, layout
  [B, T, H, K] (not head-first: `head_first` was removed). Mamba2 as simple GLA: q = C, k = B (expanded from
  groups to heads), v = x * dt, g = dt * A (per-step log decay per head), scale = 1; then y = o + D * x.

Inputs (`make_inputs`) are drawn once in float32 on the GPU with torch, rounded to the benchmark dtype, so every
implementation sees identical values; `to_jax` hands them to jax through DLPack (numpy fallback).
"""
from __future__ import annotations

import importlib.machinery
import os
import pathlib
import re
import sys
import types

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
ANCHORS = ROOT / ".anchors"
MAMBA_DIR = ANCHORS / "mamba_ssm"


# ----------------------------------------------------------------------------------------------------------
# imports
# ----------------------------------------------------------------------------------------------------------

_TRITON_CACHE_DIR = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


def guard_triton_cache():
    """jax_triton 0.3.1 sets os.environ["TRITON_CACHE_DIR"] = "" when imported (jax_triton/triton_lib.py); after
    that every torch-side Triton compile, and triton.testing.do_bench, fails with "Could not create or locate
    cache dir" (seen on the H100). Put a real directory back; call after anything may have imported jax_triton."""
    if not os.environ.get("TRITON_CACHE_DIR"):
        os.environ["TRITON_CACHE_DIR"] = _TRITON_CACHE_DIR


def register_mamba_ssm() -> types.ModuleType:
    """A bare `mamba_ssm` package (no __init__ run) whose submodules load from .anchors/mamba_ssm."""
    mod = sys.modules.get("mamba_ssm")
    if mod is not None:
        return mod
    init = MAMBA_DIR / "__init__.py"
    if not init.is_file():
        raise ImportError(f"{MAMBA_DIR} missing: copy the mamba-ssm sdist's mamba_ssm/ folder there "
                          f"(see bench/gpu.py's docstring) and carry .anchors to the device")
    mod = types.ModuleType("mamba_ssm")
    spec = importlib.machinery.ModuleSpec("mamba_ssm", None, is_package=True)
    spec.submodule_search_locations = [str(MAMBA_DIR)]
    mod.__spec__ = spec
    mod.__path__ = [str(MAMBA_DIR)]
    mod.__package__ = "mamba_ssm"
    m = re.search(r'__version__\s*=\s*"([^"]+)"', init.read_text())
    mod.__version__ = m.group(1) if m else "unknown"
    sys.modules["mamba_ssm"] = mod
    return mod


def mamba_chunk_scan_combined_fn():
    guard_triton_cache()
    register_mamba_ssm()
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    return mamba_chunk_scan_combined


def selective_state_update_fn():
    guard_triton_cache()
    register_mamba_ssm()
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    return selective_state_update


def chunk_simple_gla_fn():
    guard_triton_cache()
    from fla.ops.simple_gla import chunk_simple_gla
    return chunk_simple_gla


def versions() -> dict:
    import importlib.metadata as md
    out = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "triton", "torch", "jax-triton", "fla-core", "numpy",
                 "einops", "lark", "ssmc"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if out["ssmc"] is None:   # not installed: imported from the working tree
        m = re.search(r'__version__\s*=\s*"([^"]+)"', (ROOT / "ssmc" / "__init__.py").read_text())
        out["ssmc"] = (m.group(1) if m else "?") + " (working tree)"
    try:
        out["mamba_ssm"] = register_mamba_ssm().__version__ + " (.anchors, sources only)"
    except ImportError as e:
        out["mamba_ssm"] = f"missing: {e}"
    return out


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
          "fp16": "float16", "float16": "float16", "mixed": "bfloat16"}
# "mixed": the convention of every Mamba2 checkpoint - activations x, dt, B, C in bf16, the parameters A, D fp32
PARAMS_FP32 = {"mixed": ("A", "D")}


def torch_dtype(name: str):
    import torch
    return getattr(torch, DTYPES[name])


def make_inputs(b, l, h, p, n, g, dtype="bf16", seed=0, device="cuda") -> dict:
    """Mamba2 inputs as torch tensors: x [b,l,h,p], dt [b,l,h] > 0 (softplus already applied), A [h] < 0,
    B, C [b,l,g,n], D [h]. Drawn in float32, then every tensor is rounded to `dtype` (values are identical in
    every implementation; anchors get A, D upcast back to float32, which is exact). dtype "mixed" keeps A and D
    in float32 (as models hold them) and rounds the activations to bf16."""
    import torch
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    f32 = torch.float32

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=f32)

    td = torch_dtype(dtype)
    out = {
        "x": randn(b, l, h, p),
        "dt": torch.nn.functional.softplus(randn(b, l, h) - 2.0),
        "A": -torch.exp(2.0 * torch.rand(h, generator=gen, device=device, dtype=f32)),
        "B": randn(b, l, g, n),
        "C": randn(b, l, g, n),
        "D": randn(h),
    }
    keep = PARAMS_FP32.get(dtype, ())
    return {k: (v if k in keep else v.to(td)).contiguous() for k, v in out.items()}


def make_gla_inputs(b, l, h, dk, dv, seed=0, device="cuda") -> dict:
    """GLA inputs as fla's chunk_gla takes them: q, k, v [b,l,h,d] bf16 and the log-gate g [b,l,h,dk] fp32
    (logsigmoid(raw)/16, as fla's GLA layer; in (-inf, 0))."""
    import torch
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    bf = torch.bfloat16
    return {"q": (randn(b, l, h, dk) * dk ** -0.5).to(bf).contiguous(), "k": randn(b, l, h, dk).to(bf).contiguous(),
            "v": randn(b, l, h, dv).to(bf).contiguous(),
            "g": (torch.nn.functional.logsigmoid(randn(b, l, h, dk) + 2.0) / 16).contiguous()}


def chunk_gla_fn():
    guard_triton_cache()
    from fla.ops.gla import chunk_gla
    return chunk_gla


def fla_gla(q, k, v, g):
    """fla's chunk_gla, no scale (ssmc's spec has none), no states: o [b,l,h,dv] in v's dtype."""
    o, _ = chunk_gla_fn()(q, k, v, g=g, scale=1.0, initial_state=None, output_final_state=False)
    return o


def to_jax(t):
    """torch tensor -> jax array on its device (DLPack, zero copy; numpy round trip as fallback)."""
    import jax.numpy as jnp
    import torch
    if t.is_cuda:
        torch.cuda.synchronize()
    try:
        return jnp.from_dlpack(t.contiguous())
    except Exception:  # noqa: BLE001  (older/odd combinations: go through the host, exactly)
        return jnp.asarray(t.float().cpu().numpy()).astype(DTYPES[str(t.dtype).split(".")[-1]])


def to_torch(a):
    """jax array -> torch CUDA tensor (DLPack; numpy fallback)."""
    import jax
    import torch
    jax.block_until_ready(a)
    try:
        return torch.from_dlpack(a)
    except Exception:  # noqa: BLE001
        return torch.from_numpy(np.asarray(a, np.float32)).cuda().to(torch_dtype(str(a.dtype)))


# ----------------------------------------------------------------------------------------------------------
# anchors
# ----------------------------------------------------------------------------------------------------------

def mamba_ssm_forward(x, dt, A, B, C, D, chunk_size=256):
    """mamba_ssm's SSD kernels: y [b,l,h,p] in x's dtype. dt is used as given (no softplus, no bias)."""
    f = mamba_chunk_scan_combined_fn()
    return f(x, dt, A.float(), B, C, chunk_size=chunk_size, D=D.float())


def fla_prepare(x, dt, A, B, C):
    """Mamba2 -> simple GLA operands, [B, T, H, ...] layout: q = C, k = B expanded to heads, v = x*dt (computed
    in fp32, stored in x's dtype), g = dt*A (fp32 log decay per step and head)."""
    h = x.shape[2]
    rep = h // B.shape[2]
    q = C.repeat_interleave(rep, dim=2).contiguous()
    k = B.repeat_interleave(rep, dim=2).contiguous()
    v = (x.float() * dt.float()[..., None]).to(x.dtype).contiguous()
    g = (dt.float() * A.float()[None, None, :]).contiguous()
    return q, k, v, g


def fla_kernel(q, k, v, g):
    o, _ = chunk_simple_gla_fn()(q, k, v, g=g, scale=1.0, initial_state=None, output_final_state=False)
    return o


def fla_forward(x, dt, A, B, C, D):
    """fla's chunk_simple_gla as Mamba2, end to end from Mamba2 inputs (expansion, v, g and the D*x term
    included): y [b,l,h,p] in x's dtype."""
    q, k, v, g = fla_prepare(x, dt, A, B, C)
    o = fla_kernel(q, k, v, g)
    return (o.float() + D.float()[None, None, :, None] * x.float()).to(x.dtype)


def selective_state_update(state, x, dt, A, B, C, D):
    """One Mamba2 decode step with mamba_ssm's kernel, updating `state` [b,h,p,n] in place; returns y [b,h,p].
    A, dt, D (and a zero dt_bias) are broadcast over p (and n) with stride 0 as Mamba2.step does, which selects
    the kernel's tied-head-dim path (it needs a dt_bias tensor to do so; dt is used as given, no softplus)."""
    import torch
    f = selective_state_update_fn()
    h, p, n = state.shape[1:]
    A_ = A.float()[:, None, None].expand(h, p, n)
    dt_ = dt[:, :, None].expand(dt.shape[0], h, p)
    D_ = D.float()[:, None].expand(h, p)
    bias = torch.zeros(h, device=x.device, dtype=dt.dtype)[:, None].expand(h, p)
    return f(state, x, dt_, A_, B, C, D=D_, z=None, dt_bias=bias, dt_softplus=False)


# ----------------------------------------------------------------------------------------------------------
# float64 reference
# ----------------------------------------------------------------------------------------------------------

def ref_mamba2_np(x, dt, A, B, C, D, h0=None):
    """Sequential float64 Mamba2 (loop over t, vectorised over b, h): h_t = exp(dt A) h + dt x⊗B; y = C·h + D x.
    Arrays: numpy (any float dtype). Returns (y [b,l,h,p], h_final [b,h,p,n])."""
    x, dt, A, B, C, D = (np.asarray(a, np.float64) for a in (x, dt, A, B, C, D))
    b, l, nh, p = x.shape
    gr, n = B.shape[2], B.shape[3]
    rep = nh // gr
    st = np.zeros((b, nh, p, n)) if h0 is None else np.asarray(h0, np.float64).copy()
    y = np.empty((b, l, nh, p))
    for t in range(l):
        Bt = np.repeat(B[:, t], rep, axis=1)                  # b,h,n
        Ct = np.repeat(C[:, t], rep, axis=1)
        dtt = dt[:, t]                                        # b,h
        st = np.exp(dtt * A)[:, :, None, None] * st + (dtt[:, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        y[:, t] = np.einsum("bhn,bhpn->bhp", Ct, st) + D[None, :, None] * x[:, t]
    return y, st


def np64(t) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float64)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))


TOL = {"bf16": 1e-2, "fp32": 1e-3}
# fp32 inputs: Triton's tl.dot takes fp32 operands at TF32 by default on Hopper; with that both anchors land at
# 1.35e-3 against float64 (H100, l=300, n=64: the operands' rounding to 10 mantissa bits, common to any TF32
# kernel), over the 1e-3 bound. bench/gpu.py runs this check with TRITON_F32_DEFAULT=ieee (full-precision fp32
# dots; a cache-invalidating Triton variable, so the timing processes' TF32 kernels are not reused); a TF32 run
# needs TOL_TF32.
TOL_TF32 = 3e-3


def check_anchors(dims=None, dtypes=("fp32", "bf16"), seed=1) -> list[dict]:
    """Both anchors (and the decode step) against the float64 reference at a small shape, fresh random inputs;
    output poisoned (NaN) first where the anchor writes into a given buffer. Returns rows; 'ok' per row."""
    import torch
    d = dict(b=2, l=300, h=8, p=32, n=64, g=2)   # l not a chunk multiple; 1 < g < h
    d.update(dims or {})
    rows = []
    for i, dt_name in enumerate(dtypes):
        inp = make_inputs(d["b"], d["l"], d["h"], d["p"], d["n"], d["g"], dt_name, seed=seed + i)
        ref, _ = ref_mamba2_np(*(np64(inp[k]) for k in ("x", "dt", "A", "B", "C", "D")))
        f32 = os.environ.get("TRITON_F32_DEFAULT") or "tf32"
        tol = TOL[dt_name] if dt_name != "fp32" or f32 == "ieee" else TOL_TF32
        for name, fn in (("mamba_ssm", lambda: mamba_ssm_forward(**inp, chunk_size=256)),
                         ("fla", lambda: fla_forward(**inp))):
            try:
                y = fn()
                torch.cuda.synchronize()
                err = rel_l2(np64(y), ref)
                ok = bool(np.isfinite(np64(y)).all()) and err < tol and y.dtype == inp["x"].dtype
                rows.append(dict(check=name, dtype=dt_name, rel_err=err, ok=ok, tol=tol,
                                 f32_dot=f32 if dt_name == "fp32" else None))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(check=name, dtype=dt_name, ok=False, error=f"{type(e).__name__}: {e}"))
        # decode step: one step from a random state, against float64
        try:
            b, h, p, n, gr = d["b"], d["h"], d["p"], d["n"], d["g"]
            st = torch.randn(b, h, p, n, device="cuda", dtype=torch.float32)
            x1, dt1, B1, C1 = inp["x"][:, 0], inp["dt"][:, 0], inp["B"][:, 0], inp["C"][:, 0]
            st0 = np64(st)
            y1 = selective_state_update(st, x1, dt1, inp["A"], B1, C1, inp["D"])
            torch.cuda.synchronize()
            yr, sr = ref_mamba2_np(np64(x1)[:, None], np64(dt1)[:, None], np64(inp["A"]), np64(B1)[:, None],
                                   np64(C1)[:, None], np64(inp["D"]), h0=st0)
            ey, es = rel_l2(np64(y1), yr[:, 0]), rel_l2(np64(st), sr)
            rows.append(dict(check="mamba_ssm selective_state_update", dtype=dt_name, rel_err=max(ey, es),
                             ok=max(ey, es) < TOL[dt_name], tol=TOL[dt_name]))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(check="mamba_ssm selective_state_update", dtype=dt_name, ok=False,
                             error=f"{type(e).__name__}: {e}"))
    return rows


def main():
    import json
    print(json.dumps(versions()))
    rows = check_anchors()
    for r in rows:
        print(json.dumps(r))
    print("anchors check:", "OK" if all(r["ok"] for r in rows) else "FAILED")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
