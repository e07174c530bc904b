"""Small helpers several test files share (parametrisation of the fast and the slow set, ids); finite differences
are tests/reference.py's."""
from __future__ import annotations

import pytest


def case_id(case) -> str:
    """Test id of a (chunk_size, t, with initial states) case."""
    chunk, t, init = case
    return f"chunk{chunk}-t{t}-{'init' if init else 'zero'}"


def first_fast(cases, ids=case_id):
    """pytest params of `cases`: the first stays in the fast set (-m "not slow"), the others are marked slow."""
    return [pytest.param(c, id=ids(c), marks=() if k == 0 else pytest.mark.slow) for k, c in enumerate(cases)]


def derived_gradients(k, ins: dict, states: dict, w: list, cu=None) -> dict:
    """Gradients of <results, w> (outs then final states, as k returns them) through k's derived backward, keyed
    like Backward.vjp ({input: grad, "state:<name>": grad}): jax.grad of k.apply on a kernel target (its
    custom_vjp runs the derived kernels), the derived backward called directly on the xla target (whose calls jax
    differentiates itself). `cu`: a packed call's offsets."""
    import jax
    import jax.numpy as jnp
    w = [jnp.asarray(x, jnp.float32) for x in w]
    if k.target == "xla":
        meta, arrays = k._bound((), dict(ins), None, dict(states), cu)
        names = [n for n, _ in k.outs] + ["state:" + s for s, _ in k.states]
        return k._derived_backward().vjp(meta, arrays, dict(zip(names, w)), jnp.float32,
                                         cu=None if cu is None else jnp.asarray(cu))

    def loss(i, s):
        return sum(jnp.sum(r * c) for r, c in zip(k.apply(i, s, cu_seqlens=cu), w))
    gi, gs = jax.grad(loss, argnums=(0, 1))(dict(ins), dict(states))
    return {**gi, **{"state:" + n: a for n, a in gs.items()}}
