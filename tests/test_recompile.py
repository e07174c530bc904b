"""No recompile per sequence length or batch (issue 12, item 5).

The generated Triton kernels take batch, heads and the sequence length as runtime arguments (not constexpr, and
`do_not_specialize`), so a call at a new length or batch must not need a new compile. In Triton's CPU interpreter
nothing is compiled, so every launch is recorded and its compile-cache key computed the way the real launchers do:
Triton's own JIT binder (`JITFunction.run` looks the compiled kernel up by exactly this key) and jax-triton
0.3.1's key (constexpr keywords, the types of scalar arguments and which of them equal 1). Numerics are checked
against the float64 references at every size. Tuned configs are keyed by a shape bucket (next power of two of the
length, of batch x heads): a new size in a known bucket reuses the config without tuning again.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

import ssmc
from reference import VARIANTS


@pytest.fixture
def launches(monkeypatch):
    """Every interpreted kernel launch: (python function, positional args, keyword args)."""
    from triton.runtime.interpreter import InterpretedFunction
    rec = []
    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        rec.append((self.fn, args, kwargs))
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return rec


def _jit_objects(k) -> dict:
    """The generated module's @triton.jit objects by their Python function (they carry the decorator's options)."""
    from triton.runtime.interpreter import InterpretedFunction
    return {v.fn: v for v in vars(k._module).values() if isinstance(v, InterpretedFunction)}


def triton_key(jit_obj, args, kwargs):
    """Triton's JIT cache key of a launch: the specialisation of every argument (constexpr values, the type and
    divisibility / ==1 of ints unless do_not_specialize) and the options."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature
    opts = {n: v for n, v in jit_obj.kwargs.items() if n.startswith("do_not_specialize")}
    jf = JITFunction(jit_obj.fn, **opts)
    binder = create_function_from_signature(jf.signature, jf.params, BaseBackend)
    _, spec, options = binder(*args, **kwargs)
    return compute_cache_key({}, spec, options)


def jax_triton_key(args, kwargs):
    """jax-triton 0.3.1's compile-cache key, less what is fixed per kernel: the keyword (constexpr) values, and
    per Python-int argument its type and whether it equals 1 (jax-triton compiles 1 in as a constant)."""
    scalars = tuple(("i32" if -2**31 <= a < 2**31 else "i64", a == 1) for a in args if isinstance(a, int))
    return tuple(sorted((n, str(v)) for n, v in kwargs.items())), scalars


def _walk_object(k):
    """The @triton.jit object of the one-walk kernel (the module also holds the segment kernels)."""
    return _jit_objects(k)[getattr(k._module, k._module.MODULE_INFO.entry + "_chunked").fn]


def _count_compiles(k, launches):
    objs = _jit_objects(k)
    keys: dict[str, tuple[set, set]] = {}
    for fn, args, kwargs in launches:
        tk, jk = keys.setdefault(fn.__name__, (set(), set()))
        tk.add(triton_key(objs[fn], args, kwargs))
        jk.add(jax_triton_key(args, kwargs))
    return keys


# (variant, chunk_size, sizes per call): lengths in one power-of-two bucket, then a new bucket and batch
CASES = [
    ("mamba2", 16, [{"t": 37}, {"t": 45}, {"t": 100, "b": 3}]),   # chunked walk, partial last chunks
    ("mamba1", None, [{"t": 11}, {"t": 14, "b": 3}]),              # sequential walk
    ("mamba2_gated", 16, [{"t": 20}, {"t": 27}]),                  # + the grouped-norm kernel (t in its grid)
]


@pytest.mark.parametrize("name,chunk,calls,segments", [c + (None,) for c in CASES] + [
    ("mamba2", 8, [{"t": 37}, {"t": 45}, {"t": 100, "b": 3}], 2),  # the segment kernels (a), (c): 2 segments
], ids=[c[0] for c in CASES] + ["mamba2-segments"])
def test_new_length_reuses_the_compiled_kernel(sx, rng, launches, name, chunk, calls, segments):
    v = VARIANTS[name]
    k = ssmc.compile(str(v.path), target="triton", interpret=True, chunk_size=chunk, segments=segments)
    for dims in calls:
        sx.check(rng, v, dims, True, kernel=k, tol=1e-4, what=f" (triton, {dims})")
    keys = _count_compiles(k, launches)
    assert keys, "no kernel launch was recorded"
    if segments:
        assert set(keys) == {f"{k._module.MODULE_INFO.entry}_segment_states", f"{k._module.MODULE_INFO.entry}_segment_outputs"}, keys
    for kname, (tk, jk) in keys.items():
        n = sum(1 for fn, *_ in launches if fn.__name__ == kname)
        assert n == len(calls), (kname, n)
        assert len(tk) == 1, f"{kname}: {len(tk)} Triton compiles for {len(calls)} sizes {calls}"
        assert len(jk) == 1, f"{kname}: {len(jk)} jax-triton compiles for {len(calls)} sizes {calls}"


def test_runtime_sizes_are_not_constexpr():
    """The sizes that vary between calls are plain kernel arguments; tile sizes, blocks and Q stay constexpr."""
    k = ssmc.compile(str(VARIANTS["mamba2"].path), target="triton", interpret=True)
    obj = _walk_object(k)
    from triton.runtime.jit import JITFunction
    params = {p.name: p for p in JITFunction(obj.fn, **obj.kwargs).params}
    for n in ("N_b", "N_t", "N_h"):
        assert not params[n].is_constexpr and params[n].do_not_specialize, n
    for n in ("N_p", "N_n", "BLOCK_p", "BLOCK_n", "Q", "x_stride_h"):
        assert params[n].is_constexpr, n
    assert not any(p.startswith("x_stride_b") or p.startswith("x_stride_t") for p in params)


def test_tuned_config_is_keyed_by_shape_bucket(monkeypatch, tmp_path):
    """A new length or batch in a known bucket takes the tuned config from the first (no tuning); a length in a
    new bucket tunes again; a new process finds the config on disk."""
    from ssmc.targets import triton_runtime as rt
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SSMC_AUTOTUNE", "1")
    monkeypatch.setattr(rt, "_TUNED", {})
    tuned = []

    def fake_tune(kernel, layout, sizes, ins, specs, mm):
        tuned.append(dict(sizes))
        return rt.heuristic(layout, sizes)

    monkeypatch.setattr(rt, "_tune", fake_tune)
    k = ssmc.compile(str(VARIANTS["mamba2"].path), target="triton", interpret=True)
    layout, obj = k._module.LAYOUT, _walk_object(k)

    def config(b, t):
        sizes = {"b": b, "t": t, "h": 4, "p": 8, "g": 2, "n": 8}
        arrays = {n: jax.ShapeDtypeStruct(tuple(sizes[d] for d in layout["arrays"][n]), "float32")
                  for n in layout["inputs"]}
        ins = [arrays[n] for n in layout["inputs"]]
        return rt._config(obj, layout, sizes, ins, rt.kr.out_specs(layout, sizes, "float32"), "float32")

    config(3, 37)                 # 12 programs, length 37: bucket (16 programs, length 64)
    config(4, 50)                 # same bucket: no tuning
    assert len(tuned) == 1, tuned
    config(4, 100)                # length bucket 128: tunes
    assert len(tuned) == 2, tuned
    monkeypatch.setattr(rt, "_TUNED", {})  # a fresh process: the configs come from the disk cache
    config(3, 60)
    config(4, 128)
    assert len(tuned) == 2, tuned


def test_absent_state_starts_from_zeros_made_outside_the_jit(rng):
    """Called eagerly without an initial state, a kernel target's state starts from device zeros made once per shape
    outside the jitted call (a state has no scan dim): the traced function holds the kernel call and nothing XLA
    must compile per length (on an H200 that fusion was half of a new length's first call). Same result as zeros
    given explicitly; under an outer jit the zeros stay inside, as before."""
    import jax
    import jax.numpy as jnp

    v = VARIANTS["mamba2"]
    k = ssmc.compile(str(v.path), target="triton", interpret=True, chunk_size=8)
    b, t, h, p, n, g = 1, 19, 2, 4, 4, 1
    x = jnp.asarray(rng.standard_normal((b, t, h, p)), jnp.float32)
    dt = jnp.asarray(rng.uniform(0.1, 0.5, (b, t, h)), jnp.float32)
    A = jnp.asarray(-rng.uniform(0.5, 1.5, (h,)), jnp.float32)
    B, C = (jnp.asarray(rng.standard_normal((b, t, g, n)), jnp.float32) for _ in range(2))
    D = jnp.asarray(rng.standard_normal((h,)), jnp.float32)
    args = (x, dt, A, B, C, D)
    meta, arrays = k._bound(args, {}, None, None)  # what the call passes its jitted entry
    assert arrays["state:h"].shape == (b, h, p, n) and not np.any(np.asarray(arrays["state:h"]))
    jaxpr = str(k._jitted.trace(meta, arrays).jaxpr)
    assert "broadcast_in_dim" not in jaxpr, jaxpr
    y0, h0 = k(*args)
    y1, h1 = k(*args, initial_state=np.zeros((b, h, p, n), np.float32))
    y2, h2 = jax.jit(lambda *a: k(*a))(*args)
    for a_, b_ in ((y0, y1), (h0, h1), (y0, y2), (h0, h2)):
        np.testing.assert_array_equal(np.asarray(a_), np.asarray(b_))
