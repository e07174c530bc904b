"""jax.grad through ssmc kernels against central finite differences of the float64 numpy reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference import VARIANTS, rel_l2

T, CHUNK, EPS, N_COORDS, TOL = 10, 4, 1e-3, 5, 1e-2

TINY = {
    "mamba2": {"b": 1, "t": T, "h": 4, "g": 2, "p": 3, "n": 4},
    "mamba2_gated": {"b": 1, "t": T, "h": 4, "g": 2, "p": 3, "n": 4},
    "mamba2_conv": {"b": 1, "t": T, "h": 4, "g": 2, "p": 3, "n": 4, "k": 3},
    "mamba1": {"b": 1, "t": T, "d": 4, "n": 3},
}
KV_TINY = {"b": 1, "t": T, "h": 2, "dk": 3, "dv": 4}

# (variant, differentiate w.r.t. the initial states too)
CASES = [(n, False) for n in VARIANTS] + [("mamba2", True), ("linear_attention", True), ("rwkv6", True)]


def _weights(rng, v, ref_outs, ref_states):
    wo = [rng.standard_normal(o.shape) for o in ref_outs]
    ws = [rng.standard_normal(s.shape) for s in ref_states]
    return wo, ws


def _ref_loss(v, inputs64, init64, wo, ws):
    outs, states = v.reference(inputs64, init64)
    return sum(float(np.sum(o * w)) for o, w in zip(outs, wo)) + sum(float(np.sum(s * w)) for s, w in zip(states, ws))


@pytest.mark.parametrize("name,with_init", CASES, ids=[f"{n}-{'init' if i else 'zero'}" for n, i in CASES])
def test_grad_matches_finite_differences(sx, rng, name, with_init):
    v = VARIANTS[name]
    dims = TINY.get(name, KV_TINY)
    inputs = v.make_inputs(rng, dims)
    init = v.make_initial_states(rng, dims) if with_init else None
    ref_outs, ref_states = v.reference(inputs, init)
    wo, ws = _weights(rng, v, ref_outs, ref_states)
    k = sx.kernel(name, CHUNK)
    wo32 = [jnp.asarray(w, jnp.float32) for w in wo]
    ws32 = [jnp.asarray(w, jnp.float32) for w in ws]

    def loss(inp, st=None):
        outs, states = sx.split(v, k(**sx.kwargs(v, inp, st)))
        return sum(jnp.sum(o * w) for o, w in zip(outs, wo32)) + sum(jnp.sum(s * w) for s, w in zip(states, ws32))

    args = ({n: jnp.asarray(a) for n, a in inputs.items()},
            {n: jnp.asarray(a) for n, a in init.items()} if with_init else None)
    if with_init:
        g_inputs, g_init = jax.grad(loss, argnums=(0, 1))(*args)
    else:
        g_inputs, g_init = jax.grad(loss)(args[0]), None

    inputs64 = {n: a.astype(np.float64) for n, a in inputs.items()}
    init64 = {n: a.astype(np.float64) for n, a in init.items()} if with_init else None

    def fd(which, n, idx):
        d = inputs64 if which == "in" else init64
        orig = d[n].flat[idx]
        d[n].flat[idx] = orig + EPS
        lp = _ref_loss(v, inputs64, init64, wo, ws)
        d[n].flat[idx] = orig - EPS
        lm = _ref_loss(v, inputs64, init64, wo, ws)
        d[n].flat[idx] = orig
        return (lp - lm) / (2 * EPS)

    targets = [("in", n, g_inputs[n], inputs64[n]) for n in v.in_names]
    if with_init:
        targets += [("state", n, g_init[n], init64[n]) for n in v.state_names]
    errors, report = {}, []
    for which, n, g, a in targets:
        g = np.asarray(g, dtype=np.float64)
        assert g.shape == a.shape, f"grad of {which} {n}: shape {g.shape} != {a.shape}"
        assert np.all(np.isfinite(g)), f"grad of {which} {n} has non-finite entries"
        idx = rng.choice(a.size, size=min(N_COORDS, a.size), replace=False)
        want = np.array([fd(which, n, int(i)) for i in idx])
        got = g.ravel()[idx]
        assert np.linalg.norm(want) > 0, f"{which} {n}: zero finite-difference gradient (bad test inputs)"
        errors[f"{which} {n}"] = rel_l2(got, want)
        report.append(f"{which} {n}: rel err {errors[f'{which} {n}']:.2g} (got {np.round(got, 4).tolist()}, "
                      f"fd {np.round(want, 4).tolist()})")
    bad = [r for (key, e), r in zip(errors.items(), report) if not e < TOL]
    assert not bad, f"{name}: gradients differ from finite differences:\n  " + "\n  ".join(bad)
