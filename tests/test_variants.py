"""Every example spec compiled by ssmc against its float64 numpy reference (tests/reference.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmc
from helpers import case_id
from reference import VARIANTS, rel_l2

NAMES = list(VARIANTS)
FP32_TOL = 1e-4

# (chunk_size, t, with initial states): lengths that are and aren't chunk multiples, the default chunk
# size (a few chunks at t=150), and chunk_size=1 (the sequential scan).
CASES = [
    (None, 37, False),
    (None, 150, True),
    (16, 64, True),
    (16, 37, False),
    (16, 37, True),
    (1, 37, True),
]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("name", NAMES)
def test_fp32_matches_reference(sx, rng, name, case):
    chunk, t, with_init = case
    v = VARIANTS[name]
    inputs = v.make_inputs(rng, {"t": t})
    init = v.make_initial_states(rng, {"t": t}) if with_init else None
    ref_outs, ref_states = v.reference(inputs, init)
    outs, states = sx.run(v, inputs, init, chunk_size=chunk)
    sx.compare(v, outs, states, ref_outs, ref_states, FP32_TOL)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("name", ["mamba2", "mamba2_gated"])
def test_group_counts(sx, rng, name, groups):
    """g=1 (all heads share B, C) and g=h (no sharing); the default dims already cover 1 < g < h."""
    v = VARIANTS[name]
    dims = {"h": 4, "g": groups, "t": 37}
    inputs = v.make_inputs(rng, dims)
    init = v.make_initial_states(rng, dims)
    ref_outs, ref_states = v.reference(inputs, init)
    outs, states = sx.run(v, inputs, init, chunk_size=16)
    sx.compare(v, outs, states, ref_outs, ref_states, FP32_TOL)


def test_groups_matter(sx, rng):
    """Guard against a compiler that ignores `group`: heads of different groups must see different B, C."""
    v = VARIANTS["mamba2"]
    inputs = v.make_inputs(rng, {"h": 4, "g": 2, "t": 37})
    outs, _ = sx.run(v, inputs, chunk_size=16)
    wrong = dict(inputs)
    wrong["B"] = np.repeat(inputs["B"][:, :, :1], 2, axis=2)   # what a compiler using group 0 for all heads computes
    wrong["C"] = np.repeat(inputs["C"][:, :, :1], 2, axis=2)
    (ref_wrong,), _ = v.reference(wrong)
    (ref_right,), _ = v.reference(inputs)
    assert rel_l2(outs[0], ref_right) < FP32_TOL
    assert rel_l2(outs[0], ref_wrong) > 1e-2


LOW = [("bfloat16", jnp.bfloat16, 3e-2), ("float16", jnp.float16, 1e-2)]
# bf16 on every example; fp16 (the same code with another dtype) on one spec per form: SSD, key-wise, sequential
LOW_CASES = [pytest.param(n, *LOW[0], id=f"{n}-bfloat16") for n in NAMES] + \
    [pytest.param(n, *LOW[1], id=f"{n}-float16") for n in ("mamba2", "gla", "deltanet")]


@pytest.mark.parametrize("name,dtype_name,dtype,tol", LOW_CASES)
def test_low_precision_inputs(sx, rng, name, dtype_name, dtype, tol):
    """Inputs in bf16 / fp16: outs come back in the input dtype, states in float32, and both are close to
    the float64 reference evaluated on the rounded inputs."""
    v = VARIANTS[name]
    inputs32 = v.make_inputs(rng, {"t": 37})
    inputs = {k: jnp.asarray(a, dtype=dtype) for k, a in inputs32.items()}
    rounded = {k: np.asarray(a.astype(jnp.float32), dtype=np.float64) for k, a in inputs.items()}
    init = v.make_initial_states(rng, {"t": 37})           # states stay float32
    ref_outs, ref_states = v.reference(rounded, init)
    for chunk in (None, 16):
        outs, states = sx.run(v, inputs, init, chunk_size=chunk)
        sx.compare(v, outs, states, ref_outs, ref_states, tol, out_dtype=dtype, what=f" [{dtype_name}, chunk {chunk}]")


@pytest.mark.parametrize("name", NAMES)
def test_under_jit(sx, rng, name):
    v = VARIANTS[name]
    k = sx.kernel(name, 16)
    inputs = v.make_inputs(rng, {"t": 37})
    init = v.make_initial_states(rng, {"t": 37})
    ref_outs, ref_states = v.reference(inputs, init)

    @jax.jit
    def f(inp, st):
        return k(**sx.kwargs(v, inp, st))

    outs, states = sx.split(v, f(inputs, init))
    sx.compare(v, outs, states, ref_outs, ref_states, FP32_TOL, what=" [jit]")
    # jit without initial states too
    ref_outs0, ref_states0 = v.reference(inputs)
    outs0, states0 = sx.split(v, jax.jit(lambda inp: k(**inp))(inputs))
    sx.compare(v, outs0, states0, ref_outs0, ref_states0, FP32_TOL, what=" [jit, zero init]")


@pytest.mark.parametrize("with_init", [True], ids=["init"])  # zero states: every other test's default
@pytest.mark.parametrize("name", NAMES)
def test_under_vmap(sx, rng, name, with_init):
    """vmap over an extra leading axis of every input (and initial state): equals a loop over that axis,
    both against the reference and against the un-vmapped kernel."""
    v = VARIANTS[name]
    k = sx.kernel(name, 16)
    nv, dims = 2, {"t": 21, "b": 1}
    per = [v.make_inputs(rng, dims) for _ in range(nv)]
    inits = [v.make_initial_states(rng, dims) for _ in range(nv)] if with_init else None
    batched = {n: np.stack([p[n] for p in per]) for n in v.in_names}
    binit = {n: np.stack([s[n] for s in inits]) for n in v.state_names} if with_init else None

    if with_init:
        res = jax.vmap(lambda inp, st: k(**sx.kwargs(v, inp, st)))(batched, binit)
    else:
        res = jax.vmap(lambda inp: k(**inp))(batched)
    outs, states = sx.split(v, res)
    for i in range(nv):
        init_i = inits[i] if with_init else None
        ref_outs, ref_states = v.reference(per[i], init_i)
        sx.compare(v, [o[i] for o in outs], [s[i] for s in states], ref_outs, ref_states, FP32_TOL,
                   what=f" [vmap slice {i}]")
        one_outs, one_states = sx.run(v, per[i], init_i, kernel=k)
        for a, b in zip(list(outs) + list(states), list(one_outs) + list(one_states)):
            assert rel_l2(a[i], b) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_positional_call(sx, rng, name):
    """Inputs passed positionally in `in` order give the same results as the reference."""
    v = VARIANTS[name]
    k = sx.kernel(name, 16)
    inputs = v.make_inputs(rng, {"t": 37})
    ref_outs, ref_states = v.reference(inputs)
    outs, states = sx.split(v, k(*[inputs[n] for n in v.in_names]))
    sx.compare(v, outs, states, ref_outs, ref_states, FP32_TOL, what=" [positional]")


def test_compile_from_text(sx, rng):
    """The spec may be given as text as well as a path."""
    v = VARIANTS["mamba2"]
    k = ssmc.compile(v.spec_text, target="xla", chunk_size=16)
    inputs = v.make_inputs(rng, {"t": 37})
    init = v.make_initial_states(rng, {"t": 37})
    ref_outs, ref_states = v.reference(inputs, init)
    outs, states = sx.split(v, k(**inputs, initial_state=init["h"]))
    sx.compare(v, outs, states, ref_outs, ref_states, FP32_TOL, what=" [from text]")


def test_initial_state_is_used(sx, rng):
    """A nonzero initial state must change the result (guards against an ignored keyword)."""
    v = VARIANTS["linear_attention"]
    inputs = v.make_inputs(rng, {"t": 20})
    init = v.make_initial_states(rng, {"t": 20})
    outs0, _ = sx.run(v, inputs, None, chunk_size=16)
    outs1, states1 = sx.run(v, inputs, init, chunk_size=16)
    ref0, _ = v.reference(inputs)
    ref1, ref_states1 = v.reference(inputs, init)
    assert rel_l2(outs0[0], ref0[0]) < FP32_TOL
    assert rel_l2(outs1[0], ref1[0]) < FP32_TOL
    assert rel_l2(ref0[0], ref1[0]) > 1e-2


def test_bad_inputs_raise(sx, rng):
    v = VARIANTS["mamba2"]
    k = sx.kernel("mamba2", 16)
    inputs = v.make_inputs(rng, {"t": 37})
    missing = {n: a for n, a in inputs.items() if n != "C"}
    with pytest.raises(ssmc.SSMCError):
        k(**missing)
    bad_len = dict(inputs, B=inputs["B"][:, :30])          # t disagrees between x and B
    with pytest.raises(ssmc.SSMCError):
        k(**bad_len)
