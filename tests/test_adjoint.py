"""The derived backward (issue 13): passes/adjoint.py turns a spec's step program into its adjoint programs, the
targets compile them like any spec, ssmc/backward.py runs them with the state-free glue.

Gradients of loss = <outs, random cotangents> + <final states, random cotangents> with respect to every input
and every initial state are checked against the full gradient of the float64 numpy reference loops
(tests/reference.py) by central differences, coordinate by coordinate: fp32 within 1e-4 relative (L2 over each
array), on every example with a diagonal recurrence and every target (triton and tpu in their interpreters; the
xla target's kernels differentiate through jax by default, so there the derived backward is called directly).
Small shapes with a partial last chunk, groups of heads, random initial states.
"""
from __future__ import annotations

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmc
from helpers import derived_gradients
from reference import VARIANTS, full_gradient, reference_gradients, rel_l2
from ssmc.errors import SSMCError

T, CHUNK = 10, 4  # 10 = 4 + 4 + 2 (tpu: 8 + 2): a partial last chunk
TINY = {
    "mamba2": {"b": 2, "t": T, "h": 4, "g": 2, "p": 3, "n": 4},
    "mamba2_gated": {"b": 1, "t": T, "h": 4, "g": 2, "p": 3, "n": 4},
    "mamba2_conv": {"b": 1, "t": T, "h": 4, "g": 2, "p": 2, "n": 3, "k": 3},
    "mamba1": {"b": 1, "t": T, "d": 3, "n": 3},
}
KV_TINY = {"b": 1, "t": T, "h": 2, "dk": 3, "dv": 4}
DERIVED = [n for n in VARIANTS if n != "deltanet"]  # deltanet's transition is non-diagonal: XLA derivatives
# conftest.py keeps the first cases of the parametrization in the fast set, the others slow
CASES = [pytest.param(t, n, id=f"{t}-{n}") for t in ("xla", "triton", "tpu") for n in DERIVED]


@functools.lru_cache(maxsize=None)
def _kernel(name, target, chunk=CHUNK):
    return ssmc.compile(str(VARIANTS[name].path), target=target, interpret=target != "xla", chunk_size=chunk)


def _problem(rng, name):
    v = VARIANTS[name]
    dims = TINY.get(name, KV_TINY)
    inputs = v.make_inputs(rng, dims)
    init = v.make_initial_states(rng, dims)
    outs, states = v.reference(inputs, init)
    wo = [rng.standard_normal(o.shape) for o in outs]
    ws = [rng.standard_normal(s.shape) for s in states]
    return v, inputs, init, wo, ws


def _derived_gradients(sx, k, v, inputs, init, wo, ws) -> dict:
    """The kernel's gradients: jax.grad through a kernel target (its derivatives are the derived backward), the
    derived backward called directly on the xla target (whose calls jax differentiates itself)."""
    ins = {n: jnp.asarray(a) for n, a in inputs.items()}
    st = {n: jnp.asarray(a) for n, a in init.items()}
    w = [jnp.asarray(x, jnp.float32) for x in wo + ws]
    if k.target != "xla":
        def loss(i, s):
            res = k(**sx.kwargs(v, i, s))
            return sum(jnp.sum(r * c) for r, c in zip(res, w))
        gi, gs = jax.grad(loss, argnums=(0, 1))(ins, st)
        return {**gi, **{"state:" + n: a for n, a in gs.items()}}
    return derived_gradients(k, ins, st, w)


@pytest.mark.parametrize("target,name", CASES)
def test_derived_gradients_match_float64_differences(sx, rng, target, name):
    v, inputs, init, wo, ws = _problem(rng, name)
    k = _kernel(name, target)
    assert k.backward_note.startswith("derived") if k._derived_backward() else False, k.backward_note
    got = _derived_gradients(sx, k, v, inputs, init, wo, ws)
    want = reference_gradients(v, inputs, init, wo, ws)
    assert set(got) >= set(want), sorted(set(want) - set(got))
    bad = []
    for key, g in want.items():
        a = np.asarray(got[key], np.float64)
        assert a.shape == g.shape, f"{key}: {a.shape} != {g.shape}"
        assert np.linalg.norm(g) > 0, f"{key}: zero reference gradient (bad test inputs)"
        err = rel_l2(a, g)
        if not err < 1e-4:
            bad.append(f"{key}: rel err {err:.2e}")
    assert not bad, f"{name} on {target}: derived gradients differ from the float64 reference:\n  " + "\n  ".join(bad)


@pytest.mark.slow
def test_split_blocks_and_segments_on_triton(sx, rng, monkeypatch):
    """Triton's program numbering with several blocks per split dim and forced segments: with the tile blocks
    capped at 8 (the forward's p in 4 blocks, adj's state walk blocked along p and n, adj:n along n) and 3
    segments, the derived gradients match the float64 reference."""
    from ssmc.targets import triton_runtime
    orig = triton_runtime.heuristic

    def small_blocks(layout, sizes):
        cfg = orig(layout, sizes)
        cfg["blocks"] = {d: min(b, 8) if d in layout["split"] else b for d, b in cfg["blocks"].items()}
        return cfg
    monkeypatch.setattr(triton_runtime, "heuristic", small_blocks)
    jax.clear_caches()  # the launchers pick their configs while tracing
    v = VARIANTS["mamba2"]
    dims = {"b": 1, "t": 45, "h": 2, "g": 1, "p": 32, "n": 16}
    inputs, init = v.make_inputs(rng, dims), v.make_initial_states(rng, dims)
    outs, states = v.reference(inputs, init)
    wo = [rng.standard_normal(o.shape) for o in outs]
    ws = [rng.standard_normal(s.shape) for s in states]
    k = ssmc.compile(str(v.path), target="triton", interpret=True, chunk_size=8, segments=3)
    got = _derived_gradients(sx, k, v, inputs, init, wo, ws)
    jax.clear_caches()
    for key, g in reference_gradients(v, inputs, init, wo, ws).items():
        err = rel_l2(np.asarray(got[key], np.float64), g)
        assert err < 1e-4, f"{key}: rel err {err:.2e} with blocks of 8 and 3 segments"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["triton", "tpu"])
def test_low_precision_gradients(sx, rng, target):
    """bf16 activations with fp32 A, D: gradients in their primals' dtypes, within the forward's bf16 tolerance
    of the float64 reference gradient (taken at the bf16-rounded values)."""
    v, inputs, init, wo, ws = _problem(rng, "mamba2")
    inputs = {n: (a if n in ("A", "D") else np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32))
              for n, a in inputs.items()}
    k = _kernel("mamba2", target)
    mixed = {n: jnp.asarray(a) if n in ("A", "D") else jnp.asarray(a, jnp.bfloat16) for n, a in inputs.items()}
    w = [jnp.asarray(x, jnp.float32) for x in wo + ws]
    st = {n: jnp.asarray(a) for n, a in init.items()}

    def loss(i):
        res = k(**sx.kwargs(v, i, st))
        return sum(jnp.sum(r.astype(jnp.float32) * c) for r, c in zip(res, w))
    got = jax.grad(loss)(mixed)
    want = reference_gradients(v, inputs, init, wo, ws)
    for n, g in got.items():
        assert g.dtype == mixed[n].dtype, (n, g.dtype)
        assert rel_l2(np.asarray(g, np.float64), want[n]) < 3e-2, n


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mamba2", "gla"])
def test_chunked_and_sequential_backward_agree(sx, rng, name):
    v, inputs, init, wo, ws = _problem(rng, name)
    chunked = _derived_gradients(sx, _kernel(name, "triton"), v, inputs, init, wo, ws)
    walked = _derived_gradients(sx, _kernel(name, "triton", 1), v, inputs, init, wo, ws)
    for key in chunked:
        assert rel_l2(np.asarray(walked[key], np.float64), np.asarray(chunked[key], np.float64)) < 1e-5, key


def test_backward_lowers_with_mosaic_for_tpu(rng):
    """jax.grad through the tpu target exported for a TPU: the derived backward kernels lower with Mosaic."""
    v = VARIANTS["mamba2"]
    dims = {"b": 1, "t": 64, "h": 4, "g": 2, "p": 8, "n": 16}
    ins = {n: jnp.asarray(a) for n, a in v.make_inputs(rng, dims).items()}
    k = ssmc.compile(str(v.path), target="tpu", chunk_size=16)
    fwd_only = jax.export.export(jax.jit(lambda i: k(**i)[0]), platforms=["tpu"])(ins).mlir_module()
    g = jax.jit(jax.grad(lambda i: jnp.sum(k(**i)[0] ** 2)))
    text = jax.export.export(g, platforms=["tpu"])(ins).mlir_module()
    n_fwd, n_all = fwd_only.count("tpu_custom_call"), text.count("tpu_custom_call")
    assert n_fwd >= 1 and n_all >= n_fwd + 2, (n_fwd, n_all)  # the forward's, then the dq and adj programs'


def test_forward_saves_its_arguments_and_chunk_states(rng):
    """Memory: what jax keeps between forward and backward is the call's arguments and, on the kernel targets,
    the states entering each chunk (one [p, n] state per chunk and head, in the activations' dtype), nothing per
    step."""
    v = VARIANTS["mamba2"]
    ins = {n: jnp.asarray(a) for n, a in v.make_inputs(rng, TINY["mamba2"]).items()}
    k = _kernel("mamba2", "triton")
    _, f_vjp = jax.vjp(lambda i: k(**i)[0], ins)
    leaves = [x for x in jax.tree_util.tree_leaves(f_vjp) if hasattr(x, "dtype")]
    saved = sum(x.size * x.dtype.itemsize for x in leaves)
    given = sum(x.size * x.dtype.itemsize for x in ins.values())
    b, T, h, p = ins["x"].shape
    n = ins["B"].shape[-1]
    chunks = -(-T // k._derived_backward().Q)
    state = b * h * p * n * 4
    per_chunk = [x for x in leaves if x.shape == (chunks, b, h, p, n)]
    assert len(per_chunk) == 1, [x.shape for x in leaves]
    assert given + chunks * state <= saved <= given + chunks * state + state, (saved, given)  # + the zero state


def test_backward_is_inspectable():
    k = _kernel("mamba2", "triton")
    src = k.backward_source
    # the forward storing the states entering each chunk, dq, adj's state walk and adj's pieces (one per set of
    # state dims their outs keep), each with its kernels
    parts = ["forward part 'entering'", "adjoint part 'dq'", "adjoint part 'adj_entering'", "adjoint part 'adj:p'",
             "adjoint part 'adj:n'", "adjoint part 'adj:rest'"]
    assert all(p in src for p in parts) and src.count("@triton.jit") >= 3 * len(parts), src[:2000]
    names = [n for n, _ in k.backward_passes]
    assert any(n.startswith("adjoint{part=adj:p}") for n in names) and any("chunk" in n for n in names)
    out = subprocess.run([sys.executable, "-m", "ssmc", "compile", str(VARIANTS["mamba2"].path), "--target",
                          "triton", "--emit", "source", "--backward"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "adjoint part 'adj:p'" in out.stdout and "@triton.jit" in out.stdout
    ir = subprocess.run([sys.executable, "-m", "ssmc", "compile", str(VARIANTS["gla"].path), "--backward"],
                        capture_output=True, text=True, timeout=300)
    assert ir.returncode == 0 and "ssm gla_adj" in ir.stdout and "ssm gla_dq" in ir.stdout, ir.stderr


def test_non_diagonal_spec_says_why():
    k = _kernel("deltanet", "triton")
    assert k._derived_backward() is None and "non-diagonal" in k.backward_note
    with pytest.raises(SSMCError, match="no derived backward"):
        k.backward_source


PACKED = [pytest.param("xla", "gla"), pytest.param("triton", "rwkv6", marks=pytest.mark.slow),
          pytest.param("tpu", "retnet", marks=pytest.mark.slow),
          pytest.param("triton", "mamba2_conv", marks=pytest.mark.slow)]


@pytest.mark.parametrize("target,name", PACKED)
def test_packed_derived_gradients(sx, rng, target, name):
    """A packed call (cu_seqlens, an empty and a one-step sequence among them) differentiated by the derived
    backward: the adjoint walks each sequence from its last step, the log-decays' sums restart per sequence, and a
    causal conv restarts from each sequence's window (ir_eval's packed conv). Against the full float64
    finite-difference gradient of the reference run per sequence."""
    from test_packed import _offsets, expected_example
    v = VARIANTS[name]
    lens = [4, 0, 1, 6]
    k = _kernel(name, target)
    dims = TINY.get(name, KV_TINY)
    inputs = v.make_inputs(rng, {**dims, "b": 1, "t": sum(lens)})
    init = v.make_initial_states(rng, {**dims, "b": len(lens)})
    outs = expected_example(k, name, inputs, init, lens)
    w = [rng.standard_normal(np.shape(o)) for o in outs]
    cu = _offsets(lens)
    assert k._derived_backward().packable
    got = derived_gradients(k, {n: jnp.asarray(a) for n, a in inputs.items()},
                            {n: jnp.asarray(a) for n, a in init.items()}, w, cu)
    arrays64 = {**{n: np.asarray(a, np.float64).copy() for n, a in inputs.items()},
                **{"state:" + n: np.asarray(a, np.float64).copy() for n, a in init.items()}}

    def ref_loss():
        res = expected_example(k, name, {n: arrays64[n] for n in inputs}, {n: arrays64["state:" + n] for n in init},
                               lens)
        return sum(float(np.sum(r * c)) for r, c in zip(res, w))
    want = full_gradient(ref_loss, arrays64)
    bad = {n: e for n, g in want.items() if not (e := rel_l2(np.asarray(got[n], np.float64), g)) < 1e-4}
    assert not bad, f"{name} packed on {target}: {bad}"


REVERSE = [pytest.param(t, n, id=f"{t}-{n}") for t, n in (("triton", "mamba2"), ("tpu", "gla"), ("xla", "rwkv6"))]


@pytest.mark.parametrize("target,name", REVERSE)
def test_reverse_time_program(rng, target, name):
    """Program.reverse (the adjoint's scan direction): walked in place by the triton kernels, flipped around the
    kernels elsewhere. A spec's program made reverse-time must give the reference run on each sequence's steps in
    reverse order (outs flipped back), for an ordinary call and a packed one (an empty sequence among them)."""
    from dataclasses import replace

    from test_packed import _offsets, expected_example

    from ssmc.api import compile_program
    v = VARIANTS[name]
    k = _kernel(name, target)
    kr = compile_program(replace(k.program, reverse=True), target=target, pipeline=k.pipeline,
                         interpret=target != "xla")
    assert "scan t reverse" in kr.ir
    scan, decl = k.program.scan, dict(k.inputs) | dict(k.outs)

    def flip(x, dims, cu=None):  # each sequence's steps in reverse order
        if scan not in dims:
            return x
        ax = dims.index(scan)
        if cu is None:
            return np.flip(x, ax)
        parts = [np.flip(np.take(x, np.arange(a, b), axis=ax), ax) for a, b in zip(cu[:-1], cu[1:])]
        return np.concatenate(parts, axis=ax)
    dims = TINY.get(name, KV_TINY)
    inputs, init = v.make_inputs(rng, dims), v.make_initial_states(rng, dims)
    want_o, want_s = v.reference({n: flip(a, decl[n]) for n, a in inputs.items()}, init)
    got = kr.apply({n: jnp.asarray(a) for n, a in inputs.items()}, {n: jnp.asarray(a) for n, a in init.items()})
    for g, w, n in zip(got, [flip(o, d) for o, (_, d) in zip(want_o, k.outs)] + list(want_s),
                       [n for n, _ in k.outs + k.states]):
        assert rel_l2(np.asarray(g, np.float64), w) < 2e-5, n
    lens = [3, 0, 6, 1]
    cu = _offsets(lens)
    inputs = v.make_inputs(rng, {**dims, "b": 1, "t": sum(lens)})
    init = v.make_initial_states(rng, {**dims, "b": len(lens)})
    want = expected_example(k, name, {n: flip(a, decl[n], cu) for n, a in inputs.items()}, init, lens)
    got = kr.apply({n: jnp.asarray(a) for n, a in inputs.items()}, {n: jnp.asarray(a) for n, a in init.items()},
                   cu_seqlens=cu)
    for g, w, (n, d) in zip(got, want, k.outs + k.states):
        assert rel_l2(np.asarray(g, np.float64), flip(w, d, cu)) < 2e-5, n


@pytest.mark.parametrize("target", ["xla", "triton"])
def test_derived_outs_dtypes(target):
    """With bf16 activations the derived kernels' outs come out in bf16 (as a forward's outs), except the small ones
    over the decay's dims (IR attr fp32): the per-chunk pieces of the decay gradient and d dt. The state part and
    the straddling pairs (adj's, of <u, G>) are chunk.output parts of the readouts the kernels have anyway."""
    k = _kernel("mamba2", target)
    bw = k._derived_backward()
    assert bw.pairs and bw.Q == CHUNK * (2 if target == "tpu" else 1)
    sizes = dict(b=1, t=T, h=4, g=2, p=3, n=4)
    sizes["t#"] = -(-T // bw.Q)
    key = jax.random.PRNGKey(0)
    for part, kk in bw.kernels.items():
        ins = {}
        for n, dims in kk.inputs:
            key, sub = jax.random.split(key)
            x = jax.random.normal(sub, [sizes[d] for d in dims], jnp.float32)
            ins[n] = -jnp.abs(x) if n.startswith("log_a") else x.astype(jnp.bfloat16)
        res = kk.apply(ins)
        for (name, dims), r in zip(kk.outs, res):
            want = jnp.float32 if name in kk.program.fp32_outs() else jnp.bfloat16
            assert r.dtype == want, (part, name, r.dtype)
            assert r.shape == tuple(sizes[d] for d in dims), (part, name, r.shape)
    # (the kernel targets run adj as pieces: bw.runs)
    fp32 = {part: {o for key in bw.runs[part] for o in bw.kernels[key].program.fp32_outs()} for part in bw.runs}
    assert fp32["adj"] == ({"d_dt_in", "d_dt_state"} if bw.d.sums else {"d_dt"}) | {
        "dl_upd_h", "dl_straddle_h", "dl_across_h"}, fp32
    assert fp32["dq"] == {"dl_read_h"}, fp32
    ir = bw.kernels["dq"].ir
    assert ir.count("chunk.output") == 2 and "part=state" in ir and "part=straddle" not in ir, ir
    ir = "\n".join(bw.kernels[key].ir for key in bw.runs["adj"])
    assert ir.count("part=straddle") == 1 and ir.count("part=state") == 1, ir
    assert ir.count("part=in") == (1 if bw.d.sums else 0), ir  # d dt's in-chunk part, apart from its state part


def test_backward_dots_follow_the_decay_gradient_form():
    """backward_matmul="auto" runs the derived dots in the activations' dtype where every decay's gradient has the
    per-chunk form (Mamba2: a scalar positive decay, chunked), and at full precision where a decay's gradient is
    the sum whose terms cancel (GLA's key-wise decay; any spec run as a sequential scan); packed calls, whose
    sequences chunks cannot align with, take that form too."""
    cases = {("mamba2", None): (True, "auto"), ("gla", None): (False, "float32"), ("mamba2", 1): (False, "float32")}
    for (name, chunk), (pairs, mm) in cases.items():
        k = ssmc.compile(str(VARIANTS[name].path), target="xla", chunk_size=chunk or CHUNK)
        bw = k._derived_backward()
        assert (bw.pairs, bw.matmul) == (pairs, mm), (name, chunk, bw.pairs, bw.matmul)
        assert bw.flat().pairs is False and bw.flat().matmul == "float32"


@pytest.mark.slow
def test_bf16_decay_gradient_is_exact_per_chunk():
    """The decays' cotangent dℓ_i = a_i <S_{i-1}, G_i>, summed per chunk from terms that never cancel (passes/
    adjoint.py `pairs`), keeps bf16 dots in the derived kernels as accurate as the full-precision ones; the form
    it replaced, a reverse cumulative sum of <q, dq> - <u, G> over the whole sequence, is far off with them (its
    terms cancel). Mamba2, bf16 x/dt/B/C and fp32 A/D as models hold them, against the float32 jax.grad of the XLA
    code at full matmul precision on the same rounded values (the xla target's derived backward, which rounds its
    bf16 dots as a GPU does; Triton's interpreter computes them in fp32). T = 250: a partial last chunk (padded)."""
    from ssmc.api import compile_program
    from ssmc.backward import Backward
    rng = np.random.default_rng(3)
    T, H, P, N = 250, 2, 32, 64
    raw = dict(x=rng.standard_normal((1, T, H, P)), dt=np.log1p(np.exp(rng.standard_normal((1, T, H)) - 2)),
               A=-np.exp(2 * rng.uniform(0, 1, H)), B=rng.standard_normal((1, T, 1, N)),
               C=rng.standard_normal((1, T, 1, N)), D=rng.standard_normal(H))
    ins = {n: jnp.asarray(v, jnp.bfloat16 if n in ("x", "dt", "B", "C") else jnp.float32) for n, v in raw.items()}
    w = [rng.standard_normal((1, T, H, P)), rng.standard_normal((1, H, P, N))]
    spec = VARIANTS["mamba2"].path
    kx = ssmc.compile(spec, target="xla", matmul="float32")
    ref = jax.grad(lambda i: jnp.sum(kx.apply(i)[0] * w[0]) + jnp.sum(kx.apply(i)[1] * w[1]))(
        {n: v.astype(jnp.float32) for n, v in ins.items()})
    ref = {n: np.asarray(v, np.float64) for n, v in ref.items()}
    errs = {}
    for bm in ("float32", "auto"):
        k = ssmc.compile(spec, target="xla", backward_matmul=bm)
        assert k._derived_backward().pairs
        g = derived_gradients(k, ins, {}, w)
        errs[bm] = {n: rel_l2(np.asarray(g[n], np.float64), ref[n]) for n in ("A", "dt", "x", "B", "C")}
    k = ssmc.compile(spec, target="xla", backward_matmul="auto")
    k._bw = Backward(k, compile_program, pairs=False, matmul="auto")  # the cancelling form, bf16 dots
    g = derived_gradients(k, ins, {}, w)
    errs["cancelling"] = {n: rel_l2(np.asarray(g[n], np.float64), ref[n]) for n in ("A", "dt")}
    assert max(errs["float32"].values()) < 5e-3, errs
    assert max(errs["auto"].values()) < 5e-3, errs
    assert errs["cancelling"]["A"] > 2e-2, errs  # why the per-chunk form exists
