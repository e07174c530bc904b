"""Kernel.step: a prefill of t tokens then decode steps equals one call on all the tokens, for every example spec
(fp32 rel. error < 1e-5), and both match the float64 reference; plus the forms step accepts and its errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmc
from reference import VARIANTS, rel_l2
from ssmc import ShapeError

PREFILL = 21                 # not a multiple of any default chunk length
STEPS = (1, 3, 1, 8, 1)      # tokens per step: single tokens, multi-token and speculative-sized steps
EQUAL_TOL = 1e-5             # prefill + steps vs one call, both fp32
REF_TOL = 1e-4               # vs the float64 reference


def scan_inputs(k) -> set[str]:
    return {n for n, dims in k.inputs if k.program.scan in dims}


def cut(k, inputs: dict, a: int, b: int, squeeze: bool = False) -> dict:
    """Inputs restricted to steps a..b (scan axis 1 in every example); squeeze drops the scan axis (one token)."""
    out = {}
    for n, x in inputs.items():
        if n in scan_inputs(k):
            x = x[:, a] if squeeze else x[:, a:b]
        out[n] = x
    return out


def prefill_then_steps(k, inputs, init, steps=STEPS):
    """(outs concatenated over time, final states) of a prefill over PREFILL tokens followed by `steps`; a
    one-token step alternates between passing the inputs without and with the scan dim."""
    n_out = len(k.outs)
    res = k(**cut(k, inputs, 0, PREFILL), initial_states=init)
    outs, state = [[y] for y in res[:n_out]], res[n_out:]
    pos = PREFILL
    for j, n in enumerate(steps):
        squeeze = n == 1 and j % 2 == 0
        res = k.step(state, **cut(k, inputs, pos, pos + n, squeeze))
        for acc, y in zip(outs, res[:n_out]):
            acc.append(y[:, None] if squeeze else y)
        state = res[n_out:]
        pos += n
    return [np.concatenate(ys, axis=1) for ys in outs], list(state)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_then_steps_equals_full_call(sx, rng, name):
    v = VARIANTS[name]
    k = sx.kernel(name)
    T = PREFILL + sum(STEPS)
    inputs = v.make_inputs(rng, {"t": T})
    init = v.make_initial_states(rng, {"t": T})
    full_outs, full_states = sx.split(v, k(**inputs, initial_states=init))
    outs, states = prefill_then_steps(k, inputs, init)
    errs = {f"out {n}": rel_l2(a, b) for n, a, b in zip(v.out_names, outs, full_outs)}
    errs.update({f"state {n}": rel_l2(a, b) for n, a, b in zip(v.state_names, states, full_states)})
    assert max(errs.values()) < EQUAL_TOL, f"{name}: prefill + steps vs one call: {errs}"
    ref_outs, ref_states = v.reference(inputs, init)
    sx.compare(v, outs, states, ref_outs, ref_states, REF_TOL, what=" [prefill + steps]")


def test_single_token_outputs_drop_the_scan_dim(sx, rng):
    v = VARIANTS["mamba2"]
    k = sx.kernel("mamba2")
    inputs = v.make_inputs(rng, {"t": 1})
    y, h = k.step(None, **cut(k, inputs, 0, 1, squeeze=True))
    y1, h1 = k(**inputs)
    assert y.shape == (2, 4, 8) and h.shape == h1.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(y1[:, 0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h1), rtol=1e-6, atol=1e-6)


def test_state_forms_and_positional_inputs(sx, rng):
    """A dict, a tuple in k.states order and a single array (one-state kernels) are the same state."""
    v = VARIANTS["mamba2"]
    k = sx.kernel("mamba2")
    inputs = v.make_inputs(rng, {"t": 2})
    h0 = v.make_initial_states(rng)["h"]
    want = k.step({"h": h0}, **inputs)
    for state in (h0, (h0,), [h0]):
        got = k.step(state, **inputs)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    got = k.step(h0, *[inputs[n] for n, _ in k.inputs])
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    # two states: tuple order is k.states order
    v2 = VARIANTS["linear_attention"]
    k2 = sx.kernel("linear_attention")
    inp2, st2 = v2.make_inputs(rng, {"t": 1}), v2.make_initial_states(rng)
    a = k2.step(st2, **inp2)
    b = k2.step((st2["S"], st2["z"]), **inp2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_step_under_jit_decode_loop(sx, rng):
    """A jitted decode step fed back into itself equals one call (the step kernel is traced once)."""
    v = VARIANTS["mamba2_gated"]
    k = sx.kernel("mamba2_gated")
    T = 6
    inputs = v.make_inputs(rng, {"t": T})
    init = v.make_initial_states(rng)
    (y_full,), (s_full,) = sx.split(v, k(**inputs, initial_state=init["s"]))

    @jax.jit
    def decode(s, tok):
        y, s = k.step(s, **tok)
        return y, s

    s, ys = jnp.asarray(init["s"]), []
    for t in range(T):
        y, s = decode(s, cut(k, inputs, t, t + 1, squeeze=True))
        ys.append(y)
    assert rel_l2(np.stack(ys, axis=1), y_full) < EQUAL_TOL
    assert rel_l2(s, s_full) < EQUAL_TOL


def test_step_errors(sx, rng):
    v = VARIANTS["mamba2"]
    k = sx.kernel("mamba2")
    inputs = v.make_inputs(rng, {"t": 9})
    with pytest.raises(ShapeError, match=r"9 steps along the scan dim 't'.*1\.\.8"):
        k.step(None, **inputs)
    mixed = cut(k, inputs, 0, 1)
    mixed["x"] = inputs["x"][:, 0]
    with pytest.raises(ShapeError, match="inputs x come without the scan dim 't'"):
        k.step(None, **mixed)
    one = cut(k, inputs, 0, 1)
    with pytest.raises(ShapeError, match="got 2 states, expected 1"):
        k.step((np.zeros((2, 4, 8, 8)),) * 2, **one)
    with pytest.raises(ShapeError, match="unknown state 'hh'"):
        k.step({"hh": np.zeros((2, 4, 8, 8))}, **one)
    with pytest.raises(ShapeError, match="unknown input 'q'"):
        k.step(None, q=1.0, **one)
    k2 = sx.kernel("linear_attention")
    with pytest.raises(ShapeError, match="has 2 states .*pass state as a dict"):
        k2.step(np.zeros((2, 3, 8, 6)), **cut(k2, VARIANTS["linear_attention"].make_inputs(rng, {"t": 1}), 0, 1))


def test_step_kernel_is_sequential_and_cached(sx):
    from ssmc.step import step_kernel

    k = sx.kernel("mamba2")
    seq = step_kernel(k)
    assert seq is step_kernel(k)
    assert "chunk: sequential scan" in seq.ir and "chunk-parallel form" in k.ir


# conv windows + groups + the SSD form on both kernel targets; on Triton (fast interpreter) also a read-before-update
# readout (rwkv6), elementwise decay (mamba1) and a non-diagonal transition (deltanet)
KERNEL_CASES = [("triton", "mamba2_conv"), ("triton", "rwkv6"), ("triton", "mamba1"), ("triton", "deltanet"),
                ("tpu", "mamba2_conv")]


@pytest.mark.parametrize("target,name", [c if k < 2 else pytest.param(*c, marks=pytest.mark.slow)
                                         for k, c in enumerate(KERNEL_CASES)])
def test_prefill_then_steps_on_kernel_targets(rng, name, target):
    """The same on the kernel targets that have landed, in their CPU interpreter (slow: one example, short
    steps)."""
    v = VARIANTS[name]
    k = ssmc.compile(str(v.path), target=target, interpret=True)
    steps = (1, 3, 1)
    T = PREFILL + sum(steps)
    inputs = v.make_inputs(rng, {"t": T})
    init = v.make_initial_states(rng, {"t": T})
    full = k(**inputs, initial_states=init)
    outs, states = prefill_then_steps(k, inputs, init, steps)
    errs = [rel_l2(a, b) for a, b in zip(outs + states, full)]
    assert max(errs) < EQUAL_TOL, f"{name} on {target}: {errs}"


def test_step_grad_and_vmap(sx, rng):
    """Gradients flow into the carried states (conv windows included), and a vmapped step equals one step per
    element."""
    v = VARIANTS["mamba2_conv"]
    k = sx.kernel("mamba2_conv")
    inputs = v.make_inputs(rng, {"t": 1, "b": 1})
    st = v.make_initial_states(rng, {"t": 1, "b": 1})
    per_token = scan_inputs(k)
    tok = cut(k, inputs, 0, 1, squeeze=True)
    g = jax.grad(lambda s: jnp.sum(k.step(s, **tok)[0]))(st)
    assert set(g) == set(st) and all(np.all(np.isfinite(x)) and np.any(np.asarray(x)) for x in g.values())
    stv = {n: np.stack([x, 2 * x]) for n, x in st.items()}
    tokv = {n: (np.stack([x, -x]) if n in per_token else x) for n, x in tok.items()}
    axes = {n: (0 if n in per_token else None) for n in tok}
    res = jax.vmap(lambda s, t: k.step(s, **t), in_axes=(0, axes))(stv, tokv)
    one = k.step({n: x[1] for n, x in stv.items()}, **{n: (x[1] if n in per_token else x) for n, x in tokv.items()})
    for a, b in zip(res, one):
        np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b), rtol=1e-6, atol=1e-6)
