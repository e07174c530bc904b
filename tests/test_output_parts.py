"""`part` on chunk.output (passes/chunk_ops.py): "state" keeps only the state part exp(L_t) q_t · S_enter,
"straddle" only the in-chunk pairs around each row i, Σ_{t >= i} Σ_{s < i} M[t, s] (the derived backward's decay
gradient). A test-only pass sets the attribute on the chunked program of a spec whose readout contracts everything
but the decay's dims, and every target's code is checked against a float64 numpy loop that takes the chunks apart
the same way; absent `part` the value is the whole readout, state part plus in-chunk part, as before."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmc
from ssmc.api import compile_program
from ssmc.errors import TargetError
from ssmc.passes import PASSES
from ssmc.targets import get_target
from reference import rel_l2

# Mamba2's decay with a readout over the decay's dims [b,t,h] (the derived backward's <C ⊗ dy, S_t>)
PAIRS = """
ssm pairs {
  dims b, t, h, p, n
  scan t
  in x[b,t,h,p], dt[b,t,h], A[h], B[b,t,h,n], C[b,t,h,n], dy[b,t,h,p]
  state S[b,h,p,n]
  out r[b,t,h]
  S = exp(dt*A)*S + dt*B⊗x
  r = (C⊗dy)·S
}
"""
# two update products (ucoef 1, -0.5), a per-step scale and a constant among the readout's factors
PAIRS2 = """
ssm pairs2 {
  dims b, t, h, p, n
  scan t
  in x[b,t,h,p], dt[b,t,h], A[h], B[b,t,h,n], C[b,t,h,n], dy[b,t,h,p]
  state S[b,h,p,n]
  out r[b,t,h]
  S = exp(dt*A)*S + dt*B⊗x - 0.5*B⊗dy
  r = 0.5*(((dt*C)⊗dy)·S)
}
"""
SPECS = {"pairs": PAIRS, "pairs2": PAIRS2}
PARTS = (None, "state", "straddle")
DIMS = dict(b=2, t=37, h=3, p=4, n=5)  # t: two whole chunks of 16 and a partial one
Q = 16


@dataclasses.dataclass(frozen=True)
class SetPart:
    """Test-only pass: `part` on every chunk.output (the derived backward's pass sets it where it needs it); no
    part given: the program unchanged."""
    part: str = ""
    name = "test-output-part"

    def run(self, p):
        if not self.part:
            return p
        return p.with_instrs([i.with_attrs(part=self.part) if i.op == "chunk.output" else i for i in p.instrs])


@pytest.fixture(autouse=True)
def _register(monkeypatch):
    monkeypatch.setitem(PASSES, SetPart.name, SetPart)


@functools.lru_cache(maxsize=None)
def build(spec: str, target: str, part: str | None, chunk: int = Q):
    """The spec's program through `target`'s pipeline (chunk length `chunk`), then `part` set; kernels interpreted."""
    pipeline = get_target(target).pipeline(chunk) + (f",{SetPart.name}{{part={part}}}" if part else "")
    return compile_program(ssmc.check(spec), target, pipeline, interpret=target != "xla", cache=False)


def forward(k, ins: dict, S0, **options):
    """The generated entry on the arrays (no derivatives attached): (r, final state); options: the entry's (a
    kernel target's segments=)."""
    meta, arrays = k._bound((), dict(ins), None, {"S": S0})
    return k._entry(meta, arrays, **options)


def make_inputs(rng, dims=DIMS):
    b, T, h, p, n = (dims[d] for d in "bthpn")
    ins = dict(x=rng.standard_normal((b, T, h, p)), dt=rng.uniform(0.05, 0.6, (b, T, h)),
               A=-rng.uniform(0.3, 2.0, (h,)), B=rng.standard_normal((b, T, h, n)),
               C=rng.standard_normal((b, T, h, n)), dy=rng.standard_normal((b, T, h, p)))
    return ({k: np.asarray(v, np.float32) for k, v in ins.items()},
            np.asarray(rng.standard_normal((b, h, p, n)), np.float32))


def reference(spec: str, ins: dict, S0, chunk: int = Q) -> dict:
    """float64 loop: the readout r_t of the recurrence, and per chunk of `chunk` steps its state part
    X_t = exp(L_t) q_t · S_enter, its in-chunk part Σ_{s <= t} M[t, s] and the straddling pairs
    W_i = Σ_{t >= i} Σ_{s < i} M[t, s] (t, s within i's chunk and the sequence), M[t, s] = exp(L_t - L_s) q_t · u_s
    (the summand of row t from source s)."""
    x, dt, A, B, C, dy = (np.asarray(ins[k], np.float64) for k in ("x", "dt", "A", "B", "C", "dy"))
    S0 = np.asarray(S0, np.float64)
    T = x.shape[1]
    ell = dt * A  # log-decay [b, t, h]
    u = dt[..., None, None] * x[..., :, None] * B[..., None, :]  # [b, t, h, p, n]
    if spec == "pairs":
        q = C[..., None, :] * dy[..., :, None]  # [b, t, h, p, n]
    else:
        u = u - 0.5 * dy[..., :, None] * B[..., None, :]
        q = 0.5 * (dt[..., None] * C)[..., None, :] * dy[..., :, None]
    S, states, r = S0, [], np.zeros(ell.shape)
    for t in range(T):
        S = np.exp(ell[:, t])[..., None, None] * S + u[:, t]
        states.append(S)
        r[:, t] = np.einsum("bhpn,bhpn->bh", q[:, t], S)
    X, inner, W = (np.zeros(ell.shape) for _ in range(3))
    for c0 in range(0, T, chunk):
        c1 = min(c0 + chunk, T)
        enter = states[c0 - 1] if c0 else S0
        L = np.cumsum(ell[:, c0:c1], axis=1)  # [b, steps, h]
        M = np.zeros(L.shape[:2] + L.shape[1:])  # [b, t, s, h]
        for t in range(c1 - c0):
            X[:, c0 + t] = np.exp(L[:, t]) * np.einsum("bhpn,bhpn->bh", q[:, c0 + t], enter)
            for s in range(t + 1):
                M[:, t, s] = np.exp(L[:, t] - L[:, s]) * np.einsum("bhpn,bhpn->bh", q[:, c0 + t], u[:, c0 + s])
        inner[:, c0:c1] = M.sum(axis=2)
        for i in range(c1 - c0):
            W[:, c0 + i] = M[:, i:, :i].sum(axis=(1, 2))
    return {"r": r, "state": X, "in": inner, "straddle": W}


def run_parts(spec, target, rng, chunk=Q, dims=DIMS, **options):
    ins, S0 = make_inputs(rng, dims)
    ref = reference(spec, ins, S0, chunk)
    got = {part: forward(build(SPECS[spec], target, part, chunk), ins, S0, **options) for part in PARTS}
    return ref, got


def check_parts(ref, got, tol, what):
    errs = {}
    np.testing.assert_allclose(ref["state"] + ref["in"], ref["r"], rtol=1e-9, atol=1e-9)  # the loop's own split
    for part, want in ((None, ref["r"]), ("state", ref["state"]), ("straddle", ref["straddle"])):
        r, S = got[part]
        assert r.shape == want.shape and r.dtype == jnp.float32, (part, r.shape, r.dtype)
        errs[part] = rel_l2(np.asarray(r), want)
    # every part computes the same final state (the part only changes the readout)
    for part in ("state", "straddle"):
        np.testing.assert_array_equal(np.asarray(got[part][1]), np.asarray(got[None][1]))
    # absent `part`, the value is the state part plus the in-chunk part as before
    whole = np.asarray(got[None][0], np.float64)
    assert rel_l2(whole - np.asarray(got["state"][0], np.float64), ref["in"]) < tol, what
    assert all(e < tol for e in errs.values()), f"{what}: rel L2 errors {errs}"
    return errs


def test_reference_straddle():
    """The loop's W is 0 at each chunk's first step (no source before it) and not elsewhere."""
    rng = np.random.default_rng(0)
    ins, S0 = make_inputs(rng)
    ref = reference("pairs", ins, S0)
    W = ref["straddle"]
    assert np.all(W[:, ::Q] == 0)
    assert np.all(np.delete(W, np.s_[::Q], axis=1) != 0)


@pytest.mark.parametrize("spec", ["pairs", "pairs2"])
def test_xla(rng, spec):
    check_parts(*run_parts(spec, "xla", rng), 1e-5, f"xla {spec}")


@pytest.mark.slow
def test_xla_one_chunk_and_exact_chunks(rng):
    """A sequence shorter than one chunk, and one of whole chunks only (no padded steps)."""
    for t in (11, 32):
        check_parts(*run_parts("pairs", "xla", rng, dims=dict(DIMS, t=t)), 1e-5, f"xla t={t}")


def test_xla_bf16_inputs(rng):
    """bf16 activations: the readout's matmuls take bf16 operands (fp32 accumulation), the straddle sums its fp32
    summands (column sums minus row sums, then a masked sum: no matmul); outs in bf16."""
    ins, S0 = make_inputs(rng)
    low = {k: (jnp.asarray(v, jnp.bfloat16) if k in ("x", "B", "C", "dy") else jnp.asarray(v)) for k, v in ins.items()}
    ref = reference("pairs", {k: np.asarray(v.astype(jnp.float32)) for k, v in low.items()}, S0)
    for part, want in ((None, ref["r"]), ("state", ref["state"]), ("straddle", ref["straddle"])):
        k = build(PAIRS, "xla", part)
        r, _ = forward(k, low, S0)
        assert r.dtype == jnp.bfloat16
        assert rel_l2(np.asarray(r.astype(jnp.float32)), want) < 1e-2, part
    src = build(PAIRS, "xla", "straddle").source
    assert "r_d = jnp.sum(r_M, axis=" in src and "rt.causal(Q, True, 0)" in src


@pytest.mark.slow
def test_xla_float64(rng):
    """With x64 and float64 inputs the straddle runs in float64 (errors near 1e-12)."""
    ctx = getattr(jax, "enable_x64", None)
    with ctx(True) if ctx is not None else jax.experimental.enable_x64():
        ins, S0 = make_inputs(rng)
        ins64 = {k: jnp.asarray(v, jnp.float64) for k, v in ins.items()}
        ref = reference("pairs", ins, S0)
        r, _ = forward(build(PAIRS, "xla", "straddle"), ins64, jnp.asarray(S0, jnp.float64))
        assert r.dtype == jnp.float64
        assert rel_l2(np.asarray(r), ref["straddle"]) < 1e-12


@pytest.mark.parametrize("spec", ["pairs", "pairs2"])
def test_triton(rng, spec):
    check_parts(*run_parts(spec, "triton", rng), 1e-5, f"triton {spec}")


@pytest.mark.parametrize("spec", ["pairs", "pairs2"])
def test_tpu(rng, spec):
    check_parts(*run_parts(spec, "tpu", rng), 1e-5, f"tpu {spec}")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["triton", "tpu"])
def test_kernel_segments(rng, target):
    """Sequence-parallel segments (forced, 2 over 3 chunks): the segment-output walk enters each segment with its
    incoming state, so the state part is the same; the straddle never reads a state."""
    check_parts(*run_parts("pairs", target, rng, segments=2), 1e-5, f"{target} segments=2")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["xla", "triton", "tpu"])
def test_other_chunk_lengths(rng, target):
    """Chunks of 8 (the interpreters; tl.dot on a GPU needs chunks of 16 or more, as every in-chunk matmul does)
    and of 32, over 70 steps."""
    for chunk in (8, 32):
        check_parts(*run_parts("pairs", target, rng, chunk=chunk, dims=dict(DIMS, t=70)), 1e-5,
                    f"{target} chunk {chunk}")


def test_kernel_sources():
    """The kernels build the straddle from the [Q, Q] fp32 summands by two reductions (column sums minus row sums)
    and an exclusive cumsum, no matmul (no in-chunk part, no state part); part=state has no in-chunk part."""
    tri = build(PAIRS, "triton", "straddle").source
    assert "r_d = tl.sum(r_M, axis=0) - tl.sum(r_M, axis=1)" in tri
    assert "r_straddle = tl.cumsum(r_d, axis=0) - r_d" in tri
    assert "r_st =" not in tri and "r_in =" not in tri and "r_M), " not in tri
    pal = build(PAIRS, "tpu", "straddle").source
    assert "r_d = jnp.sum(r_M, axis=0) - jnp.sum(r_M, axis=1)" in pal and "r_straddle = rt.cumsum0(r_d) - r_d" in pal
    assert "r_st =" not in pal and "r_in =" not in pal
    for target in ("triton", "tpu"):
        src = build(PAIRS, target, "state").source
        assert "r_st =" in src and "r_in =" not in src and "r_D =" not in src
    xs = build(PAIRS, "xla", "state").source
    assert "r_st =" in xs and "r_in =" not in xs and "r_D =" not in xs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_lowers_for_tpu(dtype):
    """The Pallas kernel with part=straddle (and part=state) lowers for TPU (Mosaic) without a TPU, with fp32 or
    bf16 activations (x, B, C, dy)."""
    ins, S0 = make_inputs(np.random.default_rng(0), dict(DIMS, t=300))
    structs = {k: jax.ShapeDtypeStruct(v.shape, dtype if k in ("x", "B", "C", "dy") else jnp.float32)
               for k, v in ins.items()}
    s0 = jax.ShapeDtypeStruct(S0.shape, jnp.float32)
    for part in ("straddle", "state"):
        k = compile_program(ssmc.check(PAIRS), "tpu",
                            get_target("tpu").pipeline(Q) + f",{SetPart.name}{{part={part}}}", cache=False)
        exported = jax.export.export(jax.jit(lambda i, s: forward(k, i, s)), platforms=["tpu"])(structs, s0)
        assert "tpu_custom_call" in exported.mlir_module()
        assert len(exported.out_avals) == 2


# specs a part does not apply to: each raises a TargetError naming what is missing, on every target
PREV = PAIRS.replace("  S = exp(dt*A)*S + dt*B⊗x\n  r = (C⊗dy)·S\n",
                     "  r = (C⊗dy)·S\n  S = exp(dt*A)*S + dt*B⊗x\n")  # read before the update
KEPT = """
ssm kept {
  dims b, t, h, p, n
  scan t
  in x[b,t,h,p], dt[b,t,h], A[h], B[b,t,h,n], C[b,t,h,n]
  state S[b,h,p,n]
  out y[b,t,h,p]
  S = exp(dt*A)*S + dt*B⊗x
  y = C·S
}
"""
KEYWISE = """
ssm keywise {
  dims b, t, h, k, v
  scan t
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], g[b,t,h,k], dy[b,t,h,v]
  state S[b,h,k,v]
  out r[b,t,h]
  S = exp(g)*S + kk⊗vv
  r = (q⊗dy)·S
}
"""
SIGNED = """
ssm signed {
  dims b, t, h, p, n
  scan t
  in x[b,t,h,p], a[b,t,h], B[b,t,h,n], C[b,t,h,n], dy[b,t,h,p]
  state S[b,h,p,n]
  out r[b,t,h]
  S = a*S + B⊗x
  r = (C⊗dy)·S
}
"""


@pytest.mark.parametrize("target", ["xla", "triton", "tpu"])
@pytest.mark.parametrize("spec, part, msg", [
    (PREV, "straddle", "when=new"), (PREV, "state", "when=new"), (KEPT, "straddle", "out dims"),
    (KEYWISE, "straddle", "scalar positive decay"), (SIGNED, "straddle", "scalar positive decay"),
    (PAIRS, "both", "unknown part")], ids=["prev", "prev-state", "kept-dim", "keywise", "signed", "unknown"])
def test_unsupported_raises(target, spec, part, msg):
    with pytest.raises(TargetError, match=msg):  # (an SSMCError)
        build(spec, target, part)


# part=state applies to every chunked chunk.output read after the update: key-wise decays (in sub-chunks on the
# kernel targets, whose in-chunk part it leaves out altogether) and signed ones (the sign of exp(L_t)) too
OTHER = {"keywise": KEYWISE, "signed": SIGNED}


def other_inputs(spec, rng, b=2, T=37, h=3, X=4, Y=5):
    """Inputs of KEYWISE (k=X, v=Y) or SIGNED (p=X, n=Y), and (a, u, q) per step as arrays over [b, t, h, X, Y]."""
    r = rng.standard_normal
    if spec == "keywise":
        ins = dict(q=r((b, T, h, X)), kk=r((b, T, h, X)), vv=r((b, T, h, Y)), g=-rng.uniform(0.05, 0.6, (b, T, h, X)),
                   dy=r((b, T, h, Y)))
        a = np.exp(ins["g"])[..., :, None]
        u = ins["kk"][..., :, None] * ins["vv"][..., None, :]
        q = ins["q"][..., :, None] * ins["dy"][..., None, :]
    else:
        ins = dict(x=r((b, T, h, X)), a=rng.uniform(0.5, 1.0, (b, T, h)) * rng.choice([-1.0, 1.0], (b, T, h)),
                   B=r((b, T, h, Y)), C=r((b, T, h, Y)), dy=r((b, T, h, X)))
        a = ins["a"][..., None, None]
        u = ins["x"][..., :, None] * ins["B"][..., None, :]
        q = ins["dy"][..., :, None] * ins["C"][..., None, :]
    ins = {k: np.asarray(v, np.float32) for k, v in ins.items()}
    f64 = [np.asarray(np.asarray(x, np.float32), np.float64) for x in (a, u, q)]
    return ins, np.asarray(r((b, h, X, Y)), np.float32), f64


def state_reference(a, u, q, S0, chunk):
    """float64 loop for any diagonal decay: r_t = Σ q_t ⊙ S_t, and the state part Σ q_t ⊙ P_t where P walks the
    state entering t's chunk through the chunk's decays alone (P = S_enter at the chunk's start, then P = a_t ⊙ P)."""
    S = np.asarray(S0, np.float64)
    r, X = (np.zeros(a.shape[:3]) for _ in range(2))
    P = S
    for t in range(a.shape[1]):
        if t % chunk == 0:
            P = S  # the state entering this chunk
        P = a[:, t] * P
        S = a[:, t] * S + u[:, t]
        r[:, t] = (q[:, t] * S).sum(axis=(-2, -1))
        X[:, t] = (q[:, t] * P).sum(axis=(-2, -1))
    return r, X


@pytest.mark.slow
@pytest.mark.parametrize("target", ["xla", "triton", "tpu"])
@pytest.mark.parametrize("spec", ["keywise", "signed"])
def test_state_part_other_decays(rng, target, spec):
    ins, S0, (a, u, q) = other_inputs(spec, rng)
    r_ref, X_ref = state_reference(a, u, q, S0, Q)
    whole, _ = forward(build(OTHER[spec], target, None), ins, S0)
    state, _ = forward(build(OTHER[spec], target, "state"), ins, S0)
    assert rel_l2(np.asarray(whole), r_ref) < 1e-5
    assert rel_l2(np.asarray(state), X_ref) < 1e-5, rel_l2(np.asarray(state), X_ref)


# ---- compiled for the hardware without it (subprocesses: libtpu's Mosaic; Triton's sm_90 backend with ptxas) -------
def _run_here(what: str, env: dict) -> list[str]:
    import os
    import pathlib
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__)), what], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=900, cwd=str(pathlib.Path(__file__).parent))
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith(("OK ", "ERR "))]
    assert rows, f"{what}: no results (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return rows


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_compiles_with_mosaic_for_tpu():
    """With libtpu: XLA:TPU and Mosaic compile the part=straddle and part=state kernels ahead of time for a v5e
    device (layouts and relayouts of the [Q, Q] summands, the iota matrix and the fp32 dot), fp32 and bf16 inputs."""
    rows = _run_here("mosaic", {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    bad = [r for r in rows if not r.startswith("OK ")]
    assert len(rows) == 4 and not bad, rows


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_compiles_with_triton_for_sm90():
    """Triton's CUDA backend compiles the part=straddle and part=state kernels for sm_90 without a GPU (tl.dot's
    shape and dtype rules: the fp32 [Q, Q] x [Q, Q] dot at tf32x3 next to bf16 or fp32 operand dots)."""
    rows = _run_here("sm90", {"JAX_PLATFORMS": "cpu", "TRITON_INTERPRET": "0"})
    bad = [r for r in rows if not r.startswith("OK ")]
    assert len(rows) == 4 and not bad, rows


def _mosaic():
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    topo = topologies.get_topology_desc("v5e:2x2", "tpu")
    rep = NamedSharding(Mesh(np.array(topo.devices[:1]), ("x",)), PartitionSpec())
    ins, S0 = make_inputs(np.random.default_rng(0), dict(b=2, t=300, h=4, p=64, n=128))
    for part in ("straddle", "state"):
        k = compile_program(ssmc.check(PAIRS), "tpu",
                            get_target("tpu").pipeline(64) + f",{SetPart.name}{{part={part}}}", cache=False)
        for dt in ("float32", "bfloat16"):
            st = {n: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dt) if n in ("x", "B", "C", "dy") else jnp.float32,
                                          sharding=rep) for n, x in ins.items()}
            s0 = jax.ShapeDtypeStruct(S0.shape, jnp.float32, sharding=rep)
            try:
                jax.jit(lambda i, s: forward(k, i, s)).lower(st, s0).compile()
                print("OK", part, dt, flush=True)
            except Exception as e:  # report, go on
                print("ERR", part, dt, type(e).__name__, str(e)[:1000].replace("\n", " "), flush=True)


def _sm90():
    import hashlib
    import importlib.util as iu
    import tempfile

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    tmp = tempfile.mkdtemp()
    for part in ("straddle", "state"):
        k = compile_program(ssmc.check(PAIRS), "triton", get_target("triton").pipeline(64)
                            + f",{SetPart.name}{{part={part}}}", cache=False)
        path = f"{tmp}/gen_{part}.py"  # @triton.jit reads its function's source from a file
        with open(path, "w") as f:
            f.write(k.source)
        spec = iu.spec_from_file_location(f"gen_{part}_{hashlib.md5(k.source.encode()).hexdigest()[:8]}", path)
        mod = iu.module_from_spec(spec)
        spec.loader.exec_module(mod)
        fn = mod.pairs_chunked
        for mm in (tl.float32, tl.bfloat16):
            consts = dict(N_p=64, N_n=128, BLOCK_p=64, BLOCK_n=128, Q=64, MM=mm, I64=False, PACKED=False,
                          PREC="tf32x3" if mm == tl.float32 else "tf32")
            sig, cons = {}, {}
            for prm in fn.params:
                if prm.is_constexpr:
                    sig[prm.name], cons[prm.name] = "constexpr", consts.get(prm.name, 1)  # strides: any value
                elif prm.name.endswith("_ptr"):
                    sig[prm.name] = "*i32" if prm.name == "cu_seqlens_ptr" else \
                        ("*bf16" if mm == tl.bfloat16 else "*fp32")
                else:
                    sig[prm.name] = "i32"
            try:
                out = triton.compile(ASTSource(fn, sig, cons), target=GPUTarget("cuda", 90, 32),
                                     options=dict(num_warps=4, num_stages=2))
                assert "mma" in out.asm["ptx"], "no tensor-core instruction in the PTX"
                print("OK", part, mm, flush=True)
            except Exception as e:  # report, go on
                print("ERR", part, mm, type(e).__name__, str(e)[-1000:].replace("\n", " "), flush=True)


if __name__ == "__main__":  # the subprocesses of the two tests above
    import sys
    PASSES[SetPart.name] = SetPart
    {"mosaic": _mosaic, "sm90": _sm90}[sys.argv[1]]()
