"""Inputs indexed by chunk (the chunk-index dim `t#`, passes/chunk.py chunk_dim) on every target: an `in` array
S_fwd[b, t#, h, p, n] (a state's dims plus t#, ceil(T / Q) entries) that each chunk of the walk loads at its start.

Mamba2's step program gets the input declared (and its `input` instruction); a test-only pass appended after `chunk`
reads it in the chunked program, two ways:
  - "mul": the out yc[b, t#, h, p, n] = S_fwd * %h.enter (the state entering each chunk), an out indexed by chunk
    of a per-chunk value computed from the loaded tile (no other op involved);
  - "across": the out z[b, t, h] = chunk.across(S_fwd, %h.enter): Σ_{p,n} S_fwd[chunk] * S_enter[chunk] at every
    step of the chunk (the op passes/chunk.py lowers `across` to; its emitters are kernel_body / xla's).
Checked against a float64 numpy loop: entry c of S_fwd is read by the chunk over steps [c*Q, (c+1)*Q); a reverse-time
program's k-th chunk from the last step reads entry nc-1-k. Cases: T a multiple of the chunk length and not, random
initial states, xla / Triton's interpreter / Pallas' TPU interpreter, a reverse program, the segmented schedule
(only the outputs walk (c) loads it, at the global chunk index), a bf16 input, the wrong number of chunks (a
ShapeError), packed calls and sequential programs refused, and the Pallas kernels lowered for TPU."""
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
SD = ("b", "t#", "h", "p", "n")  # S_fwd's dims: the state's plus t#


@dataclasses.dataclass(frozen=True)
class ReadChunkInput:
    """Test-only pass, after `chunk`: read the input S_fwd per chunk ("mul": out yc = S_fwd * %h.enter, indexed by
    chunk; "across": out z = chunk.across(S_fwd, %h.enter) over [b, t, h]). A sequential program has no %h.enter:
    nothing is added (the emitters then refuse the declared input)."""
    mode: str = "mul"
    name = "read-chunk-input"

    def run(self, p):
        by = p.by_name()
        if "%h.enter" not in by:
            return p
        e = by["%h.enter"]
        S_fwd = next(i.name for i in p.instrs if i.op == "input" and i.attr("array") == "S_fwd")
        if self.mode == "mul":
            v = make("%yc", "mul", (S_fwd, "%h.enter"), e.dims)
            return p.with_instrs(p.instrs + (v, make("out.yc", "out", ("%yc",), e.dims, out="yc")))
        Q = next(i.attr("chunk") for i in p.instrs if i.op == "chunk.cumsum")
        # the scan dim and the dims of the state that are not its p, n (xla splits h into g, h/g)
        dims = tuple(d for d in p.dims if d == p.scan or (d in e.dims and d not in ("p", "n", chunk_dim(p.scan))))
        z = make("%z", "chunk.across", (S_fwd, "%h.enter"), dims, chunk=Q, state="h", stage="chunk_output")
        return p.with_instrs(p.instrs + (z, make("out.z", "out", ("%z",), dims, out="z")))


def program(mode: str = "mul", reverse: bool = False):
    """Mamba2's step program with `t#` before the scan dim, the input S_fwd[b, t#, h, p, n] and the out."""
    p = ssmc.check(str(V.path))
    cd = chunk_dim(p.scan)
    k = p.dims.index(p.scan)
    n = max(j for j, i in enumerate(p.instrs) if i.op == "input") + 1
    out = Array("yc", SD) if mode == "mul" else Array("z", ("b", "t", "h"))
    p = dataclasses.replace(p, dims=p.dims[:k] + (cd,) + p.dims[k:], inputs=p.inputs + (Array("S_fwd", SD),),
                            outs=p.outs + (out,),
                            instrs=p.instrs[:n] + (make("%S_fwd", "input", (), SD, array="S_fwd"),) + p.instrs[n:])
    return dataclasses.replace(p, reverse=True) if reverse else p


def pipeline(target: str, chunk: int, mode: str) -> str:
    return re.sub(r"(chunk\{[^}]*\})", rf"\1,read-chunk-input{{mode={mode}}}", get_target(target).pipeline(chunk))


@functools.lru_cache(maxsize=None)
def kernel(target: str, chunk: int, mode: str = "mul", reverse: bool = False, segments: int | None = None,
           interpret: bool = True):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(passes.PASSES, "read-chunk-input", ReadChunkInput)
        k = compile_program(program(mode, reverse), target=target, pipeline=pipeline(target, chunk, mode),
                            interpret=interpret and target != "xla", cache=False)
    if segments is not None:
        k._opts["segments"] = segments  # as compile(..., segments=N) sets it
    return k


def loop(inputs, h0, S, Q: int, reverse: bool = False):
    """float64 Mamba2 walk reading S per chunk: (y, yc = S * the state entering each chunk [b, nc, h, p, n], z =
    Σ_{p,n} S[chunk] * S_enter at each step [b, T, h], final state). A reverse-time walk starts at the last step; its
    k-th chunk (from the last step) reads entry nc-1-k."""
    x, dt, A, B, C, D = (np.asarray(inputs[n], np.float64) for n in ("x", "dt", "A", "B", "C", "D"))
    S = np.asarray(S, np.float64)
    b, T, H, P = x.shape
    rep = H // B.shape[2]
    Bh, Ch = np.repeat(B, rep, axis=2), np.repeat(C, rep, axis=2)
    nc = -(-T // Q)
    assert S.shape[1] == nc
    h = np.asarray(h0, np.float64).copy()
    yc = np.full(S.shape, np.nan)
    z, y = np.zeros((b, T, H)), np.zeros(x.shape)
    for k, t in enumerate(range(T - 1, -1, -1) if reverse else range(T)):
        if k % Q == 0:
            c = nc - 1 - k // Q if reverse else k // Q
            yc[:, c] = S[:, c] * h
            zc = np.einsum("bhpn,bhpn->bh", S[:, c], h)
        z[:, t] = zc
        a = np.exp(dt[:, t] * A[None, :])
        h = a[:, :, None, None] * h + dt[:, t][:, :, None, None] * x[:, t][:, :, :, None] * Bh[:, t][:, :, None, :]
        y[:, t] = np.einsum("bhn,bhpn->bhp", Ch[:, t], h) + D[None, :, None] * x[:, t]
    assert not np.isnan(yc).any()
    return y, yc, z, h


def data(rng, T: int, Q: int, dtype=np.float32):
    dims = V.dims(t=T)
    inputs, h0 = V.make_inputs(rng, dims), V.make_initial_states(rng, dims)["h"]
    S = rng.standard_normal((h0.shape[0], -(-T // Q)) + h0.shape[1:]).astype(dtype)
    return inputs, h0, S


def check(k, inputs, h0, S, Q: int, mode: str = "mul", reverse: bool = False, tol: float = TOL):
    y, got, final = k.apply({**inputs, "S_fwd": S}, {"h": h0})
    ry, ryc, rz, rfinal = loop(inputs, h0, S, Q, reverse)
    want = ryc if mode == "mul" else rz
    assert got.shape == want.shape, (got.shape, want.shape)
    for name, a, b in ((mode, got, want), ("y", y, ry), ("h final", final, rfinal)):
        err = rel_l2(np.asarray(a, np.float64), b)
        assert err < tol, f"{k.target}: {name} rel L2 error {err:.3g}"
    return got


def test_loop_matches_reference(rng):
    """The test's loop is Mamba2 (tests/reference.py's); chunk 0 reads entry 0 with the initial state."""
    inputs, h0, S = data(rng, 21, 8)
    y, yc, z, final = loop(inputs, h0, S, 8)
    (ry,), (rh,) = V.reference(inputs, {"h": h0})
    assert rel_l2(y, ry) < 1e-12 and rel_l2(final, rh) < 1e-12
    assert np.allclose(yc[:, 0], S[:, 0] * np.asarray(h0, np.float64))


# (chunk length, T): T a multiple of the chunk length, T not (a partial last chunk), T shorter than one chunk
CASES = [(16, 48), (16, 37), (16, 9)]
TARGETS = ["xla", "triton", "tpu"]


@pytest.mark.parametrize("Q,T", CASES, ids=[f"q{q}-t{t}" for q, t in CASES])
@pytest.mark.parametrize("target", TARGETS)
def test_loaded_per_chunk(rng, target, Q, T):
    """yc = S_fwd * the entering state, per chunk: each chunk read its own entry of S_fwd."""
    inputs, h0, S = data(rng, T, Q)
    check(kernel(target, Q), inputs, h0, S, Q)


@pytest.mark.parametrize("Q,T", CASES[:2], ids=[f"q{q}-t{t}" for q, t in CASES[:2]])
@pytest.mark.parametrize("target", TARGETS)
def test_chunk_across(rng, target, Q, T):
    """chunk.across reads the loaded tile: Σ_{p,n} S_fwd[chunk] * S_enter at every step of the chunk."""
    inputs, h0, S = data(rng, T, Q)
    check(kernel(target, Q, "across"), inputs, h0, S, Q, "across")


@pytest.mark.parametrize("Q,T", CASES[:2], ids=[f"q{q}-t{t}" for q, t in CASES[:2]])
@pytest.mark.parametrize("target", TARGETS)
def test_reverse_program(rng, target, Q, T):
    """A reverse-time program walks from the last step (Triton in place, the others on flipped arrays, S_fwd's t#
    flipped too): the walk's k-th chunk reads entry nc-1-k."""
    inputs, h0, S = data(rng, T, Q)
    check(kernel(target, Q, reverse=True), inputs, h0, S, Q, reverse=True)
    check(kernel(target, Q, "across", reverse=True), inputs, h0, S, Q, "across", reverse=True)


# 8 chunks (the last one partial) in 3 segments of 3, 3 and 2 chunks
SEG_CASES = [("triton", False), ("triton", True), ("tpu", False), ("tpu", True)]


@pytest.mark.slow
@pytest.mark.parametrize("target,reverse", SEG_CASES, ids=[f"{t}-{'rev' if r else 'fwd'}" for t, r in SEG_CASES])
def test_segmented_schedule(rng, launched, target, reverse):
    """The segmented schedule: (c) segment outputs load S_fwd at the global chunk index (segment start + local
    chunk); (a) segment states never load it; same as one walk."""
    Q, T = 8, 61
    inputs, h0, S = data(rng, T, Q)
    for mode in ("mul", "across"):
        launched.clear()
        seg = check(kernel(target, Q, mode, reverse, segments=3), inputs, h0, S, Q, mode, reverse)
        assert any(n.endswith("_segment_states") for n in launched) and \
            any(n.endswith("_segment_outputs") for n in launched), launched
        launched.clear()
        one = check(kernel(target, Q, mode, reverse, segments=1), inputs, h0, S, Q, mode, reverse)
        assert not any("segment" in n for n in launched), launched
        assert rel_l2(np.asarray(seg, np.float64), np.asarray(one, np.float64)) < SAME


def test_segment_kernels_source():
    """Only the outputs walk (c) loads S_fwd (at i_tc = c, c counting from the sequence's start); (a) has no load
    of it; the chunk index is 64-bit where the offsets are; MODULE_INFO records the chunk length."""
    src = kernel("triton", 8).source
    states = src.split("def mamba2_segment_states(")[1].split("def mamba2_segment_outputs(")[0]
    outputs = src.split("def mamba2_segment_outputs(")[1].split("\ndef mamba2(")[0]
    assert "S_fwd" not in states
    assert "tl.load(S_fwd_ptr" in outputs and "i_tc = c" in outputs and "i_tc * S_fwd_stride_tc" in outputs
    assert "i_tc = tl.cast(i_tc, tl.int64)" in outputs
    assert "i_tc = N_tc - 1 - c" in kernel("triton", 8, reverse=True).source
    for target in TARGETS:
        k = kernel(target, 16, "across")
        assert k._info.chunk == 16 and "    chunk=16," in k.source


@pytest.mark.parametrize("target", TARGETS)
def test_bf16_input(rng, target):
    """A bf16 S_fwd stays bf16 in memory (the kernels read it as it is and widen it to fp32): the results are
    those of the bf16-rounded values (the outs take the activations' dtype: bf16 here, rounded once)."""
    Q, T = 16, 37
    inputs, h0, S = data(rng, T, Q)
    Sb = jnp.asarray(S, jnp.bfloat16)
    rounded = np.asarray(Sb.astype(jnp.float32))
    y, yc, final = kernel(target, Q).apply({**inputs, "S_fwd": Sb}, {"h": h0})
    assert yc.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert rel_l2(np.asarray(yc.astype(jnp.float32), np.float64), loop(inputs, h0, rounded, Q)[1]) < 8e-3
    if target == "triton":  # the launcher hands the bf16 array to the kernel as it is
        from ssmc.targets import triton_runtime
        seen = {}
        orig = triton_runtime.launch

        def rec(kern, layout, arrays, *a, **kw):
            seen.update({n: jnp.dtype(x.dtype) for n, x in arrays.items()})
            return orig(kern, layout, arrays, *a, **kw)
        inputs, h0, S = data(rng, 40, Q)  # a new length: traced again (the first call's trace is cached)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(triton_runtime, "launch", rec)
            kernel(target, Q).apply({**inputs, "S_fwd": jnp.asarray(S, jnp.bfloat16)}, {"h": h0})
        assert seen["S_fwd"] == jnp.bfloat16, seen


@pytest.mark.parametrize("target", TARGETS)
def test_wrong_number_of_chunks(rng, target):
    """t# must be ceil(T / Q): a ShapeError names the input and the sizes."""
    Q, T = 16, 37
    inputs, h0, S = data(rng, T, Q)
    for bad in (S[:, :2], np.concatenate([S, S[:, :1]], axis=1)):
        with pytest.raises(ShapeError, match=r"dim 't#' is [24] in input 'S_fwd'.*ceil\(37 / 16\) = 3"):
            kernel(target, Q).apply({**inputs, "S_fwd": bad}, {"h": h0})


def test_inside_jit_and_new_lengths(rng):
    """Under jax.jit, and a kernel called at several lengths (t# follows T: Triton takes N_tc at run time)."""
    Q = 16
    for target in ("xla", "triton"):
        k = kernel(target, Q)
        f = jax.jit(lambda i, h: k.apply(i, {"h": h}))
        for T in (37, 70):
            inputs, h0, S = data(rng, T, Q)
            y, yc, final = f({**inputs, "S_fwd": S}, h0)
            assert rel_l2(np.asarray(yc, np.float64), loop(inputs, h0, S, Q)[1]) < TOL


@pytest.mark.parametrize("target", TARGETS)
def test_sequential_program_refused(target):
    """A sequential program has no chunks to index: the emitter raises a clear SSMCError."""
    with pytest.raises(SSMCError, match="input 'S_fwd' is indexed by chunk.*sequential scan"):
        kernel(target, 1, "across")


def test_packed_call_refused(rng):
    inputs, h0, S = data(rng, 20, 16)
    one = {n: x[:1] if n in ("x", "dt", "B", "C") else x for n, x in inputs.items()}
    with pytest.raises(ShapeError, match="input 'S_fwd' is indexed by chunk"):
        kernel("xla", 16, "across").apply({**one, "S_fwd": S[:1]}, {"h": h0}, cu_seqlens=np.array([0, 7, 20], np.int32))


def test_module_info_needs_the_chunk_length():
    """A record with an input indexed by chunk and no chunk length is refused."""
    k = kernel("xla", 16, "across")
    with pytest.raises(SSMCError, match="input 'S_fwd' is indexed by chunk"):
        dataclasses.replace(k._info, chunk=0).check(k._module, "xla", k.inputs, k.states, k.outs)


def test_lowers_for_tpu():
    """The Pallas kernels with the input (one walk and the segment kernels) lower for TPU without a TPU: its
    BlockSpec is indexed by the chunk grid axis (padded to the segments' chunks)."""
    Q, T = 16, 300
    inputs, h0, S = data(np.random.default_rng(0), T, Q)
    ins = {n: jax.ShapeDtypeStruct(x.shape, jnp.float32) for n, x in inputs.items()}
    ins["S_fwd"] = jax.ShapeDtypeStruct(S.shape, jnp.bfloat16)
    st = jax.ShapeDtypeStruct(h0.shape, jnp.float32)
    for mode in ("mul", "across"):
        for segments in (1, 3):
            k = kernel("tpu", Q, mode, segments=segments, interpret=False)
            exported = jax.export.export(jax.jit(lambda i, h: k.apply(i, {"h": h})), platforms=["tpu"])(ins, st)
            assert "tpu_custom_call" in exported.mlir_module()
