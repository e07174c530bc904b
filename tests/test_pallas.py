"""The Pallas TPU target without a TPU: every example in Pallas' TPU interpreter (interpret=True, which models VMEM,
SMEM and the grid's order) against its float64 numpy reference - several chunks with a partial last one, a
sequence shorter than one chunk, the sequential kernel, initial states, bf16 inputs, groups, inside jax.jit - and
every example's kernels lowered for TPU (`jax.export` with platforms=["tpu"] runs the Mosaic lowering; the module
must hold the Mosaic custom call), which catches kernels that would only work in interpret mode."""
from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmc
from helpers import first_fast
from reference import VARIANTS

NAMES = list(VARIANTS)
FP32_TOL = 1e-4
BF16_TOL = 3e-2


@functools.lru_cache(maxsize=None)
def kernel(name, chunk_size=None, interpret=True):
    return ssmc.compile(str(VARIANTS[name].path), target="tpu", interpret=interpret, chunk_size=chunk_size)


# (chunk_size, t, initial states): chunks of 16 with a partial last one, a sequence shorter than the default chunk,
# and the sequential kernel (chunk_size=1)
CASES = [(16, 37, True), (None, 21, False), (1, 11, True)]
SMALL = {"b": 1, "h": 2}


def _dims(v, **kw):
    d = {k: n for k, n in SMALL.items() if k in v.small_dims}
    if "g" in v.small_dims:
        d["g"] = 1
    d.update(kw)
    return d


# the fast set (-m "not slow") keeps the first case (several chunks, a partial last one, initial states)
@pytest.mark.parametrize("case", first_fast(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_fp32_matches_reference(sx, rng, name, case):
    chunk, t, with_init = case
    v = VARIANTS[name]
    dims = _dims(v, t=t, b=2) if with_init else _dims(v, t=t)
    sx.check(rng, v, dims, with_init, kernel=kernel(name, chunk), tol=FP32_TOL, what=" (tpu interpret)")


@pytest.mark.parametrize("name", [n if n in ("mamba2", "gla") else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_bf16_inputs(sx, rng, name):
    """bf16 inputs are read as they are (matmul operands in bf16, fp32 accumulation and states); outs come back in
    bf16, states in float32."""
    v = VARIANTS[name]
    dims = _dims(v, t=30)
    inputs = v.make_inputs(rng, dims)
    init = v.make_initial_states(rng, dims)
    low = {k: jnp.asarray(x).astype(jnp.bfloat16) for k, x in inputs.items()}
    rounded = {k: np.asarray(x.astype(jnp.float32)) for k, x in low.items()}
    ref_outs, ref_states = v.reference(rounded, init)
    outs, states = sx.run(v, low, init, kernel=kernel(name, 16))
    sx.compare(v, outs, states, ref_outs, ref_states, BF16_TOL, out_dtype=jnp.bfloat16, what=" (tpu interpret, bf16)")


@pytest.mark.parametrize("name", ["deltanet", "mamba1"])
def test_sequential_over_several_time_blocks(sx, rng, name):
    """The sequential kernel walks 128 steps per grid step; 150 steps take two, the second mostly padding."""
    v = VARIANTS[name]
    dims = {"b": 1, "t": 150, "h": 1} if "h" in v.small_dims else {"b": 1, "t": 150}
    sx.check(rng, v, dims, True, kernel=kernel(name), tol=FP32_TOL, what=" (tpu interpret, 2 time blocks)")


@pytest.mark.parametrize("groups", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(4, marks=pytest.mark.slow)])
def test_groups_are_an_index_map(sx, rng, groups):
    v = VARIANTS["mamba2"]
    dims = {"b": 1, "h": 4, "g": groups, "t": 19}
    sx.check(rng, v, dims, True, kernel=kernel("mamba2", 8), tol=FP32_TOL, what=f" (tpu interpret, g={groups})")
    src = kernel("mamba2", 8).source
    assert "i_g = lax.div(i_h, N_h // N_g)" in src and "jnp.repeat" not in src


def test_odd_tile_sizes(sx, rng):
    """Tile dims are whole blocks (the full dim satisfies the TPU block rule): p=5, n=3 need no padding."""
    v = VARIANTS["mamba2_gated"]
    dims = {"b": 1, "h": 2, "g": 1, "p": 5, "n": 3, "t": 13}
    sx.check(rng, v, dims, True, kernel=kernel("mamba2_gated", 8), tol=FP32_TOL, what=" (tpu interpret, p=5, n=3)")


@pytest.mark.parametrize("name,dims,chunk", [("mamba1", {"b": 1, "t": 20, "d": 1024, "n": 4}, None),
                                              ("gla", {"b": 1, "t": 20, "h": 1, "dk": 4, "dv": 640}, 8)])
def test_blockable_tile_dims_get_grid_axes(sx, rng, name, dims, chunk):
    """A blockable tile dim over 512 gets its own "parallel" grid axis in lane-aligned blocks (d=1024: 2 x 512,
    dv=640: 5 x 128); the blocks must tile the state and the outs exactly."""
    v = VARIANTS[name]
    sx.check(rng, v, dims, True, kernel=kernel(name, chunk), tol=FP32_TOL, what=f" (tpu interpret, blocks {dims})")


def test_inside_jit(sx, rng):
    v = VARIANTS["gla"]
    dims = _dims(v, t=20)
    inputs = v.make_inputs(rng, dims)
    k = kernel("gla", 8)
    f = jax.jit(lambda q, kk, vv, g: k(q, kk, vv, g))
    o, S = f(inputs["q"], inputs["k"], inputs["v"], inputs["g_raw"])
    ref_outs, ref_states = v.reference(inputs)
    sx.compare(v, (o,), (S,), ref_outs, ref_states, FP32_TOL, what=" (tpu interpret, in jit)")


def test_chunk_length_is_a_multiple_of_8():
    """Chunks are time blocks of the kernel: a requested length is rounded up to whole sublane tiles."""
    assert "chunk{size=8," in kernel("mamba2", 5).pipeline
    assert "chunk{size=1," in kernel("mamba2", 1).pipeline


def test_source_is_readable():
    src = kernel("mamba2").source
    for piece in ("def mamba2_chunked(", "pl.program_id(2)", "@pl.when(chunk_id == 0)", "h_scr[...]",
                  "preferred_element_type=jnp.float32", "# stage chunk_output", "rt.launch(mamba2_chunked, LAYOUT"):
        assert piece in src, piece
    seq = kernel("deltanet").source
    assert "lax.fori_loop(0, TB, step" in seq and "jnp.where(valid, state_S_prev" in seq


def _structs(v, dtype):
    dims = _dims(v, t=300, b=2)
    rng = np.random.default_rng(0)
    inputs = v.make_inputs(rng, dims)
    states = v.make_initial_states(rng, dims)
    return ({a: jax.ShapeDtypeStruct(x.shape, dtype) for a, x in inputs.items()},
            {a: jax.ShapeDtypeStruct(x.shape, jnp.float32) for a, x in states.items()})


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_lowers_for_tpu(name, dtype):
    """The kernels (not the interpreter) lower for TPU without a TPU: Mosaic's lowering accepts every op, block
    shape and index map, and the exported module holds the Mosaic custom call."""
    v = VARIANTS[name]
    k = kernel(name, None, interpret=False)
    ins, states = _structs(v, dtype)
    exported = jax.export.export(jax.jit(lambda i, s: k(**i, initial_states=s)), platforms=["tpu"])(ins, states)
    assert "tpu_custom_call" in exported.mlir_module()
    n_states = len(v.state_names)
    assert len(exported.out_avals) == len(v.out_names) + n_states


# the gradient's XLA code compiles slowly for TPU: a scalar, a key-wise, an elementwise and a sequential decay
BACKWARD = ["mamba2", "gla", "mamba1", "deltanet"]


@functools.lru_cache(maxsize=None)
def _aot_results() -> dict:
    import json
    import os
    import pathlib
    import subprocess
    import sys
    script = pathlib.Path(__file__).with_name("tpu_aot.py")
    # libtpu takes a lockfile unless told several processes may load it (another test process may hold it)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run([sys.executable, str(script), "--t", "100", "--backward", ",".join(BACKWARD),
                           "--packed", ",".join(PACKED)],
                          capture_output=True, text=True, env=env,
                          timeout=900)
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert rows, f"tpu_aot.py printed no results (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return {(r["name"], r["dtype"], r["kind"]): r for r in rows}


# packed sequences (cu_seqlens): a chunked SSD, an elementwise (sequential), a key-wise and a non-diagonal class
PACKED = ("mamba2", "mamba1", "gla", "deltanet")
# every example's forward, and the gradient (jax.grad through the tpu target: Pallas kernels for the values, the
# XLA code's derivatives) of BACKWARD's, in both dtypes
AOT = [(n, d, "forward") for n in NAMES for d in ("float32", "bfloat16")] + \
      [(n, d, "backward") for n in BACKWARD for d in ("float32", "bfloat16")] + \
      [(n, d, "packed") for n in PACKED for d in ("float32", "bfloat16")]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install 'libtpu==0.0.42.*' compiles for TPU without one)")
@pytest.mark.slow
def test_compiles_with_mosaic_for_tpu():
    """With libtpu installed: XLA:TPU and Mosaic compile the examples' kernels (and gradients) ahead of time for a
    v5e device (tests/tpu_aot.py), so layouts, relayouts and VMEM addressing are checked too, not only the
    lowering. One test, one process (the compiles share it): failures are listed by (example, dtype, kind)."""
    res = _aot_results()
    missing = [c for c in AOT if c not in res]
    bad = {c: res[c]["error"][:500] for c in AOT if c in res and not res[c]["ok"]}
    assert not missing and not bad, f"not compiled: {missing}; failed: {bad}"


EMA = """
ssm ema {
  dims b, t, h
  scan t
  in x[b,t,h], a[h]
  state c[b,h]
  out y[b,t,h]
  c = a*c + x
  y = c
}
"""


@pytest.mark.parametrize("chunk", [None, 1])
def test_per_program_scalar_state(chunk):
    """A state with no tile dims is one scalar per program: a (1, 1) VMEM block (inputs of that shape go to SMEM)."""
    rng = np.random.default_rng(3)
    b, t, h = 2, 21, 3
    x = rng.standard_normal((b, t, h)).astype(np.float32)
    a = rng.uniform(0.5, 0.95, h).astype(np.float32)
    c0 = rng.standard_normal((b, h)).astype(np.float32)
    k = ssmc.compile(EMA, target="tpu", interpret=True, chunk_size=chunk)
    y, c = k(x, a, initial_state=c0)
    cr, ys = c0.astype(np.float64), []
    for i in range(t):
        cr = a * cr + x[:, i]
        ys.append(cr)
    np.testing.assert_allclose(np.asarray(y), np.stack(ys, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(c), cr, rtol=1e-5, atol=1e-5)
