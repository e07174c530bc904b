"""The derived backward on specs unlike the examples (tests/specgen.py: dims declared in another order, arrays in
any layout, dims and values renamed, groups): gradients w.r.t. every input and initial state, taken in the spec's
own names and layouts, mapped back to the reference's, against the full float64 finite-difference gradient of the
numpy loop, through jax.grad on the kernel targets (their interpreters). Hypothesis draws the case, the sizes and
the chunk length; one example per base and target (the interpreters are slow)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ssmc
import specgen
from reference import full_gradient, rel_l2

BASES = ["mamba2", "mamba2_gated", "gla", "retnet", "linear_attention"]
# the kernel targets (the xla target's derived backward runs on every example in tests/test_adjoint.py)
TARGETS = {"triton": ([None, 1, 8], 1), "tpu": ([None, 8], 1)}


def _fd(case, inputs, init, w, eps=1e-6) -> dict:
    """d/d(base arrays) of sum_i <expected_i, w_i> (float64 central differences, every coordinate)."""
    arrays = {**{n: np.asarray(a, np.float64).copy() for n, a in inputs.items()},
              **{"state:" + n: np.asarray(a, np.float64).copy() for n, a in init.items()}}

    def loss():
        res = case.expected({n: arrays[n] for n in inputs}, {n: arrays["state:" + n] for n in init})
        return sum(float(np.sum(r * c)) for (_, r), c in zip(res, w))
    return full_gradient(loss, arrays, eps)


def check_gradients(case, sizes, target, chunk, seed):
    k = ssmc.compile(case.text, target=target, interpret=True, chunk_size=chunk)
    assert k._derived_backward() is not None, k.backward_note
    rng = np.random.default_rng(seed)
    inputs = case.base.make_inputs(rng, sizes)
    init = case.initial_states(rng, sizes)
    kw = case.call_args(inputs, init)
    w = [rng.standard_normal(r.shape) for _, r in case.expected(inputs, init)]
    ins = {n: jnp.asarray(a, jnp.float32) for n, a in kw.items() if n != "initial_states"}
    st0 = {n: jnp.asarray(a, jnp.float32) for n, a in kw["initial_states"].items()}
    w32 = [jnp.asarray(x, jnp.float32) for x in w]
    def loss(i, s):
        return sum(jnp.sum(r * c) for r, c in zip(k.apply(i, s), w32))
    gi, gs = jax.grad(loss, argnums=(0, 1))(ins, st0)
    want = _fd(case, inputs, init, w)
    vn = case.value_names
    errs = {}
    for n in case.ins:
        errs[n] = rel_l2(case.to_base(n, np.asarray(gi[vn[n]], np.float64)), want[n])
    for n in case.states:
        errs["state:" + n] = rel_l2(case.to_base(n, np.asarray(gs[vn[n]], np.float64)), want["state:" + n])
    bad = {n: e for n, e in errs.items() if not e < 1e-4}
    assert not bad, f"{target} chunk={chunk} sizes={sizes}: {bad}\n{case.describe()}"


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("base", BASES)
def test_generated_specs_gradients(base, target):
    chunks, n = TARGETS[target]

    @settings(max_examples=n, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=specgen.cases(base), sizes=specgen.sizes(base, max_t=12, max_feat=4),
           chunk=st.sampled_from(chunks), seed=st.integers(0, 2**31))
    def run(case, sizes, chunk, seed):
        check_gradients(case, sizes, target, chunk, seed)
    run()
