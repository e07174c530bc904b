"""Edge cases of the chunk pass: each spec exercises one part of the linearity analysis or the chunk stages, and is
checked (chunked, default and small chunks, and sequential) against its own float64 numpy loop."""
from __future__ import annotations

import numpy as np
import pytest

import ssmc
from reference import ref_mamba2, rel_l2

HEAD = """
  dims b, t, h, k, v
  scan t
"""
B, T, H, K, V = 2, 23, 3, 4, 5


def _rn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _loop(step, T, init, axis=1):
    """Run `step(t, state) -> (new_state, outs tuple)` for t < T; stack outs along `axis` (the scan dim's)."""
    s, outs = init, []
    for t in range(T):
        s, o = step(t, s)
        outs.append(o)
    return tuple(np.stack(x, axis=axis) for x in zip(*outs)), s


CASES = {}


def case(spec):
    def deco(fn):
        CASES[fn.__name__] = (spec, fn)
        return fn
    return deco


@case(HEAD + """
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], w[b,t,h]
  state S[b,h,k,v]
  out o[b,t,h,v]
  before[b,t,h,v] = q·S
  S = exp(-softplus(w))*S + kk⊗vv
  o = before + 2*(q·S)
""")
def read_before_and_after(rng):
    """one readout of the state before the update and one after, in the same out"""
    x = dict(q=_rn(rng, B, T, H, K), kk=_rn(rng, B, T, H, K), vv=_rn(rng, B, T, H, V), w=_rn(rng, B, T, H))
    f = {n: a.astype(np.float64) for n, a in x.items()}

    def step(t, S):
        a = np.exp(-np.log1p(np.exp(f["w"][:, t])))
        before = np.einsum("bhk,bhkv->bhv", f["q"][:, t], S)
        S = a[..., None, None] * S + np.einsum("bhk,bhv->bhkv", f["kk"][:, t], f["vv"][:, t])
        return S, (before + 2 * np.einsum("bhk,bhkv->bhv", f["q"][:, t], S),)
    return x, step, (B, H, K, V)


@case("""
  dims b, s, h, k, v
  scan s
  in q[b,s,h,k], kk[b,s,h,k], vv[b,s,h,v], c[h]
  state S[b,h,k,v]
  out o[b,s,h,v]
  S = c*S + kk⊗vv
  o = q·S
""")
def signed_constant_decay(rng):
    """a decay that may be negative (c in (-1, 1)): log|a| with the sign tracked; the scan dim is called s"""
    x = dict(q=_rn(rng, B, T, H, K), kk=_rn(rng, B, T, H, K), vv=_rn(rng, B, T, H, V),
             c=np.array([-0.9, 0.5, -0.3], np.float32))
    f = {n: a.astype(np.float64) for n, a in x.items()}

    def step(t, S):
        S = f["c"][None, :, None, None] * S + np.einsum("bhk,bhv->bhkv", f["kk"][:, t], f["vv"][:, t])
        return S, (np.einsum("bhk,bhkv->bhv", f["q"][:, t], S),)
    return x, step, (B, H, K, V)


@case(HEAD + """
  in q[b,t,h,k], k1[b,t,h,k], v1[b,t,h,v], k2[b,t,h,k], v2[b,t,h,v], g[b,t,h], z[b,t,h,v]
  state S[b,h,k,v]
  out o[b,t,h,v]
  S = exp(-softplus(g)) * sigmoid(g) * S + k1⊗v1 - 0.5*k2⊗v2
  r[b,t,h,v] = q·S
  o = silu(z) * r / (1 + abs(r))
""")
def two_updates_product_decay_nonlinear_epilogue(rng):
    """a decay that is a product of exp and sigmoid, an update that is a difference of two outer products, and a
    nonlinear epilogue of the readout"""
    x = dict(q=_rn(rng, B, T, H, K), k1=_rn(rng, B, T, H, K), v1=_rn(rng, B, T, H, V), k2=_rn(rng, B, T, H, K),
             v2=_rn(rng, B, T, H, V), g=_rn(rng, B, T, H), z=_rn(rng, B, T, H, V))
    f = {n: a.astype(np.float64) for n, a in x.items()}

    def step(t, S):
        g = f["g"][:, t]
        a = np.exp(-np.log1p(np.exp(g))) * _sig(g)
        u = np.einsum("bhk,bhv->bhkv", f["k1"][:, t], f["v1"][:, t]) - 0.5 * np.einsum(
            "bhk,bhv->bhkv", f["k2"][:, t], f["v2"][:, t])
        S = a[..., None, None] * S + u
        r = np.einsum("bhk,bhkv->bhv", f["q"][:, t], S)
        z = f["z"][:, t]
        return S, (z * _sig(z) * r / (1 + np.abs(r)),)
    return x, step, (B, H, K, V)


@case(HEAD + """
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], c[h], w[b,t,h]
  state S[b,h,k,v]
  out o[b,t,h,v]
  o = q·(S + 0.5*kk⊗vv)
  S = c*exp(-softplus(w))*S + kk⊗vv
""")
def signed_decay_read_before_update(rng):
    """a decay that may be negative, read before the update: the readout's sign runs through t-1, not t"""
    x = dict(q=_rn(rng, B, T, H, K), kk=_rn(rng, B, T, H, K), vv=_rn(rng, B, T, H, V),
             c=np.array([-0.9, 0.5, -0.3], np.float32), w=_rn(rng, B, T, H))
    f = {n: a.astype(np.float64) for n, a in x.items()}

    def step(t, S):
        u = np.einsum("bhk,bhv->bhkv", f["kk"][:, t], f["vv"][:, t])
        o = np.einsum("bhk,bhkv->bhv", f["q"][:, t], S + 0.5 * u)
        a = f["c"][None, :] * np.exp(-np.log1p(np.exp(f["w"][:, t])))
        return a[..., None, None] * S + u, (o,)
    return x, step, (B, H, K, V)


@case(HEAD + """
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], gv[b,t,h,v]
  state S[b,h,k,v]
  out o[b,t,h,v]
  S = exp(-exp(gv))*S + kk⊗vv
  o = q·S
""")
def value_wise_decay(rng):
    """decay along the kept (value) dim"""
    x = dict(q=_rn(rng, B, T, H, K), kk=_rn(rng, B, T, H, K), vv=_rn(rng, B, T, H, V), gv=_rn(rng, B, T, H, V))
    f = {n: a.astype(np.float64) for n, a in x.items()}

    def step(t, S):
        a = np.exp(-np.exp(f["gv"][:, t]))
        S = a[:, :, None, :] * S + np.einsum("bhk,bhv->bhkv", f["kk"][:, t], f["vv"][:, t])
        return S, (np.einsum("bhk,bhkv->bhv", f["q"][:, t], S),)
    return x, step, (B, H, K, V)


@case(HEAD + """
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], beta[b,t,h]
  state S[b,h,k,v]
  out o[b,t,h,v]
  S = 0.9*S + sigmoid(beta)*kk⊗vv
  o = sum(q·S, over=[v]) + q·S
""")
def literal_decay_reduce_epilogue(rng):
    """a literal decay, a gated update, and a readout consumed by a reduction"""
    x = dict(q=_rn(rng, B, T, H, K), kk=_rn(rng, B, T, H, K), vv=_rn(rng, B, T, H, V), beta=_rn(rng, B, T, H))
    f = {n: a.astype(np.float64) for n, a in x.items()}

    def step(t, S):
        S = 0.9 * S + _sig(f["beta"][:, t])[..., None, None] * np.einsum("bhk,bhv->bhkv", f["kk"][:, t],
                                                                           f["vv"][:, t])
        r = np.einsum("bhk,bhkv->bhv", f["q"][:, t], S)
        return S, (r.sum(-1, keepdims=True) + r,)
    return x, step, (B, H, K, V)


@case(HEAD + """
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], w[b,t,h]
  state S[b,h,k,v], P[b,h,k,v]
  out o[b,t,h,v]
  S = exp(-softplus(w))*S + kk⊗vv
  P = 0.5*P + S
  o = q·P
""")
def coupled_states(rng):
    """P's update reads S: coupled states, compiled as a sequential scan (the IR says why)"""
    x = dict(q=_rn(rng, B, T, H, K), kk=_rn(rng, B, T, H, K), vv=_rn(rng, B, T, H, V), w=_rn(rng, B, T, H))
    f = {n: a.astype(np.float64) for n, a in x.items()}

    def step(t, st):
        S, P = st
        a = np.exp(-np.log1p(np.exp(f["w"][:, t])))
        S = a[..., None, None] * S + np.einsum("bhk,bhv->bhkv", f["kk"][:, t], f["vv"][:, t])
        P = 0.5 * P + S
        return (S, P), (np.einsum("bhk,bhkv->bhv", f["q"][:, t], P),)
    return x, step, [(B, H, K, V), (B, H, K, V)]


@case("""
  dims t, b, h, k, v
  scan t
  in W[h,k], kk[t,b,h,k], vv[t,b,h,v], w[t,b,h], x[t,b,h,v]
  state S[b,h,k,v]
  out o[t,b,h,v], skip[t,b,h,v]
  S = exp(-softplus(w))*S + kk⊗vv
  o = W·S
  skip = 2*x + 1
""")
def time_major_constant_query_free_out(rng):
    """the scan dim first in every array, a readout vector without the scan dim, and an out that reads no state"""
    x = dict(W=_rn(rng, H, K), kk=_rn(rng, T, B, H, K), vv=_rn(rng, T, B, H, V), w=_rn(rng, T, B, H),
             x=_rn(rng, T, B, H, V))
    f = {n: a.astype(np.float64) for n, a in x.items()}

    def step(t, S):
        a = np.exp(-np.log1p(np.exp(f["w"][t])))
        S = a[..., None, None] * S + np.einsum("bhk,bhv->bhkv", f["kk"][t], f["vv"][t])
        return S, (np.einsum("hk,bhkv->bhv", f["W"], S), 2 * f["x"][t] + 1)
    return x, step, (B, H, K, V), 0


@case(HEAD + """
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], w[b,t,h], nw[v]
  state S[b,h,k,v]
  out o[b,t,h,v]
  a = clamp(sigmoid(w), 0.05, 0.95) ** 2
  S = a*S + sqrt(abs(kk) + 1)⊗tanh(vv)
  r[b,t,h,v] = q·S
  m = mean(r, over=[v])
  o = rmsnorm(max(r, m) - min(r, 0.0) * rsqrt(1 + m*m), over=[v], eps=1e-3) * nw
""")
def builtins_pow_decay_rmsnorm(rng):
    """a clamped power as the decay (not provably positive: sign tracked), builtins in the update and epilogue,
    rmsnorm without groups"""
    x = dict(q=_rn(rng, B, T, H, K), kk=_rn(rng, B, T, H, K), vv=_rn(rng, B, T, H, V), w=_rn(rng, B, T, H),
             nw=_rn(rng, V))
    f = {n: a.astype(np.float64) for n, a in x.items()}

    def step(t, S):
        a = np.clip(_sig(f["w"][:, t]), 0.05, 0.95) ** 2
        S = a[..., None, None] * S + np.einsum("bhk,bhv->bhkv", np.sqrt(np.abs(f["kk"][:, t]) + 1),
                                               np.tanh(f["vv"][:, t]))
        r = np.einsum("bhk,bhkv->bhv", f["q"][:, t], S)
        m = r.mean(-1, keepdims=True)
        e = np.maximum(r, m) - np.minimum(r, 0.0) / np.sqrt(1 + m * m)
        return S, (e / np.sqrt((e * e).mean(-1, keepdims=True) + 1e-3) * f["nw"],)
    return x, step, (B, H, K, V)


@case(HEAD + """
  in q[b,t,h,k], kk[b,t,h,k], vv[b,t,h,v], c[h,k,v], w[b,t,h,k]
  state S[b,h,k,v]
  out o[b,t,h,v]
  S = c*exp(-softplus(w))*S + kk⊗vv
  o = q·S
""")
def signed_elementwise_decay(rng):
    """an elementwise decay (over k and v) that may be negative: the chunked walk multiplies by the sign"""
    x = dict(q=_rn(rng, B, T, H, K), kk=_rn(rng, B, T, H, K), vv=_rn(rng, B, T, H, V),
             c=rng.uniform(-0.95, 0.95, (H, K, V)).astype(np.float32), w=_rn(rng, B, T, H, K))
    f = {n: a.astype(np.float64) for n, a in x.items()}

    def step(t, S):
        a = f["c"][None] * np.exp(-np.log1p(np.exp(f["w"][:, t])))[..., None]
        S = a * S + np.einsum("bhk,bhv->bhkv", f["kk"][:, t], f["vv"][:, t])
        return S, (np.einsum("bhk,bhkv->bhv", f["q"][:, t], S),)
    return x, step, (B, H, K, V)


@case("""
  dims b, t, h, g, n
  scan t
  group g -> h
  in Bg[b,t,g,n], C[b,t,h,n], w[b,t,g], x[b,t,h]
  state z[b,g,n]
  out y[b,t,h]
  z = exp(-softplus(w))*z + Bg
  y = C·z + x
""")
def group_indexed_state(rng):
    """a state indexed by the group dim, read by every head of its group"""
    G, Hh, N = 2, 4, 3
    x = dict(Bg=_rn(rng, B, T, G, N), C=_rn(rng, B, T, Hh, N), w=_rn(rng, B, T, G), x=_rn(rng, B, T, Hh))
    f = {n: a.astype(np.float64) for n, a in x.items()}
    grp = np.arange(Hh) // (Hh // G)

    def step(t, z):
        z = np.exp(-np.log1p(np.exp(f["w"][:, t])))[..., None] * z + f["Bg"][:, t]
        return z, (np.einsum("bhn,bhn->bh", f["C"][:, t], z[:, grp]) + f["x"][:, t],)
    return x, step, (B, G, N)


EXPECT_SCHEDULE = {"coupled_states": "sequential scan, not chunkable",
                   "signed_elementwise_decay": "sequential scan: elementwise decay"}  # CPU default; chunk=4 walks


@pytest.mark.parametrize("chunk", [None, 4, 1])
@pytest.mark.parametrize("name", sorted(CASES))
def test_chunk_form_matches_loop(name, chunk, rng):
    spec, make = CASES[name]
    x, step, shapes, *taxis = make(rng)
    k = ssmc.compile(f"ssm {name} {{{spec}}}", chunk_size=chunk)
    multi = isinstance(shapes, list)
    inits = [_rn(rng, *s, scale=0.5) for s in (shapes if multi else [shapes])]
    init = tuple(i.astype(np.float64) for i in inits) if multi else inits[0].astype(np.float64)
    ref_o_all, ref_s = _loop(step, T, init, *taxis)
    ref_s = ref_s if multi else (ref_s,)
    if multi:
        res = k(**x, initial_states={n: a for (n, _), a in zip(k.states, inits)})
    else:
        res = k(**x, initial_state=inits[0])
    n_out = len(k.outs)
    ref_outs = ref_o_all
    for got, want in zip(res[:n_out], ref_outs):
        assert rel_l2(np.asarray(got), want) < 1e-4
    for got, want in zip(res[n_out:], ref_s):
        assert rel_l2(np.asarray(got), want) < 1e-4
    if chunk == 4 and name != "coupled_states":
        assert "# chunk: chunk-parallel form" in k.ir, k.ir.splitlines()[:12]
    elif chunk is None:
        want = EXPECT_SCHEDULE.get(name, "chunk-parallel form")
        assert f"# chunk: {want}" in k.ir, k.ir.splitlines()[:12]


POST_SPEC = """
ssm post_readout {
  dims b, t, h, p, n, g
  scan t
  group g -> h
  in x[b,t,h,p], dt[b,t,h], A[h], B[b,t,g,n], C[b,t,g,n], D[h], w[b,t,h,p]
  state h[b,h,p,n]
  out y[b,t,h,p], z[b,t,h]
  h = exp(dt*A)*h + dt*B⊗x
  y = C·h + D*x
  z = sum(y*w, over=[p])
}
"""


@pytest.mark.parametrize("target", ["xla", "triton", "tpu"])
def test_value_of_a_readout_is_not_chunked_twice(target, rng):
    """z = sum(y * w) with y an out too: z is an epilogue of y's readout (passes/plan.py `post`), one chunk.output
    in the IR, and both outs match the float64 Mamba2 loop (tests/reference.py)."""
    b, T, H, G, P, N = 2, 13, 4, 2, 4, 5
    x = dict(x=rng.standard_normal((b, T, H, P)), dt=rng.uniform(0.05, 0.5, (b, T, H)), A=-rng.uniform(0.5, 2, H),
             B=rng.standard_normal((b, T, G, N)), C=rng.standard_normal((b, T, G, N)), D=rng.standard_normal(H),
             w=rng.standard_normal((b, T, H, P)))
    x = {n: a.astype(np.float32) for n, a in x.items()}
    k = ssmc.compile(POST_SPEC, target=target, chunk_size=4, **({} if target == "xla" else {"interpret": True}))
    assert k.ir.count("chunk.output") == 1, k.ir
    (y_ref,), _ = ref_mamba2(x)
    y, z = k(**x)[:2]
    assert rel_l2(np.asarray(y), y_ref) < 1e-4
    assert rel_l2(np.asarray(z), (y_ref * x["w"].astype(np.float64)).sum(-1)) < 1e-4
