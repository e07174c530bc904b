"""Packed variable-length sequences (cu_seqlens): a packed call equals every sequence run on its own.

References: the float64 numpy loops of tests/reference.py (and tests/specgen.py for specs written differently),
run on each sequence separately from its own initial state; the packed call must reproduce every sequence's
outputs and final state. Lengths include 1 and 0 (a repeated offset), and with chunks of 4 sequence boundaries fall
inside chunks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference as R
import ssmc
from reference import central_differences
from ssmc.errors import ShapeError
from test_generated_specs import FIXED

EXAMPLES = ["mamba2", "mamba2_conv", "mamba2_gated", "mamba1", "gla", "retnet", "linear_attention", "rwkv6",
            "deltanet"]
LENS = [5, 1, 0, 13, 7]   # a chunk of 4 holds the end of one sequence and the start of the next
TOL = 2e-5


def _offsets(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def _split(x, dims, axis_dim, start, stop):
    """x restricted to [start, stop) along dim `axis_dim` (unchanged if it lacks the dim)."""
    return np.take(x, np.arange(start, stop), axis=dims.index(axis_dim)) if axis_dim in dims else x


def _err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-3 * np.sqrt(max(b.size, 1))))


def expected_example(k, name, inputs, init, lens):
    """Outs then final states of a packed call of example `name`, from its reference run per sequence."""
    cu, b, t = _offsets(lens), k.packed_dim, k.program.scan
    decl_in, decl_st = dict(k.inputs), dict(k.states)
    outs, finals = [[] for _ in k.outs], [[] for _ in k.states]
    for i, L in enumerate(lens):
        s0 = {n: _split(v, decl_st[n], b, i, i + 1) for n, v in init.items()}
        if L == 0:
            for j, (n, _) in enumerate(k.states):
                finals[j].append(s0[n])
            continue
        sub = {n: _split(v, decl_in[n], t, cu[i], cu[i + 1]) for n, v in inputs.items()}
        o, f = R.reference(name, sub, s0)
        for j in range(len(k.outs)):
            outs[j].append(o[j])
        for j in range(len(k.states)):
            finals[j].append(f[j])
    return ([np.concatenate(o, axis=d.index(t)) for o, (_, d) in zip(outs, k.outs)]
            + [np.concatenate(f, axis=d.index(b)) for f, (_, d) in zip(finals, k.states)])


def check_example(name, target, chunk, lens=LENS, seed=0):
    k = ssmc.compile(f"examples/{name}.ssm", target=target, chunk_size=chunk, interpret=target != "xla")
    assert k.packed_dim == "b"
    rng = np.random.default_rng(seed)
    T = sum(lens)
    inputs = R.make_inputs(name, rng, {"b": 1, "t": T})
    init = R.make_initial_states(name, rng, {"b": len(lens), "t": T})
    got = k(**inputs, initial_states=init, cu_seqlens=_offsets(lens))
    want = expected_example(k, name, inputs, init, lens)
    labels = [f"out {n}" for n, _ in k.outs] + [f"state {n}" for n, _ in k.states]
    errs = {lab: _err(g, w) for lab, g, w in zip(labels, got, want)}
    assert all(e < TOL for e in errs.values()), f"{name} {target} chunk={chunk}: {errs}"


def _fast(*fast):
    """pytest params: the listed ones in the fast set (-m "not slow"), the others slow."""
    return lambda values, key=None: [pytest.param(*(v if isinstance(v, tuple) else (v,)),
                                                  marks=() if v in fast else pytest.mark.slow) for v in values]


@pytest.mark.parametrize("name, chunk", _fast(("mamba2", 4), ("mamba1", 1))(
    [(n, c) for n in EXAMPLES for c in (4, 1)]))
def test_packed_xla(name, chunk):
    check_example(name, "xla", chunk)


@pytest.mark.parametrize("name, target", _fast(("mamba2", "triton"), ("mamba2", "tpu"))(
    [(n, t) for n in EXAMPLES for t in ("triton", "tpu")]))
def test_packed_kernels(name, target):
    """Chunks of 4 (the tpu target rounds them up to 8) or the sequential kernel where the class has no chunks."""
    check_example(name, target, 4)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["triton", "tpu"])
def test_packed_kernels_sequential_and_other_packings(target):
    check_example("mamba2", target, 1)
    if target == "triton":  # tpu's interpreter is slow: its other packings are test_random_lengths'
        check_example("mamba2", target, 8, lens=[0, 9, 2], seed=1)
        check_example("gla", target, 8, lens=[3], seed=2)


@pytest.mark.parametrize("name, target", _fast(("gla", "xla"))(
    [("mamba2", "xla"), ("gla", "xla"), ("mamba2", "triton"), ("mamba1", "tpu")]))
def test_random_lengths(name, target):
    """Fresh random packings: 2-7 sequences of 0-19 steps (one of them 1 step long), chunks of 8."""
    rng = np.random.default_rng()
    lens = [int(n) for n in rng.integers(0, 20, rng.integers(2, 8))]
    lens[int(rng.integers(len(lens)))] = 1
    check_example(name, target, 8, lens=lens, seed=int(rng.integers(1 << 30)))


@pytest.mark.parametrize("target", ["xla", "triton", "tpu"])
def test_trailing_empty_sequences(target):
    """Empty sequences at the end of the packing keep their initial states (the tpu kernel's blocks past the last
    step once wrote the previous sequence's state into the last one's final state)."""
    check_example("gla", target, 8, lens=[3, 1, 0, 0], seed=4)


@pytest.mark.parametrize("case, target", _fast(("layouts", "triton"))(
    [(c, "xla") for c in ("layouts", "layouts-grouped", "renamed")] + [("layouts", "triton"), ("layouts-grouped", "tpu")]))
def test_packed_specs_written_differently(case, target):
    """Time-major and head-first layouts, permuted states, renamed dims: the sequences lie along the batch dim
    wherever the spec puts it."""
    c, sizes = FIXED[case]
    k = ssmc.compile(c.text, target=target, interpret=target != "xla", chunk_size=4)
    bname, tname = c.dim_names["b"], c.dim_names[c.base.scan]
    assert k.packed_dim == bname
    rng = np.random.default_rng(3)
    T = sum(LENS)
    inputs = c.base.make_inputs(rng, dict(sizes, b=1, t=T))
    init = c.initial_states(rng, dict(sizes, b=len(LENS), t=T))
    got = k(**c.call_args(inputs, init), cu_seqlens=_offsets(LENS))
    cu = _offsets(LENS)
    arrays = c.base.arrays()
    parts = []
    for i, L in enumerate(LENS):
        s0 = {n: _split(v, arrays[n], "b", i, i + 1) for n, v in init.items()}
        if L == 0:
            parts.append(None)
            continue
        sub = {n: _split(v, arrays[n], c.base.scan, cu[i], cu[i + 1]) for n, v in inputs.items()}
        parts.append(dict(c.expected(sub, s0)))
    labels = [f"out {c.value_names[n]}" for n in c.outs] + [f"state {c.value_names[n]}" for n in c.states]
    for lab, g in zip(labels, got):
        base = next(n for n in c.outs + c.states if lab.endswith(" " + c.value_names[n]))
        lay = c.layouts[base]
        if lab.startswith("out"):
            w = np.concatenate([p[lab] for p in parts if p is not None], axis=lay.index(c.base.scan))
        else:
            w = np.concatenate([p[lab] if p is not None else c.to_case(base, _split(init[base], arrays[base], "b", i, i + 1))
                                for i, p in enumerate(parts)], axis=lay.index("b"))
        assert _err(g, w) < TOL, (lab, _err(g, w), tname)


def test_packed_under_jit_with_traced_offsets():
    """One compile serves every packing of the same length and count: the offsets are traced under jax.jit."""
    k = ssmc.compile("examples/mamba2.ssm", target="xla", chunk_size=4)
    rng = np.random.default_rng(4)
    inputs = R.make_inputs("mamba2", rng, {"b": 1, "t": 26})
    f = jax.jit(lambda cu: k(**inputs, cu_seqlens=cu))
    for lens in ([5, 1, 0, 13, 7], [26, 0, 0, 0, 0], [1, 1, 1, 1, 22]):
        init = {"h": np.zeros((5, 4, 8, 8), np.float32)}
        want = expected_example(k, "mamba2", inputs, init, lens)
        got = f(jnp.asarray(_offsets(lens)))
        assert all(_err(g, w) < TOL for g, w in zip(got, want)), lens


@pytest.mark.parametrize("target", _fast("xla")(["xla", "triton", "tpu"]))
def test_packed_gradients_match_central_differences(target):
    """jax.grad through a packed call against central differences of the per-sequence float64 references."""
    k = ssmc.compile("examples/mamba2.ssm", target=target, chunk_size=4, interpret=target != "xla")
    rng = np.random.default_rng(5)
    lens = [3, 0, 6, 2]
    inputs = {n: v.astype(np.float64) for n, v in R.make_inputs("mamba2", rng, {"b": 1, "t": 11}).items()}
    init = {n: v.astype(np.float64) for n, v in R.make_initial_states("mamba2", rng, {"b": 4, "t": 11}).items()}
    wy = rng.standard_normal((1, 11, 4, 8))
    wh = rng.standard_normal((4, 4, 8, 8))
    cu = _offsets(lens)

    def loss_ref():
        y, h = expected_example(k, "mamba2", inputs, init, lens)
        return float(np.sum(y * wy) + np.sum(h * wh))

    def loss(x, A, h0):
        y, h = k(**{**{n: jnp.asarray(v, jnp.float32) for n, v in inputs.items()}, "x": x, "A": A},
                 initial_state=h0, cu_seqlens=cu)
        return jnp.sum(y * wy) + jnp.sum(h * wh)
    gx, gA, gh = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(inputs["x"], jnp.float32),
                                                   jnp.asarray(inputs["A"], jnp.float32),
                                                   jnp.asarray(init["h"], jnp.float32))
    arrays = {**inputs, "h": init["h"]}
    inputs_ref = inputs

    def loss_both():
        inputs_ref.update({"x": arrays["x"], "A": arrays["A"]})
        init["h"] = arrays["h"]
        return loss_ref()
    for name, g in (("x", gx), ("A", gA), ("h", gh)):
        idx = rng.choice(arrays[name].size, min(6, arrays[name].size), replace=False)
        fd = central_differences(loss_both, arrays, name, idx)
        np.testing.assert_allclose(np.asarray(g).flat[idx], fd, rtol=2e-3, atol=2e-3, err_msg=name)


def test_step_after_a_packed_prefill_continues_each_sequence():
    """A server prefills a packed batch of prompts, then decodes each sequence: the per-sequence final states are
    the states of a batch of num_seqs for k.step."""
    k = ssmc.compile("examples/mamba2_conv.ssm", target="xla", chunk_size=4)
    rng = np.random.default_rng(6)
    lens = [4, 9, 1]
    T = sum(lens)
    full = R.make_inputs("mamba2_conv", rng, {"b": 1, "t": T + 3})
    decl = dict(k.inputs)
    prompt = {n: _split(v, decl[n], "t", 0, T) for n, v in full.items()}
    nxt = {n: np.repeat(_split(v, decl[n], "t", T, T + 1), 3, axis=decl[n].index("b")) if "t" in decl[n] else v
           for n, v in full.items()}
    res = k(**prompt, cu_seqlens=_offsets(lens))
    # through a StateCache of one layer and a batch of one entry per sequence, as a server keeps them
    cache = ssmc.StateCache.create(k, num_layers=1, batch_size=3, sizes={"h": 4, "p": 8, "n": 8, "g": 2, "k": 4})
    cache = cache.update(0, res[len(k.outs):], num_tokens=np.array(lens))
    assert np.asarray(cache.layer_positions[0]).tolist() == lens
    y1 = k.step(cache.layer(0), **nxt)[0]
    cu = _offsets(lens)
    for i in range(3):
        seq = {n: (np.concatenate([_split(v, decl[n], "t", cu[i], cu[i + 1]),
                                   _split(nxt[n], decl[n], "b", i, i + 1)], axis=decl[n].index("t"))
                   if "t" in decl[n] else v) for n, v in prompt.items()}
        want = R.reference("mamba2_conv", seq)[0][0]
        np.testing.assert_allclose(np.asarray(y1)[i, 0], want[0, -1], rtol=1e-4, atol=1e-4)


def _mamba2_args(T=8, n=2):
    rng = np.random.default_rng(7)
    return R.make_inputs("mamba2", rng, {"b": 1, "t": T}), R.make_initial_states("mamba2", rng, {"b": n, "t": T})


@pytest.mark.parametrize("cu, match", [
    (np.array([0.0, 3.0, 8.0]), "dtype float64"),
    (np.array([[0, 3, 8]]), "shape"),
    (np.array([0]), "shape"),
    (np.array([1, 3, 8]), r"cu_seqlens\[0\] is 1"),
    (np.array([0, 5, 3, 8]), "decreases at index 2"),
    (np.array([0, 3, 9]), "ends at 9 but the packed length"),
])
def test_bad_offsets_are_named(cu, match):
    k = ssmc.compile("examples/mamba2.ssm", target="xla")
    inputs, _ = _mamba2_args()
    with pytest.raises(ShapeError, match=match):
        k(**inputs, cu_seqlens=cu)


def test_bad_packed_shapes_are_named():
    k = ssmc.compile("examples/mamba2.ssm", target="xla")
    inputs, init = _mamba2_args(n=2)
    cu = np.array([0, 3, 8], np.int32)
    two = {n: np.concatenate([v, v], axis=0) if n in ("x", "dt", "B", "C") else v for n, v in inputs.items()}
    with pytest.raises(ShapeError, match="batch of one"):
        k(**two, cu_seqlens=cu)
    with pytest.raises(ShapeError, match="one initial state per sequence"):
        k(**inputs, initial_state=np.concatenate([init["h"]] * 2), cu_seqlens=cu)
    k(**inputs, initial_state=init["h"], cu_seqlens=cu)  # the right count runs


def test_specs_without_packed_calls_say_so():
    k = ssmc.compile("ssm s {\n dims t, d\n scan t\n in x[t,d], a[d]\n state h[d]\n out y[t,d]\n"
                     " h = a*h + x\n y = h\n}\n", target="xla")
    assert k.packed_dim is None
    with pytest.raises(ShapeError, match="no packed sequences"):
        k(x=np.ones((4, 2), np.float32), a=np.ones((2,), np.float32), cu_seqlens=np.array([0, 4]))
    inputs, _ = _mamba2_args()
    k2 = ssmc.compile("examples/mamba2.ssm", target="xla")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("sp",))
    with pytest.raises(ShapeError, match="sharded kernel takes no packed sequences"):
        ssmc.shard(k2, mesh, {"t": "sp"})(**inputs, cu_seqlens=np.array([0, 3, 8]))
