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


def _chunks_per_program(monkeypatch, per) -> list:
    """Triton's programs take `per` chunks each from given entering states (each chunk loading its own state);
    returns the list the calls' chunks per program are recorded in."""
    import jax

    from ssmc.targets import kernel_runtime, triton_runtime
    jax.clear_caches()  # the launchers pick it while tracing: no trace of an earlier test
    monkeypatch.setattr(triton_runtime, "GIVEN_WAVES", 0)  # as many chunks per program as allowed
    monkeypatch.setattr(triton_runtime, "GIVEN_CHUNKS_MAX", per)
    seen, pick = [], triton_runtime.entering_segments

    def spy(*a, **kw):
        n, sizes = pick(*a, **kw)
        seen.append(sizes[kernel_runtime.SEG_CHUNKS])
        return n, sizes
    monkeypatch.setattr(triton_runtime, "entering_segments", spy)
    return seen


@pytest.mark.parametrize("name,target,t,per", [("mamba2", "triton", 45, 1), ("mamba2", "triton", 45, 4),
                                               ("gla", "triton", 37, 1), ("gla", "triton", 37, 3),
                                               pytest.param("mamba2", "tpu", 29, 1, marks=pytest.mark.slow)])
def test_outs_from_given_entering_states(rng, monkeypatch, name, target, t, per):
    seen = _chunks_per_program(monkeypatch, per)
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
    assert target != "triton" or seen == [per], seen


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


def _adjoint_reference(log_a, dy, C, G_T, Q):
    """float64 loop of the adjoint recurrence over reversed time, G = exp(ℓ_t) G + C_t ⊗ dy_t (head i reads group
    i // (h/g)): (the states entering each chunk of the reverse walk, at entry nc-1-k for its k-th chunk from the
    last step; the state after the first step)."""
    b, T, h, p = dy.shape
    g = C.shape[2]
    nc = -(-T // Q)
    G = np.asarray(G_T, np.float64).copy()
    enter = np.zeros((nc,) + G.shape)
    for r in range(T):  # r: steps walked from the last
        t = T - 1 - r
        if r % Q == 0:
            enter[nc - 1 - r // Q] = G
        Ct = np.repeat(np.asarray(C[:, t], np.float64), h // g, axis=1)  # [b, h, n]
        G = np.exp(np.asarray(log_a[:, t], np.float64))[..., None, None] * G \
            + np.asarray(dy[:, t], np.float64)[..., :, None] * Ct[..., None, :]
    return enter, G


@pytest.mark.parametrize("target,segmented,per", [("triton", False, 1), ("triton", True, 3),
                                                  pytest.param("tpu", True, 1, marks=pytest.mark.slow)])
def test_reverse_walk_stores_the_adjoint_states_and_adj_runs_from_them(rng, monkeypatch, target, segmented, per):
    """The derived backward's `adj_entering` (a reverse-time walk, in place on triton, flipped around the kernels
    on tpu) stores the adjoint states entering each chunk: they and its final state must match a float64 loop, in
    one walk and in segments (whose per-segment arrays a reverse walk in place keeps in forward-time order). The adj
    pieces, run every chunk at once from those states (`entering=` on reverse-time kernels), must give the outs the
    whole adj program gives walking the sequence itself (`per` chunks per program on triton, each from its own
    state: in a reverse walk the program's k-th chunk is chunk N-1-k)."""
    from ssmc.api import compile_program
    seen = _chunks_per_program(monkeypatch, per)
    from ssmc.targets import kernel_runtime
    if segmented:
        monkeypatch.setattr(kernel_runtime, "pick_segments", lambda n_chunks, *a, **k: min(3, n_chunks))
    b, t, h, p, n, g = (1 if target == "tpu" else 2), 29, 4, 4, 8, 2
    k = ssmc.compile(str(VARIANTS["mamba2"].path), target=target, interpret=True, chunk_size=CHUNK)
    bw = k._derived_backward()
    assert sorted(bw.runs["adj"]) == ["adj:n", "adj:p", "adj:rest"] and "adj_entering" in bw.kernels
    # d dt in two parts: its state part with d x (which holds the state's tile whole), its in-chunk part in a piece
    # that reads no state (no state part, no forward states)
    assert bw.d.sums["adj"] == {"d_dt": ("d_dt_in", "d_dt_state")}, bw.d.sums
    rest = bw.kernels["adj:rest"]
    assert "part=in" in rest.ir and "part=state" not in rest.ir and "chunk.across" not in rest.ir, rest.ir
    assert "d_dt_state" in dict(bw.kernels["adj:p"].outs) and "h_fwd" not in dict(rest.inputs)
    wk = bw.kernels["adj_entering"]
    f32 = (lambda *s: np.asarray(rng.standard_normal(s), np.float32))
    feed = {"log_a_h": -np.abs(f32(b, t, h)) * 0.3, "dy": f32(b, t, h, p), "C": f32(b, t, g, n),
            "B": f32(b, t, g, n), "x": f32(b, t, h, p), "dt": np.abs(f32(b, t, h)),
            "h_fwd": f32(-(-t // CHUNK), b, h, p, n)}
    G_T = f32(b, h, p, n)
    enter_ref, G0_ref = _adjoint_reference(feed["log_a_h"], feed["dy"], feed["C"], G_T, CHUNK)
    enter, G0 = wk.apply({a: feed[a] for a, _ in wk.inputs}, G_T)
    assert rel_l2(np.asarray(enter, np.float64), enter_ref) < TOL
    assert rel_l2(np.asarray(G0, np.float64), G0_ref) < TOL
    # the pieces from the stored states against the whole adj program's own walk
    whole = compile_program(bw.d.programs["adj"], target=target, pipeline=k.pipeline, matmul="float32",
                            interpret=True, out_dtype=None)
    ref = whole.apply({a: feed[a] for a, _ in whole.inputs}, G_T)
    ref = dict(zip([o for o, _ in whole.outs], ref))
    got = {}
    for key in bw.runs["adj"]:
        pk = bw.kernels[key]
        res = pk.apply({a: feed[a] for a, _ in pk.inputs}, G_T, entering={"h": np.asarray(enter)})
        assert all(s is None for s in res[len(pk.outs):])
        got.update({o: np.asarray(r, np.float64) for (o, _), r in zip(pk.outs, res)})
    for o, parts in bw.d.sums["adj"].items():
        got[o] = sum(got.pop(x) for x in parts)
    assert set(got) == set(ref) - {"h"}, set(got)
    for o, v in got.items():
        assert rel_l2(v, np.asarray(ref[o], np.float64)) < TOL, o
    assert target != "triton" or set(seen) == {per}, seen
