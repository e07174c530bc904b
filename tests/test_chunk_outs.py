"""Outs indexed by chunk (the chunk-index dim `t#`, passes/chunk.py chunk_dim) on every target: the state entering
each chunk (`%h.enter`, chunk.pass's value) returned as an out h_enter[b, t#, h, p, n] with ceil(T / Q) entries.

The out is made by a test-only pass appended after `chunk` (`out %h.enter {out=h_enter}`) on Mamba2's step program
with `t#` among its dims and the out declared; the kernels run through compile_program and are checked against a
float64 numpy loop: entry c is the state before the chunk's first step (the initial state for chunk 0). Cases: a
length that is a multiple of the chunk length and one that is not, random initial states, the xla target, Triton's
interpreter and Pallas' TPU interpreter, a reverse-time program (the walk's k-th chunk from the last step is entry
nc-1-k), the segmented schedule of the kernel targets (only the outputs walk (c) stores, at the global chunk index),
the outs' dtypes, the errors (a sequential program, packed calls), and the Pallas kernel lowered for TPU."""
from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmc
from ssmc import passes
from ssmc.api import compile_program
from ssmc.errors import ShapeError, SSMCError
from ssmc.ir import Array, make
from ssmc.passes.chunk import chunk_dim
from ssmc.targets import get_target

from reference import VARIANTS, rel_l2

V = VARIANTS["mamba2"]
TOL = 1e-4
SAME = 2e-5  # segmented against one walk


@dataclasses.dataclass(frozen=True)
class EnterOut:
    """Test-only pass, after `chunk`: the state entering each chunk of state h as the out h_enter (fp32: kept in
    float32 whatever the call's out dtype). A sequential program has no %h.enter: nothing is added (the emitters
    then refuse the declared out)."""
    fp32: bool = False
    name = "enter-out"

    def run(self, p):
        by = p.by_name()
        if "%h.enter" not in by:
            return p
        attrs = {"fp32": True} if self.fp32 else {}
        return p.with_instrs(p.instrs + (make("out.h_enter", "out", ("%h.enter",), by["%h.enter"].dims,
                                              out="h_enter", **attrs),))


def program(reverse: bool = False):
    """Mamba2's step program with `t#` before the scan dim and the out h_enter[b, t#, h, p, n] declared."""
    p = ssmc.check(str(V.path))
    cd = chunk_dim(p.scan)
    k = p.dims.index(p.scan)
    p = dataclasses.replace(p, dims=p.dims[:k] + (cd,) + p.dims[k:],
                            outs=p.outs + (Array("h_enter", ("b", cd, "h", "p", "n")),))
    return dataclasses.replace(p, reverse=True) if reverse else p


def pipeline(target: str, chunk: int, fp32: bool = False) -> str:
    opt = "{fp32=true}" if fp32 else ""
    return re.sub(r"(chunk\{[^}]*\})", rf"\1,enter-out{opt}", get_target(target).pipeline(chunk))


@functools.lru_cache(maxsize=None)
def kernel(target: str, chunk: int, reverse: bool = False, fp32: bool = False, segments: int | None = None,
           interpret: bool = True):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(passes.PASSES, "enter-out", EnterOut)
        k = compile_program(program(reverse), target=target, pipeline=pipeline(target, chunk, fp32),
                            interpret=interpret and target != "xla", cache=False)
    if segments is not None:
        k._opts["segments"] = segments  # as compile(..., segments=N) sets it
    return k


def loop(inputs, h0, Q: int, reverse: bool = False):
    """float64 Mamba2 walk: (y, the state entering each chunk [b, nc, h, p, n], final state). A reverse-time walk
    starts at the last step; its k-th chunk (from the last step) is entry nc-1-k."""
    x, dt, A, B, C, D = (np.asarray(inputs[n], np.float64) for n in ("x", "dt", "A", "B", "C", "D"))
    b, T, H, P = x.shape
    rep = H // B.shape[2]
    Bh, Ch = np.repeat(B, rep, axis=2), np.repeat(C, rep, axis=2)
    nc = -(-T // Q)
    h = np.asarray(h0, np.float64).copy()
    enter = np.full((b, nc) + h.shape[1:], np.nan)
    y = np.zeros(x.shape)
    for k, t in enumerate(range(T - 1, -1, -1) if reverse else range(T)):
        if k % Q == 0:
            enter[:, nc - 1 - k // Q if reverse else k // Q] = h
        a = np.exp(dt[:, t] * A[None, :])
        h = a[:, :, None, None] * h + dt[:, t][:, :, None, None] * x[:, t][:, :, :, None] * Bh[:, t][:, :, None, :]
        y[:, t] = np.einsum("bhn,bhpn->bhp", Ch[:, t], h) + D[None, :, None] * x[:, t]
    assert not np.isnan(enter).any()
    return y, enter, h


def data(rng, T: int):
    dims = V.dims(t=T)
    return V.make_inputs(rng, dims), V.make_initial_states(rng, dims)["h"]


def check(k, inputs, h0, Q: int, reverse: bool = False, tol: float = TOL):
    y, enter, final = k.apply(inputs, {"h": h0})
    ry, renter, rfinal = loop(inputs, h0, Q, reverse)
    assert enter.shape == renter.shape, (enter.shape, renter.shape)
    for name, got, want in (("h_enter", enter, renter), ("y", y, ry), ("h final", final, rfinal)):
        err = rel_l2(np.asarray(got, np.float64), want)
        assert err < tol, f"{k.target}: {name} rel L2 error {err:.3g}"
    return enter


def test_loop_matches_reference(rng):
    """The test's loop is Mamba2 (tests/reference.py's), and entry 0 is the initial state."""
    inputs, h0 = data(rng, 21)
    y, enter, final = loop(inputs, h0, 8)
    (ry,), (rh,) = V.reference(inputs, {"h": h0})
    assert rel_l2(y, ry) < 1e-12 and rel_l2(final, rh) < 1e-12
    assert enter.shape[1] == 3 and np.array_equal(enter[:, 0], np.asarray(h0, np.float64))


# (chunk length, T): T a multiple of the chunk length, T not (a partial last chunk), T shorter than one chunk
CASES = [(16, 48), (16, 37), (16, 9)]
TARGETS = ["xla", "triton", "tpu"]


@pytest.mark.parametrize("Q,T", CASES, ids=[f"q{q}-t{t}" for q, t in CASES])
@pytest.mark.parametrize("target", TARGETS)
def test_enter_states(rng, target, Q, T):
    inputs, h0 = data(rng, T)
    enter = check(kernel(target, Q), inputs, h0, Q)
    assert np.asarray(enter).dtype == np.float32
    assert rel_l2(np.asarray(enter[:, 0], np.float64), np.asarray(h0, np.float64)) < 1e-6  # chunk 0: the initial


@pytest.mark.parametrize("Q,T", CASES[:2], ids=[f"q{q}-t{t}" for q, t in CASES[:2]])
@pytest.mark.parametrize("target", TARGETS)
def test_reverse_program(rng, target, Q, T):
    """A reverse-time program walks from the last step (Triton in place, the others on flipped arrays): entry c is
    the walk's state entering its chunk nc-1-c; for T a multiple of Q that is the chunk over forward steps
    [c*Q, (c+1)*Q), entered with the state after step (c+1)*Q of the reversed walk."""
    inputs, h0 = data(rng, T)
    enter = check(kernel(target, Q, reverse=True), inputs, h0, Q, reverse=True)
    nc = -(-T // Q)
    # the last entry is the walk's first chunk: the initial state
    assert rel_l2(np.asarray(enter[:, nc - 1], np.float64), np.asarray(h0, np.float64)) < 1e-6


# 8 chunks (the last one partial) in 3 segments of 3, 3 and 2 chunks
SEG_CASES = [("triton", False), ("triton", True), ("tpu", False), ("tpu", True)]


@pytest.mark.slow
@pytest.mark.parametrize("target,reverse", SEG_CASES, ids=[f"{t}-{'rev' if r else 'fwd'}" for t, r in SEG_CASES])
def test_segmented_schedule(rng, launched, target, reverse):
    """The segmented schedule: (a) segment states store nothing per chunk, (c) segment outputs store the state
    entering each chunk (from the segment's incoming state) at the global chunk index; same as one walk."""
    Q, T = 8, 61
    inputs, h0 = data(rng, T)
    seg = check(kernel(target, Q, reverse, segments=3), inputs, h0, Q, reverse)
    assert any(n.endswith("_segment_states") for n in launched) and \
        any(n.endswith("_segment_outputs") for n in launched), launched
    launched.clear()
    one = check(kernel(target, Q, reverse, segments=1), inputs, h0, Q, reverse)
    assert not any("segment" in n for n in launched), launched
    assert rel_l2(np.asarray(seg, np.float64), np.asarray(one, np.float64)) < SAME


def test_segment_kernels_source():
    """Only the outputs walk (c) stores the entering state; (a) has no store of h_enter."""
    src = kernel("triton", 8).source
    states = src.split("def mamba2_segment_states(")[1].split("def mamba2_segment_outputs(")[0]
    outputs = src.split("def mamba2_segment_outputs(")[1].split("\ndef mamba2(")[0]
    assert "h_enter" not in states
    assert "tl.store(h_enter_ptr" in outputs and "i_tc = c" in outputs
    assert "i_tc = N_tc - 1 - c" in kernel("triton", 8, reverse=True).source
    assert "chunk=8," in src  # MODULE_INFO: the chunk length outs indexed by chunk follow


@pytest.mark.parametrize("target", TARGETS)
def test_dtypes(rng, target):
    """bf16 activations: h_enter in bf16 like the other outs; fp32=True on its out instruction keeps it float32."""
    Q, T = 16, 37
    inputs, h0 = data(rng, T)
    bf = {n: jnp.asarray(x, jnp.bfloat16) if n in ("x", "B", "C") else x for n, x in inputs.items()}
    ref = loop({n: np.asarray(x, np.float32) for n, x in bf.items()}, h0, Q)[1]
    for fp32, dtype in ((False, jnp.bfloat16), (True, jnp.float32)):
        y, enter, final = kernel(target, Q, fp32=fp32).apply(bf, {"h": h0})
        assert y.dtype == jnp.bfloat16 and enter.dtype == dtype and final.dtype == jnp.float32, \
            (y.dtype, enter.dtype, final.dtype)
        assert rel_l2(np.asarray(enter.astype(jnp.float32), np.float64), ref) < 3e-2


def test_inside_jit_and_new_lengths(rng):
    """Under jax.jit, and a kernel called at several lengths (t# follows T: the Triton kernel takes it at run
    time)."""
    Q = 16
    for target in ("xla", "triton"):
        k = kernel(target, Q)
        f = jax.jit(lambda i, h: k.apply(i, {"h": h}))
        for T in (37, 70):
            inputs, h0 = data(rng, T)
            y, enter, final = f(inputs, h0)
            assert enter.shape == (2, -(-T // Q), 4, 8, 8)
            assert rel_l2(np.asarray(enter, np.float64), loop(inputs, h0, Q)[1]) < TOL


@pytest.mark.parametrize("target", TARGETS)
def test_sequential_program_refused(target):
    """A sequential program has no chunks to index: the emitter raises a clear SSMCError."""
    with pytest.raises(SSMCError, match="indexed by chunk.*sequential scan"):
        kernel(target, 1)


def test_packed_call_refused(rng):
    inputs, h0 = data(rng, 20)
    one = {n: x[:1] if n in ("x", "dt", "B", "C") else x for n, x in inputs.items()}
    with pytest.raises(ShapeError, match="h_enter.*indexed by chunk"):
        kernel("xla", 16).apply(one, {"h": h0}, cu_seqlens=np.array([0, 7, 20], np.int32))


def test_module_info_records_the_chunk_length():
    """MODULE_INFO carries the chunk length (the call sizes t# from it); a record without it is refused."""
    from ssmc.targets.base import ModuleInfo
    for target in TARGETS:
        k = kernel(target, 16)
        assert k._info.chunk == 16 and "    chunk=16," in k.source
    info = kernel("xla", 16)._info
    k = kernel("xla", 16)
    with pytest.raises(SSMCError, match="indexed by chunk"):
        dataclasses.replace(info, chunk=0).check(k._module, "xla", k.inputs, k.states, k.outs)
    assert "chunk=" not in ModuleInfo.build("xla", "f", [], [], ("mm", "out_dtype")).source()


def test_lowers_for_tpu():
    """The Pallas kernels with the out (one walk and the segment kernels) lower for TPU without a TPU: the out's
    BlockSpec is indexed by the chunk grid axis."""
    Q, T = 16, 300
    inputs, h0 = data(np.random.default_rng(0), T)
    ins = {n: jax.ShapeDtypeStruct(x.shape, jnp.float32) for n, x in inputs.items()}
    st = jax.ShapeDtypeStruct(h0.shape, jnp.float32)
    for segments in (1, 3):
        k = kernel("tpu", Q, segments=segments, interpret=False)
        exported = jax.export.export(jax.jit(lambda i, h: k.apply(i, {"h": h})), platforms=["tpu"])(ins, st)
        assert "tpu_custom_call" in exported.mlir_module()
        assert exported.out_avals[1].shape == (2, -(-T // Q), 4, 8, 8)
