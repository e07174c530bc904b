"""The Triton target in interpret mode (Triton's CPU interpreter runs the generated kernels): every example
against its float64 numpy reference, multi-chunk and partial-chunk lengths, initial states, groups, bf16/fp16
inputs, inside jax.jit, and the readability of the generated source."""
from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmc
from helpers import first_fast
from reference import VARIANTS, rel_l2

NAMES = list(VARIANTS)
FP32_TOL = 1e-4


@functools.lru_cache(maxsize=None)
def kernel(name, chunk_size=None, matmul="auto"):
    return ssmc.compile(str(VARIANTS[name].path), target="triton", interpret=True, chunk_size=chunk_size,
                        matmul=matmul)


# (chunk_size, t, initial states): several chunks with a partial last one, a sequence shorter than one chunk,
# and the sequential kernel (chunk_size=1)
CASES = [(16, 37, True), (None, 70, False), (1, 11, True)]


# the fast set (-m "not slow") keeps the first case (several chunks, a partial last one, initial states)
@pytest.mark.parametrize("case", first_fast(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_fp32_matches_reference(sx, rng, name, case):
    chunk, t, with_init = case
    v = VARIANTS[name]
    sx.check(rng, v, {"t": t}, with_init, kernel=kernel(name, chunk), tol=FP32_TOL, what=" (triton)")


@pytest.mark.parametrize("name, chunk", [("mamba2", 16), ("mamba1", 1)])
def test_64bit_offsets(sx, rng, monkeypatch, name, chunk):
    """Arrays of 2^31 entries or more take 64-bit element offsets (I64; the one-GPU Mamba2 run at L=524288 read out
    of bounds with 32-bit ones): that form of the kernels, forced here on small arrays, computes the same."""
    from ssmc.targets import kernel_runtime as kr
    assert kr.needs_64bit_offsets({"arrays": {"x": ["b", "t", "h", "p"]}, "scan": "t"},
                                  {"b": 1, "t": 524288, "h": 80, "p": 64})
    assert not kr.needs_64bit_offsets({"arrays": {"x": ["b", "t", "h", "p"]}, "scan": "t"},
                                      {"b": 1, "t": 131072, "h": 80, "p": 64})
    monkeypatch.setattr(kr, "needs_64bit_offsets", lambda layout, sizes: True)
    k = ssmc.compile(str(VARIANTS[name].path), target="triton", interpret=True, chunk_size=chunk, cache=False)
    sx.check(rng, VARIANTS[name], {"t": 37}, True, kernel=k, tol=FP32_TOL, what=" (triton, I64)")


LOW = [("bfloat16", jnp.bfloat16, 3e-2), ("float16", jnp.float16, 1e-2)]


@pytest.mark.parametrize("dtype_name,dtype,tol", [pytest.param(*LOW[0]), pytest.param(*LOW[1], marks=pytest.mark.slow)],
                         ids=[d[0] for d in LOW])
@pytest.mark.parametrize("name", ["mamba2", "mamba2_gated", "gla", "mamba1"])
def test_low_precision_inputs(sx, rng, name, dtype_name, dtype, tol):
    """bf16/fp16 inputs are read as they are (matmul operands at that precision, fp32 accumulation and states);
    outs come back in the input dtype, states in float32."""
    v = VARIANTS[name]
    inputs = v.make_inputs(rng, {"t": 40})
    init = v.make_initial_states(rng, {"t": 40})
    low = {k: jnp.asarray(x).astype(dtype) for k, x in inputs.items()}
    rounded = {k: np.asarray(x.astype(jnp.float32)) for k, x in low.items()}
    ref_outs, ref_states = v.reference(rounded, init)
    outs, states = sx.run(v, low, init, kernel=kernel(name, 16))
    sx.compare(v, outs, states, ref_outs, ref_states, tol, out_dtype=dtype, what=f" (triton, {dtype_name})")


@pytest.mark.parametrize("groups", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["mamba2", "mamba2_gated"])  # gated: the norm kernel tiles one group's heads
def test_groups_are_an_index_map(sx, rng, name, groups):
    v = VARIANTS[name]
    dims = {"h": 4, "g": groups, "t": 37}
    sx.check(rng, v, dims, True, kernel=kernel(name, 16), tol=FP32_TOL, what=f" (triton, g={groups})")
    src = kernel(name, 16).source
    assert "i_g = i_h // (N_h // N_g)" in src  # B, C read per group, never repeated


def test_odd_tile_sizes_are_masked(sx, rng):
    """Tile dims that are not powers of two (p=5, n=3) are padded inside a program; the padding must never reach
    a sum, an out or a state."""
    v = VARIANTS["mamba2_gated"]
    dims = {"p": 5, "n": 3, "t": 37}
    sx.check(rng, v, dims, True, kernel=kernel("mamba2_gated", 16), tol=FP32_TOL, what=" (triton, odd tiles)")


def test_inside_jit_and_matches_xla(sx, rng):
    v = VARIANTS["rwkv6"]
    inputs = v.make_inputs(rng, {"t": 33})
    k = kernel("rwkv6")
    got = jax.jit(lambda kw: k(**kw))(inputs)
    want = ssmc.compile(str(v.path), target="xla")(**inputs)
    for a, b in zip(got, want):
        assert rel_l2(np.asarray(a), np.asarray(b)) < FP32_TOL


def test_source_is_readable():
    src = kernel("mamba2").source
    # the one walk, and the segment kernels (a) states and (c) outputs of the sequence-parallel schedule
    assert src.count("@triton.jit") == 3
    for stage in ("# stage prologue", "# stage cumsum", "# stage chunk_output", "# stage chunk_state + state_passing"):
        assert stage in src, stage
    assert "def mamba2_chunked(\n    x_ptr,\n    dt_ptr,\n    A_ptr,\n    B_ptr,\n" in src  # names from the spec
    assert "tl.dot(" in src  # in-chunk quadratic part and state contractions on tensor cores
    seq = kernel("deltanet").source
    assert "def deltanet_sequential(" in seq and "for t_i in range(0, seq_len):" in seq


def test_unsupported_specs_name_the_place():
    """What the kernel targets cannot hold in one program is a TargetError that says where and what to use."""
    conv = VARIANTS["mamba2_conv"].path.read_text().replace("conv(xr, wx, over=t)", "conv(xr * 2.0, wx, over=t)")
    with pytest.raises(ssmc.TargetError, match=r"conv at 1\d:\d+ convolves a computed value.*target='xla'"):
        ssmc.compile(conv, target="triton", interpret=True)
    summed = VARIANTS["mamba2"].path.read_text().replace("y = C·h + D*x", "y[b,t,p] = C·h")
    summed = summed.replace("out y[b,t,h,p]", "out y[b,t,p]")
    with pytest.raises(ssmc.TargetError, match=r"group g -> h.*sums over 'h'"):
        ssmc.compile(summed, target="triton", interpret=True)


def test_autotune_choice_is_persisted(monkeypatch, tmp_path):
    """The tuned config is keyed by (kernel source, device, shape bucket, dtypes) and read back from the disk cache
    by a new process (here: the in-process table cleared) instead of tuning again; SSMC_AUTOTUNE=0 never tunes."""
    from ssmc.targets import triton_runtime as tr

    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tr, "_TUNED", {})
    calls = []

    def fake_tune(kern, layout, sizes, ins, specs, mm):
        calls.append(sizes["t"])
        return {"blocks": {d: 32 for d in layout["tile"]}, "Q": 128, "num_warps": 8, "num_stages": 1}

    monkeypatch.setattr(tr, "_tune", fake_tune)
    mod = kernel("mamba2")._module
    layout, kern = mod.LAYOUT, mod.mamba2_chunked
    sizes = {"b": 2, "t": 1000, "h": 4, "p": 64, "n": 128, "g": 1}
    ins = [jax.ShapeDtypeStruct(tuple(sizes[d] for d in layout["arrays"][a]), jnp.bfloat16) for a in layout["inputs"]]
    cfg = tr._config(kern, layout, sizes, ins, None, jnp.bfloat16)
    assert calls == [1000] and cfg["Q"] == 128
    tr._TUNED.clear()
    assert tr._config(kern, layout, dict(sizes, t=1020), ins, None, jnp.bfloat16) == cfg  # same bucket, from disk
    assert calls == [1000]
    tr._config(kern, layout, dict(sizes, t=4000), ins, None, jnp.bfloat16)  # another bucket tunes
    assert calls == [1000, 4000]
    # the same kernel source compiled at another chunk length (Q is a constexpr) does not take that config: a
    # fixed-length kernel run at the tuned Q would read chunk-indexed arrays at the wrong chunks
    other = kernel("mamba2", chunk_size=32)._module
    src = lambda f: getattr(f, "src", f.__name__)  # what _config hashes (the interpreter's kernels: the name)
    assert src(other.mamba2_chunked) == src(kern) and other.LAYOUT["Q"] != layout["Q"]
    tr._config(other.mamba2_chunked, other.LAYOUT, sizes, ins, None, jnp.bfloat16)
    assert calls == [1000, 4000, 1000]
    monkeypatch.setenv("SSMC_AUTOTUNE", "0")
    assert tr._config(kern, layout, dict(sizes, t=9000), ins, None, jnp.bfloat16) == tr.heuristic(layout, sizes)
    assert calls == [1000, 4000, 1000]
    cands = tr.candidates(layout, sizes, jnp.bfloat16)
    assert {c["Q"] for c in cands} == {64, 128} and {c["num_warps"] for c in cands} == {4, 8}
    assert {c["Q"] for c in tr.candidates(layout, sizes, jnp.float32)} == {64}


def test_without_gpu_says_how_to_interpret(rng):
    """Compiled for the GPU on a CPU-only jax: a TargetError that points at interpret=True, not an import error."""
    v = VARIANTS["mamba2"]
    k = ssmc.compile(str(v.path), target="triton")
    with pytest.raises(ssmc.TargetError, match="need a GPU; compile with interpret=True"):
        k(**v.make_inputs(rng, {"t": 8}))


@pytest.mark.slow
def test_untuned_configs_fit_shared_memory(tmp_path):
    """Untuned (SSMC_AUTOTUNE=0), every kernel of a Mamba2 forward+backward at chunk 128 with fp32 backward dots
    gets a config whose shared memory, from Triton's compiler for sm_90 (no GPU needed), fits an H200's 232448
    bytes; the heuristic's own config does not for every kernel (adj:rest asked for 245760 and failed at launch).
    In a process of its own: Triton compiles for a GPU only where its interpreter is off."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(SSMC_CACHE_DIR=str(tmp_path), SSMC_AUTOTUNE="0", JAX_PLATFORMS="cpu")
    script = pathlib.Path(__file__).with_name("fit_shared_memory.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(x) for x in run.stdout.splitlines() if x.startswith("{")]
    names = {r["kernel"] for r in rows}
    assert {"mamba2_fwd_chunked", "mamba2_dq_segment_outputs", "mamba2_adj_rest_segment_outputs"} <= names, names
    for r in rows:
        assert r["shared"] <= r["limit"], r
    assert any(not r["heuristic"] for r in rows), "no kernel needed a smaller config: the check is not exercised"
