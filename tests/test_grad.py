"""jax.grad through ssmc kernels against central finite differences of the float64 numpy reference, on every
target: the XLA target's code is differentiated by jax; on the kernel targets a spec without a derived backward
(non-diagonal) takes its derivatives from the spec's XLA code (Kernel._derivatives), checked the same way. The
derived backward kernels of the other specs are tests/test_adjoint.py's."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference import VARIANTS, central_differences, rel_l2
from ssmc.errors import SSMCError

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


# on the kernel targets (their interpreters): a spec without a derived backward (non-diagonal), whose derivatives
# are the XLA code's; the derived backward of every other example is tests/test_adjoint.py's
KERNEL_CASES = [("deltanet", False)]
ALL = [("xla", n, i) for n, i in CASES] + [(t, n, i) for t in ("triton", "tpu") for n, i in KERNEL_CASES]


@functools.lru_cache(maxsize=None)
def _kernel(name, target):
    import ssmc
    return ssmc.compile(str(VARIANTS[name].path), target=target, interpret=target != "xla", chunk_size=CHUNK)


@pytest.mark.parametrize("target,name,with_init", ALL, ids=[f"{t}-{n}-{'init' if i else 'zero'}" for t, n, i in ALL])
def test_grad_matches_finite_differences(sx, rng, target, name, with_init):
    v = VARIANTS[name]
    dims = TINY.get(name, KV_TINY)
    inputs = v.make_inputs(rng, dims)
    init = v.make_initial_states(rng, dims) if with_init else None
    ref_outs, ref_states = v.reference(inputs, init)
    wo, ws = _weights(rng, v, ref_outs, ref_states)
    k = _kernel(name, target)
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

    targets = [("in", n, g_inputs[n], inputs64[n]) for n in v.in_names]
    if with_init:
        targets += [("state", n, g_init[n], init64[n]) for n in v.state_names]
    errors, report = {}, []
    for which, n, g, a in targets:
        g = np.asarray(g, dtype=np.float64)
        assert g.shape == a.shape, f"grad of {which} {n}: shape {g.shape} != {a.shape}"
        assert np.all(np.isfinite(g)), f"grad of {which} {n} has non-finite entries"
        idx = rng.choice(a.size, size=min(N_COORDS, a.size), replace=False)
        want = central_differences(lambda: _ref_loss(v, inputs64, init64, wo, ws),
                                   inputs64 if which == "in" else init64, n, idx, EPS)
        got = g.ravel()[idx]
        assert np.linalg.norm(want) > 0, f"{which} {n}: zero finite-difference gradient (bad test inputs)"
        errors[f"{which} {n}"] = rel_l2(got, want)
        report.append(f"{which} {n}: rel err {errors[f'{which} {n}']:.2g} (got {np.round(got, 4).tolist()}, "
                      f"fd {np.round(want, 4).tolist()})")
    bad = [r for (key, e), r in zip(errors.items(), report) if not e < TOL]
    assert not bad, f"{name}: gradients differ from finite differences:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("target", ["triton", "tpu"])
def test_kernel_target_derivatives(rng, target):
    """On a kernel target: gradients have their primal's dtype (bf16 activations, fp32 parameters), forward mode
    (jax.jvp) raises an SSMCError, and jax.jit / jax.vmap of a grad give the XLA target's gradients."""
    v = VARIANTS["mamba2"]
    dims = TINY["mamba2"]
    inputs = {n: jnp.asarray(a) for n, a in v.make_inputs(rng, dims).items()}
    k, kx = _kernel("mamba2", target), _kernel("mamba2", "xla")
    mixed = {n: (a if n in ("A", "D") else a.astype(jnp.bfloat16)) for n, a in inputs.items()}
    g = jax.grad(lambda i: jnp.sum(k(**i)[0].astype(jnp.float32) ** 2))(mixed)
    assert {n: str(a.dtype) for n, a in g.items()} == {n: str(a.dtype) for n, a in mixed.items()}
    assert all(bool(jnp.all(jnp.isfinite(a.astype(jnp.float32)))) and float(jnp.max(jnp.abs(a))) > 0
               for a in g.values())
    tangent = {n: jnp.asarray(rng.standard_normal(a.shape), a.dtype) for n, a in inputs.items()}
    # the derivatives are the derived backward kernels (reverse mode): forward mode says it is unsupported
    with pytest.raises(SSMCError, match="forward-mode"):
        jax.jvp(lambda i: k(**i)[0], (inputs,), (tangent,))
    xs = jnp.stack([inputs["x"], jnp.asarray(rng.standard_normal(inputs["x"].shape), jnp.float32)])
    rest = {n: a for n, a in inputs.items() if n != "x"}

    def grad_x(kern):
        return jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(jnp.sin(kern(x=x, **rest)[0])))))
    gk, gx = grad_x(k)(xs), grad_x(kx)(xs)
    assert rel_l2(np.asarray(gk, np.float64), np.asarray(gx, np.float64)) < 1e-5
