"""Key-wise and value-wise decay in chunks split into sub-chunks (issue 12 item 3): the blocks between sub-chunks
are matmuls whose operands carry exp(L_t - r) and exp(r - L_s), the diagonal blocks are computed directly. Each
spec is checked against its own float64 numpy loop on every target (xla; triton and tpu in their CPU
interpreters), at the default chunk (64 in sub-chunks of 16; xla on CPU: 16 in sub-chunks of 4) and at explicit chunk / sub-chunk lengths, with a
partial last chunk; decays that grow (|a| > 1, no clamp), that are strong (log a down to -5 per step, where
(q ⊙ exp(L)) · (k ⊙ exp(-L)) overflows) or that change sign; readout before the update with a bonus (RWKV)."""
from __future__ import annotations

import re

import numpy as np
import pytest

import ssmc
from reference import VARIANTS, rel_l2
from ssmc.targets import get_target

B, H, K, V = 1, 2, 8, 8
TOL = 1e-4


def _rn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
    return np.logaddexp(0.0, x)


def _run_loop(a_of, u_of, q, T, S0, prev=False, bonus=None):
    """The recurrence one step at a time in float64: S_t = a_t ⊙ S_{t-1} + u_t, o_t = q_t · S_t (or, read before
    the update, q_t · (S_{t-1} + bonus ⊙ u_t)). a_of(t), u_of(t): [b,h,k,v]-broadcastable arrays."""
    S, outs = S0.astype(np.float64), []
    for t in range(T):
        u = u_of(t)
        if prev:
            outs.append(np.einsum("bhk,bhkv->bhv", q[:, t], S + bonus * u))
        S = a_of(t) * S + u
        if not prev:
            outs.append(np.einsum("bhk,bhkv->bhv", q[:, t], S))
    return np.stack(outs, axis=1), S


def _kv(rng, T):
    return dict(q=_rn(rng, B, T, H, K), kk=_rn(rng, B, T, H, K), vv=_rn(rng, B, T, H, V))


def _outer(f, t):
    return np.einsum("bhk,bhv->bhkv", f["kk"][:, t], f["vv"][:, t])


HEAD = """
  dims b, t, h, k, v
  scan t
  state S[b,h,k,v]
  out o[b,t,h,v]
"""

SPECS = {}


def spec(text):
    def deco(fn):
        SPECS[fn.__name__] = (text, fn)
        return fn
    return deco


@spec(VARIANTS["gla"].spec_text)
def gla(rng, T):
    v = VARIANTS["gla"]
    x = v.make_inputs(rng, v.dims(b=B, t=T, h=H, dk=K, dv=V))
    return x, lambda S0: v.reference(x, {"S": S0})


@spec(VARIANTS["rwkv6"].spec_text)
def rwkv6_bonus(rng, T):
    """read before the update (strict s < t in the chunk) with the bonus u on the diagonal"""
    v = VARIANTS["rwkv6"]
    x = v.make_inputs(rng, v.dims(b=B, t=T, h=H, dk=K, dv=V))
    return x, lambda S0: v.reference(x, {"S": S0})


@spec(HEAD + """
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], gv[b,t,h,v]
  S = exp(-softplus(-gv))*S + kk⊗vv
  o = q·S
""")
def value_wise(rng, T):
    """fla's gv form: the decay along the kept (value) dim"""
    x = dict(_kv(rng, T), gv=_rn(rng, B, T, H, V, scale=2.0))
    f = {n: a.astype(np.float64) for n, a in x.items()}
    return x, lambda S0: _run_loop(lambda t: _sig(f["gv"][:, t])[:, :, None, :], lambda t: _outer(f, t), f["q"],
                                   T, S0)


@spec(HEAD + """
  in q[b,t,h,k], fr[b,t,h,k], vv[b,t,h,v]
  fg = sigmoid(fr)
  S = fg*S + (1 - fg)⊗vv
  o = q·S
""")
def hgrn2_like(rng, T):
    """HGRN2-like: forget gate f along the key dim, input (1 - f) ⊗ v (an update factor computed from the gate)"""
    x = dict(q=_rn(rng, B, T, H, K), fr=_rn(rng, B, T, H, K, scale=2.0), vv=_rn(rng, B, T, H, V))
    f = {n: a.astype(np.float64) for n, a in x.items()}
    fg = _sig(f["fr"])
    return x, lambda S0: _run_loop(lambda t: fg[:, t][..., None],
                                   lambda t: np.einsum("bhk,bhv->bhkv", 1 - fg[:, t], f["vv"][:, t]), f["q"], T, S0)


@spec(HEAD + """
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], w[b,t,h,k], c[h,k]
  S = c*exp(-softplus(w))*S + kk⊗vv
  o = q·S
""")
def signed_key_wise(rng, T):
    """a key-wise decay that may be negative (c in (-1, 1) per head and key): log|a| plus the cumulative sign"""
    x = dict(_kv(rng, T), w=_rn(rng, B, T, H, K), c=rng.uniform(-0.99, 0.99, (H, K)).astype(np.float32))
    f = {n: a.astype(np.float64) for n, a in x.items()}
    a = f["c"][None, None] * np.exp(-_softplus(f["w"]))
    return x, lambda S0: _run_loop(lambda t: a[:, t][..., None], lambda t: _outer(f, t), f["q"], T, S0)


@spec(HEAD + """
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], w[b,t,h,k], c[h,k], u[h,k]
  o = q·(S + u*kk⊗vv)
  S = c*exp(-softplus(w))*S + kk⊗vv
""")
def signed_key_wise_bonus(rng, T):
    """a signed key-wise decay read before the update, with a bonus"""
    x = dict(_kv(rng, T), w=_rn(rng, B, T, H, K), c=rng.uniform(-0.99, 0.99, (H, K)).astype(np.float32),
             u=_rn(rng, H, K, scale=0.5))
    f = {n: a.astype(np.float64) for n, a in x.items()}
    a = f["c"][None, None] * np.exp(-_softplus(f["w"]))
    return x, lambda S0: _run_loop(lambda t: a[:, t][..., None], lambda t: _outer(f, t), f["q"], T, S0, prev=True,
                                   bonus=f["u"][None, :, :, None])


@spec(HEAD + """
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], w[b,t,h,k]
  S = (1 + 0.05*sigmoid(w))*S + kk⊗vv
  o = q·S
""")
def growing(rng, T):
    """|a| slightly > 1: not provably bounded, so the in-chunk exponents are used exactly (positive ones too)"""
    x = dict(_kv(rng, T), w=_rn(rng, B, T, H, K))
    f = {n: a.astype(np.float64) for n, a in x.items()}
    a = 1 + 0.05 * _sig(f["w"])
    return x, lambda S0: _run_loop(lambda t: a[:, t][..., None], lambda t: _outer(f, t), f["q"], T, S0)


@spec(HEAD + """
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], w[b,t,h,k]
  S = exp(-5*sigmoid(w))*S + kk⊗vv
  o = q·S
""")
def strong(rng, T):
    """log a between -5 and 0 per step (w spread wide): over a chunk of 64 steps L reaches about -300, so
    exp(-L_s) alone overflows float32; the sub-chunk factors stay <= 1"""
    x = dict(_kv(rng, T), w=_rn(rng, B, T, H, K, scale=4.0))
    f = {n: a.astype(np.float64) for n, a in x.items()}
    a = np.exp(-5 * _sig(f["w"]))
    return x, lambda S0: _run_loop(lambda t: a[:, t][..., None], lambda t: _outer(f, t), f["q"], T, S0)


@spec(HEAD + """
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], gv[b,t,h,v]
  S = exp(-5*sigmoid(gv))*S + kk⊗vv
  o = q·S
""")
def strong_value_wise(rng, T):
    """value-wise with log a between -5 and 0 per step"""
    x = dict(_kv(rng, T), gv=_rn(rng, B, T, H, V, scale=4.0))
    f = {n: a.astype(np.float64) for n, a in x.items()}
    a = np.exp(-5 * _sig(f["gv"]))
    return x, lambda S0: _run_loop(lambda t: a[:, t][:, :, None, :], lambda t: _outer(f, t), f["q"], T, S0)


def compile_sub(text, target, chunk=None, sub=None, monkeypatch=None):
    """Compile with an explicit sub-chunk length (the chunk pass's `sub` option, set through the target's
    pipeline)."""
    kw = {} if target == "xla" else {"interpret": True}
    if sub is not None:
        cls = type(get_target(target))
        orig = cls.pipeline
        monkeypatch.setattr(cls, "pipeline",
                            lambda self, cs: re.sub(r",sub=\d+", "", orig(self, cs)).replace("chunk{", f"chunk{{sub={sub},"))
    return ssmc.compile(text, target=target, chunk_size=chunk, cache=False, **kw)


def check(name, target, chunk, sub, T, rng, monkeypatch):
    text, make = SPECS[name]
    if not text.lstrip().startswith("#") and not text.lstrip().startswith("ssm"):
        text = f"ssm {name} {{{text}}}"
    x, ref = make(rng, T)
    k = compile_sub(text, target, chunk, sub, monkeypatch)
    # defaults: chunk 64 (triton: 32) in sub-chunks of 16; the xla target on CPU 16 in sub-chunks of 4 (measured
    # faster there)
    Q = chunk or {"xla": 16, "triton": 32, "tpu": 64}[target]
    C = sub or (4 if target == "xla" else 16)
    if Q > C:
        assert f"sub={C}" in k.ir, [ln for ln in k.ir.splitlines() if "chunk" in ln][:6]
    S0 = _rn(rng, B, H, K, V, scale=0.5)
    o_ref, S_ref = ref(S0)
    if isinstance(o_ref, tuple):  # tests/reference.py: (outs, states)
        o_ref, S_ref = o_ref[0], S_ref[0]
    o, S = k(**x, initial_state=S0)
    o, S = np.asarray(o), np.asarray(S)
    assert np.isfinite(o).all() and np.isfinite(S).all(), f"{name} ({target}): non-finite results"
    eo, es = rel_l2(o, o_ref), rel_l2(S, S_ref)
    assert eo < TOL and es < TOL, f"{name} ({target}, chunk {chunk}, sub {sub}): rel L2 out {eo:.3g}, state {es:.3g}"
    return eo, es


# (chunk, sub, T): the default (one partial chunk of 64 in sub-chunks of 16; xla on CPU: three chunks of 16 in
# sub-chunks of 4, the last partial), two chunks of 32 in sub-chunks of 8 and
# 16 with a partial last one
CONFIGS = [(None, None, 37), (32, 8, 45), (32, 16, 45)]


# the fast set (-m "not slow") keeps the default and 32 / 8 on xla, and the specs of FAST on the interpreters
@pytest.mark.parametrize("config", [pytest.param(c, marks=() if i < 2 else pytest.mark.slow)
                                    for i, c in enumerate(CONFIGS)],
                         ids=[f"chunk{c}-sub{s}-t{t}" for c, s, t in CONFIGS])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_xla(name, config, rng, monkeypatch):
    check(name, "xla", *config, rng, monkeypatch)


# the interpreters: one config per spec in the fast set (two chunks of 32 in sub-chunks of 16, a partial last one);
# the others slow
KERNEL_CONFIGS = [(32, 16, 45), (32, 8, 37)]  # a partial last sub-chunk, then sub-chunks of 8


FAST = ("gla", "rwkv6_bonus", "value_wise", "signed_key_wise_bonus", "strong")


KERNEL_CASES = [pytest.param(target, name, c, marks=() if (c == KERNEL_CONFIGS[0] and name in FAST) else pytest.mark.slow,
                             id=f"{target}-{name}-chunk{c[0]}-sub{c[1]}-t{c[2]}")
                for target in ("triton", "tpu") for name in sorted(SPECS) for c in KERNEL_CONFIGS]


@pytest.mark.parametrize("target,name,config", KERNEL_CASES)
def test_kernels(target, name, config, rng, monkeypatch):
    check(name, target, *config, rng, monkeypatch)


def test_no_q_by_q_by_k_tile():
    """The generated code of a key-wise spec: sub-chunk matmuls, no [Q, Q, K] decay tile (the IR records the
    sub-chunk length)."""
    text = VARIANTS["gla"].spec_text
    x = ssmc.compile(text, target="xla", cache=False)
    assert "sub=4" in x.ir and "chunk=16" in x.ir  # the CPU default
    assert "rt.sub_source(" in x.source and "rt.causal(Q" not in x.source
    for target in ("triton", "tpu"):
        k = ssmc.compile(text, target=target, interpret=True, cache=False)
        src = k.source
        assert "# sub-chunks of 16 steps" in src, target
        # the old form broadcast the cumulative decay to [t, s, k]: L[:, None, :] - L
        assert "S_L[:, None, :] - S_L" not in src, target
        assert ("tl.dot(" if target == "triton" else "lax.dot_general(") in src


def test_sub_chunk_length_choice():
    """The sub-chunk length divides the chunk: the largest divisor up to `sub`, whole sublane tiles (multiples of 8)
    preferred; a chunk without a divisor of 4 or more keeps the one-block form."""
    from ssmc.passes.chunk import sub_chunk
    assert [sub_chunk(q, 16) for q in (8, 16, 24, 32, 48, 64, 30, 23)] == [8, 16, 8, 16, 16, 16, 15, 23]
    assert sub_chunk(64, 8) == 8 and sub_chunk(32, 4) == 4


@pytest.mark.parametrize("name", ["gla", "value_wise"])
def test_chunk_24_in_sub_chunks_of_8(name, rng, monkeypatch):
    """a chunk length that is not a power of two (24) splits into sub-chunks of 8 (of at most 16)"""
    text, make = SPECS[name]
    text = text if text.lstrip().startswith(("#", "ssm")) else f"ssm {name} {{{text}}}"
    x, ref = make(rng, 50)
    k = compile_sub(text, "xla", 24, 16, monkeypatch)
    assert "sub=8" in k.ir and "chunk=24" in k.ir
    S0 = _rn(rng, B, H, K, V, scale=0.5)
    o_ref, S_ref = ref(S0)
    if isinstance(o_ref, tuple):
        o_ref, S_ref = o_ref[0], S_ref[0]
    o, S = k(**x, initial_state=S0)
    assert rel_l2(np.asarray(o), o_ref) < TOL and rel_l2(np.asarray(S), S_ref) < TOL


@pytest.mark.parametrize("branch", ["matmul", pytest.param("exact", marks=pytest.mark.slow)])
def test_triton_guarded_matmul_form(branch, rng, monkeypatch):
    """Triton runs key-/value-wise chunks as plain [Q, K] x [K, Q] matmuls (each row's exponents from the step
    before its sub-chunk) under a per-chunk guard on the exponents, and the exact sub-chunk form where the guard
    fails: both branches match the float64 loops (forced here through the guard's bound), signed decays read before
    the update included; without the guard the signed spec (log|a| down to the reset floor) is not finite."""
    from ssmc.targets.triton_gpu import TritonDialect
    k = ssmc.compile(VARIANTS["gla"].spec_text, target="triton", interpret=True, cache=False)
    assert "tl.static_range(Q // 16)" in k.source and "<= 40.0:" in k.source
    if branch == "exact":
        monkeypatch.setattr(TritonDialect, "GUARD_EXP", -1.0)
    for name in ("gla", "value_wise", "signed_key_wise_bonus"):
        check(name, "triton", 64, 16, 70, rng, monkeypatch)


def test_triton_guard_is_needed(rng, monkeypatch):
    """The guard is what keeps the matmul form finite: with its bound lifted, a decay spanning the fp32 range inside
    a sub-chunk overflows (this test fails if the exact branch were dead code)."""
    from ssmc.targets.triton_gpu import TritonDialect
    monkeypatch.setattr(TritonDialect, "GUARD_EXP", 1e30)
    with pytest.raises(AssertionError, match="non-finite|rel L2"):
        check("signed_key_wise", "triton", 64, 16, 70, rng, monkeypatch)
