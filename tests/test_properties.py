"""Property tests: over random small shapes and chunk sizes, the chunked kernel equals the sequential one
(chunk_size=1) and both equal the float64 reference."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import VARIANTS

TOL = 1e-4
CHUNKS = [2, 5, 8, 16, 32]     # few distinct values: compilation is cached per spec + options


def _err(a, b) -> float:
    """rel L2 error, with the reference norm floored at 0.05*sqrt(size) so that a tiny tensor whose entries
    happen to cancel (t=1, one head, one channel) cannot turn fp32 rounding into a large relative error."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if b.size == 0:  # a conv window of width-1 conv (k=1) is empty
        return 0.0
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 0.05 * np.sqrt(b.size)))


@st.composite
def problems(draw, name):
    v = VARIANTS[name]
    dims = {"b": draw(st.integers(1, 2)), "t": draw(st.integers(1, 70))}
    for d in v.small_dims:
        if d in dims:
            continue
        if any(d == gd for gd, _ in v.groups):
            continue
        dims[d] = draw(st.integers(1, 4)) if d == "h" else draw(st.integers(1, 8))
    for gd, hd in v.groups:
        h = dims[hd]
        dims[gd] = draw(st.sampled_from([g for g in range(1, h + 1) if h % g == 0]))
    chunk = draw(st.sampled_from(CHUNKS))
    with_init = draw(st.booleans())
    seed = draw(st.integers(0, 2**32 - 1))
    return dims, chunk, with_init, seed


def _check(sx, name, problem):
    dims, chunk, with_init, seed = problem
    v = VARIANTS[name]
    rng = np.random.default_rng(seed)
    inputs = v.make_inputs(rng, dims)
    init = v.make_initial_states(rng, dims) if with_init else None
    ref = v.reference(inputs, init)
    chunked = sx.run(v, inputs, init, chunk_size=chunk)
    seq = sx.run(v, inputs, init, chunk_size=1)
    msgs = []
    names = [f"out {n}" for n in v.out_names] + [f"state {n}" for n in v.state_names]
    for label, r, c, s in zip(names, ref[0] + ref[1], chunked[0] + chunked[1], seq[0] + seq[1]):
        e_c, e_s, e_cs = _err(c, r), _err(s, r), _err(c, s)
        if not (e_c < TOL and e_s < TOL and e_cs < TOL):
            msgs.append(f"{label}: chunked vs ref {e_c:.3g}, sequential vs ref {e_s:.3g}, chunked vs sequential {e_cs:.3g}")
    assert not msgs, f"{name} dims={dims} chunk={chunk} init={with_init}: " + "; ".join(msgs)


# one test function per variant, so each gets its own examples
@pytest.mark.parametrize("name", list(VARIANTS))
def test_chunked_equals_sequential_equals_reference(sx, name):
    @settings(max_examples=3, deadline=None)
    @given(problem=problems(name))
    def run(problem):
        _check(sx, name, problem)

    run()
