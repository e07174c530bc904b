"""A kernel call from given states entering each chunk (`k.apply(..., entering={state: [chunks, *dims]})`, the
derived backward's dq; targets/base.py ENTERING), on the Triton and Pallas TPU interpreters.

Every chunk is then a segment of its own: step (c) alone runs all chunks in parallel from the given states. The
states come from the float64 references (the final state of each prefix of whole chunks, with a random initial
state), so the outs must equal the references' whatever the kernel computes itself; the final states come back as
None. Bad `entering` arguments get errors naming the state and the expected shape.
"""
from __future__ import annotations

import numpy as np
import pytest

import ssmc
from reference import VARIANTS, rel_l2
from ssmc.errors import ShapeError, SSMCError

TOL = 1e-4
CHUNK = 8


def _prefix(k, inputs: dict, steps: int) -> dict:
    """The inputs cut to their first `steps` steps along the scan dim (inputs without it as they are)."""
    scan = k.program.scan
    dims = dict(k.inputs)
    return {n: (np.take(a, np.arange(steps), axis=dims[n].index(scan)) if scan in dims[n] else a)
            for n, a in inputs.items()}


def _entering(k, v, inputs, init, T):
    """{state: the float64 reference's state entering each chunk}, from the references of the prefixes."""
    chunks = -(-T // CHUNK)
    per = []
    for c in range(chunks):
        if c == 0:
            per.append([np.asarray(init[s], np.float64) for s in v.state_names])
        else:
            _, states = v.reference(_prefix(k, inputs, c * CHUNK), init)
            per.append([np.asarray(x, np.float64) for x in states])
    return {s: np.stack([p[j] for p in per]).astype(np.float32) for j, s in enumerate(v.state_names)}


@pytest.mark.parametrize("name,target,t", [("mamba2", "triton", 45), ("gla", "triton", 37),
                                           pytest.param("mamba2", "tpu", 29, marks=pytest.mark.slow)])
def test_outs_from_given_entering_states(rng, name, target, t):
    v = VARIANTS[name]
    dims = {"t": t, "b": 1} if target == "tpu" else {"t": t}  # Pallas' interpreter walks every grid step: b=1
    inputs = v.make_inputs(rng, dims)
    init = v.make_initial_states(rng, dims)
    k = ssmc.compile(str(v.path), target=target, interpret=True, chunk_size=CHUNK)
    outs, _ = v.reference(inputs, init)
    res = k.apply(inputs, init, entering=_entering(k, v, inputs, init, t))
    assert len(res) == len(v.out_names) + len(v.state_names)
    for oname, got, ref in zip(v.out_names, res, outs):
        got = np.asarray(got, np.float64)
        assert got.shape == ref.shape and rel_l2(got, ref) < TOL, (oname, rel_l2(got, ref))
    assert all(s is None for s in res[len(v.out_names):]), "no walk reaches the end: no final state"


def test_entering_errors(rng):
    v = VARIANTS["mamba2"]
    inputs = v.make_inputs(rng, {"t": 20})
    k = ssmc.compile(str(v.path), target="triton", interpret=True, chunk_size=CHUNK)
    b, _, h, p = inputs["x"].shape
    n = inputs["B"].shape[-1]
    good = np.asarray(rng.standard_normal((3, b, h, p, n)), np.float32)
    with pytest.raises(ShapeError, match=r"entering\['h'\]: shape \(2, .*expected \(3, "):
        k.apply(inputs, entering={"h": good[:2]})
    with pytest.raises(ShapeError, match="unknown state 'S'"):
        k.apply(inputs, entering={"S": good})
    kx = ssmc.compile(str(v.path), target="xla", chunk_size=CHUNK)
    with pytest.raises(SSMCError, match="entering= needs"):
        kx.apply(inputs, entering={"h": good})
