"""The sequence-parallel (segmented) kernel schedule (issue 12, item 4), on the Triton and Pallas TPU interpreters.

With `segments=N` the time axis is cut into N segments of whole chunks: (a) every (batch, head, segment) program
computes its segment's state from zero and its total log-decay (+ count of negative factors), (b) a scan across
segments gives each segment its incoming state and the final state, (c) every program walks its segment from that
state writing the outputs. Forced at small sizes here (chunk 8, 2-4 segments, a partial last chunk and a partial
last segment, random initial states): outputs and final states must equal the one-walk schedule's and the float64
references (tests/reference.py, and a plain loop below for a data-dependent signed decay). The heuristic that picks
the segment count is unit-tested on its own.
"""
from __future__ import annotations

import numpy as np
import pytest

import ssmc
from reference import VARIANTS, rel_l2

TOL = 1e-4        # against the float64 references
SAME = 2e-5       # segmented against one walk (same maths, another summation order across segments)


@pytest.fixture
def launched(monkeypatch):
    """Names of the kernels every launch ran (both targets' runtimes)."""
    from ssmc.targets import pallas_runtime, triton_runtime
    names = []
    for mod in (triton_runtime, pallas_runtime):
        orig = mod.launch

        def rec(kernel, *a, _orig=orig, **kw):
            fn = getattr(kernel, "fn", kernel)
            names.append(getattr(fn, "__name__", str(fn)))
            return _orig(kernel, *a, **kw)
        monkeypatch.setattr(mod, "launch", rec)
    return names


def _run(spec, target, inputs, init, segments):
    k = ssmc.compile(spec, target=target, interpret=True, chunk_size=8, segments=segments)
    return k(**inputs, initial_states=init)


def _check(spec, target, inputs, init, ref, names, segments, launched):
    """Segmented == one walk == reference, for every out and final state; and the segment kernels ran."""
    seg = _run(spec, target, inputs, init, segments)
    assert any(n.endswith("_segment_states") for n in launched) and \
        any(n.endswith("_segment_outputs") for n in launched), launched
    launched.clear()
    one = _run(spec, target, inputs, init, 1)
    assert not any("segment" in n for n in launched), launched
    assert len(seg) == len(one) == len(ref) == len(names)
    for name, s, o, r in zip(names, seg, one, ref):
        s, o = np.asarray(s, np.float64), np.asarray(o, np.float64)
        assert s.shape == r.shape, (name, s.shape, r.shape)
        assert rel_l2(s, o) < SAME, f"{name}: segmented vs one walk, rel err {rel_l2(s, o):.2e}"
        assert rel_l2(s, r) < TOL, f"{name}: segmented vs reference, rel err {rel_l2(s, r):.2e}"


# (variant, target, t, segments): several chunks, a partial last chunk, and segments whose last one is shorter
VARIANT_CASES = [
    ("mamba2", "triton", 45, 3),            # groups (B, C shared by 2 heads); 6 chunks -> 3 segments of 2
    ("gla", "triton", 50, 4),               # key-wise decay; 7 chunks -> 4 segments: 2, 2, 2, 1
    ("linear_attention", "tpu", 40, 3),     # two states, no decay; 5 chunks -> 3 segments: 2, 2, 1
    pytest.param("mamba2", "tpu", 61, 3, marks=pytest.mark.slow),   # 8 chunks -> 3 segments: 3, 3, 2
    pytest.param("linear_attention", "triton", 70, 4, marks=pytest.mark.slow),
    pytest.param("mamba2_gated", "triton", 41, 2, marks=pytest.mark.slow),      # + the post-kernel grouped norm
]


@pytest.mark.parametrize("name,target,t,segments", VARIANT_CASES)
def test_segmented_equals_one_walk_and_reference(rng, launched, name, target, t, segments):
    v = VARIANTS[name]
    dims = {"t": t, "b": 1} if target == "tpu" else {"t": t}  # Pallas' interpreter walks every grid step: b=1
    inputs = v.make_inputs(rng, dims)
    init = v.make_initial_states(rng, dims)
    outs, states = v.reference(inputs, init)
    _check(str(v.path), target, inputs, init, list(outs) + list(states), v.out_names + v.state_names, segments,
           launched)


@pytest.mark.slow
def test_retnet_negative_gamma(rng, launched):
    """A constant signed decay: heads with negative gamma; the last segment has an odd number of steps, so the
    final state needs the segment's sign (-1)^steps."""
    v = VARIANTS["retnet"]
    t = 45
    inputs = v.make_inputs(rng, {"t": t})
    inputs["gamma"] = np.array([-0.9, 0.95, -0.85], np.float32)
    init = v.make_initial_states(rng, {"t": t})
    outs, states = v.reference(inputs, init)
    _check(str(v.path), "triton", inputs, init, list(outs) + list(states), v.out_names + v.state_names, 3, launched)


SIGNED = """
ssm signed {
  dims b, t, h, dk, dv
  scan t
  in q[b,t,h,dk], k[b,t,h,dk], v[b,t,h,dv], a[b,t,h]
  state S[b,h,dk,dv]
  out o[b,t,h,dv]

  S = a*S + k⊗v
  o = q·S
}
"""


def _signed_reference(q, k, v, a, S0):
    """float64 loop: S_t = a_t S_{t-1} + k_t v_t^T, o_t = q_t S_t."""
    q, k, v, a, S = (np.asarray(x, np.float64) for x in (q, k, v, a, S0))
    o = np.zeros(q.shape[:3] + (v.shape[-1],))
    for t in range(q.shape[1]):
        S = a[:, t, :, None, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return o, S


@pytest.mark.parametrize("target,t,segments", [("tpu", 56, 4), pytest.param("triton", 67, 3,
                                                                             marks=pytest.mark.slow)])
def test_data_dependent_signed_decay(rng, launched, target, t, segments):
    """Decays of either sign per step: a segment's decay carries the parity of its negative factors, which is
    odd for some (batch, head, segment) and even for others."""
    b, h, dk, dv = (1 if target == "tpu" else 2), 3, 8, 6  # Pallas' interpreter walks every grid step: b=1
    q, k = rng.standard_normal((2, b, t, h, dk)).astype(np.float32) * 0.5
    v = rng.standard_normal((b, t, h, dv)).astype(np.float32)
    a = (rng.uniform(0.6, 1.0, (b, t, h)) * rng.choice([-1.0, 1.0], (b, t, h))).astype(np.float32)
    S0 = rng.standard_normal((b, h, dk, dv)).astype(np.float32)
    o, S = _signed_reference(q, k, v, a, S0)
    _check(SIGNED, target, {"q": q, "k": k, "v": v, "a": a}, {"S": S0}, [o, S], ("o", "S"), segments, launched)


# ---- the segment count ------------------------------------------------------------------------------------------
def test_pick_segments_heuristic():
    from ssmc.targets.kernel_runtime import SEG_MIN_CHUNKS, pick_segments
    # Mamba2 on an H200 (132 SMs), chunk 64, h=80: b=1 L=65536 has 80 programs and 1024 chunks -> segments
    assert pick_segments(65536 // 64, 80, 132) > 1
    # b=4 L=2048: 320 programs fill the device -> one walk
    assert pick_segments(2048 // 64, 4 * 80, 132) == 1
    # few chunks: every segment keeps at least SEG_MIN_CHUNKS chunks
    assert pick_segments(SEG_MIN_CHUNKS + 3, 1, 132) == 1
    n = pick_segments(100, 1, 132)
    assert 1 < n and 100 // n >= SEG_MIN_CHUNKS
    # a walk whose programs hold the whole state tile (no split dim: the derived adjoint) segments below 3x the
    # cores: b=4 L=8192 h=80 -> 320 programs, 128 chunks -> 4 segments; b=4 L=2048 still walks once (32 chunks)
    from ssmc.targets.kernel_runtime import SEG_BELOW_WHOLE
    assert pick_segments(8192 // 64, 4 * 80, 132) == 1
    assert pick_segments(8192 // 64, 4 * 80, 132, SEG_BELOW_WHOLE) == 4
    assert pick_segments(2048 // 64, 4 * 80, 132, SEG_BELOW_WHOLE) == 1


def test_segments_of_a_call():
    """The compiled launcher's choice: from the sizes and cores, or forced; whole chunks, no empty segment."""
    from ssmc.targets import kernel_runtime as kr
    k = ssmc.compile(str(VARIANTS["mamba2"].path), target="triton", interpret=True)
    lay = k._module.LAYOUT
    big = {"b": 1, "t": 65536, "h": 80, "p": 64, "n": 128, "g": 1}
    n, sizes = kr.segments(lay, big, None, 132)
    assert n > 1 and sizes["~seg"] == n and n * sizes["~seg_chunks"] >= 65536 // lay["Q"]
    assert kr.segments(lay, {**big, "b": 4, "t": 2048}, None, 132)[0] == 1
    # forced: 6 chunks in 4 segments -> segments of 2 chunks, so 3 of them; never more segments than chunks
    small = {"b": 2, "t": 6 * lay["Q"] - 3, "h": 4, "p": 8, "n": 8, "g": 2}
    assert kr.segments(lay, small, 4, 132)[0] == 3
    assert kr.segments(lay, small, 50, 132)[0] == 6
    assert kr.segments(lay, small, 1, 132)[0] == 1


def test_schedule_in_source_and_ir():
    k = ssmc.compile(str(VARIANTS["mamba2"].path), target="tpu", interpret=True)
    assert "schedule: one walk per program, or sequence-parallel segments" in k.ir
    for what in ("def mamba2_segment_states(", "def mamba2_segment_outputs(", "rt.segment_scan(",
                 "# (a) every program and segment", "# (b) the scan across segments", "# (c) every program",
                 "#   buffer h:segment[segment,b,h,p,n] (fp32): segment_states -> segment scan",
                 "#   buffer h:decay[segment,b,h] (fp32): segment_states -> segment scan",
                 "#   buffer h:in[segment,b,h,p,n] (fp32): segment scan -> segment_outputs"):
        assert what in k.source, what
    seq = ssmc.compile(str(VARIANTS["deltanet"].path), target="triton", interpret=True)
    assert "schedule: one walk per program (sequential form" in seq.ir
    assert "segment_states" not in seq.source


def test_segments_option_errors():
    with pytest.raises(ssmc.SSMCError, match="segments"):
        ssmc.compile(str(VARIANTS["mamba2"].path), target="triton", interpret=True, segments=0)
    with pytest.raises(ssmc.SSMCError, match="segments"):
        ssmc.compile(str(VARIANTS["mamba2"].path), target="xla", segments=2)



def test_segments_on_a_schedule_without_segments_warns():
    """segments=N for a spec whose kernels have no segment schedule (a sequential form) says it is ignored."""
    for _ in range(2):  # compiled, then from the in-process cache
        with pytest.warns(UserWarning, match="segments=2 is ignored for 'deltanet'"):
            k = ssmc.compile(str(VARIANTS["deltanet"].path), target="triton", interpret=True, segments=2)
    assert "segment_states" not in k.source
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a schedule with segments takes it quietly
        ssmc.compile(str(VARIANTS["mamba2"].path), target="triton", interpret=True, segments=2)
