"""ssmc.StateCache: shapes, per-layer get/update, positions, reset, pytree behaviour under jit, errors, and
sharding over batch and heads on a 2-device CPU mesh (in a subprocess, which can set the device count)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ssmc
from reference import VARIANTS, rel_l2
from ssmc import ShapeError, StateCache
from ssmc.state_cache import LayerIndexError

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"h": 4, "p": 8, "n": 8, "g": 2, "k": 4}


@pytest.fixture(scope="module")
def kconv():
    return ssmc.compile(str(VARIANTS["mamba2_conv"].path))


def test_create_shapes(kconv):
    c = StateCache.create(kconv, num_layers=3, batch_size=2, sizes=SIZES)
    assert c.layout.names == ("s", "xr_win", "Br_win", "Cr_win")
    assert c.states["s"].shape == (3, 2, 4, 8, 8) and c.states["xr_win"].shape == (3, 2, 3, 4, 8)
    assert c.states["Br_win"].shape == (3, 2, 3, 2, 8)
    assert all(x.dtype == jnp.float32 and not np.any(np.asarray(x)) for x in c.states.values())
    assert c.positions.shape == (2,) and c.positions.dtype == jnp.int32
    assert c.num_layers == 3 and c.batch_size == 2
    assert c.nbytes() == 3 * 4 * (2 * 4 * 8 * 8 + 2 * 3 * 4 * 8 + 2 * 2 * 3 * 2 * 8)
    bf = StateCache.create(kconv, 1, 2, dtype=jnp.bfloat16, sizes=SIZES)
    assert bf.states["s"].dtype == jnp.bfloat16


def test_update_layer_positions_and_reset(kconv, rng):
    c = StateCache.create(kconv, num_layers=2, batch_size=2, sizes=SIZES)
    new = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(c.layout.names, c.layout.shapes)}
    c1 = c.update(1, new, num_tokens=5)
    assert all(np.array_equal(c1.layer(1)[n], new[n]) for n in new)
    assert not any(np.any(np.asarray(x)) for x in c1.layer(0).values())
    assert not any(np.any(np.asarray(x)) for x in c.layer(1).values())  # functional: the old cache is unchanged
    np.testing.assert_array_equal(c1.layer_positions, [[0, 0], [5, 5]])
    np.testing.assert_array_equal(c1.positions, [0, 0])  # layer 0 has not seen the tokens yet
    c2 = c1.update(0, tuple(new[n] for n in c.layout.names), num_tokens=np.array([5, 3]))
    np.testing.assert_array_equal(c2.positions, [5, 3])
    assert c2.layer(-1)["s"].shape == (2, 4, 8, 8)
    # reset one sequence (a freed batch slot), then all
    r = c2.reset([1])
    assert np.array_equal(r.layer(0)["s"][0], new["s"][0]) and not np.any(np.asarray(r.layer(0)["s"][1]))
    assert not np.any(np.asarray(r.layer(1)["xr_win"][1]))
    np.testing.assert_array_equal(r.positions, [5, 0])
    np.testing.assert_array_equal(c2.reset(np.array([True, False])).positions, [0, 3])
    z = c2.reset()
    assert not any(np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(z))


def test_pytree_under_jit_with_traced_layer(kconv, rng):
    c = StateCache.create(kconv, num_layers=3, batch_size=2, sizes=SIZES)
    new = {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(c.layout.names, c.layout.shapes)}

    @jax.jit
    def put(cache, i, states):
        return cache.update(i, states, num_tokens=2)

    out = put(c, jnp.int32(2), new)
    assert isinstance(out, StateCache) and out.layout == c.layout
    assert np.array_equal(out.layer(2)["Cr_win"], new["Cr_win"])
    np.testing.assert_array_equal(out.layer_positions[:, 0], [0, 0, 2])
    leaves, tree = jax.tree_util.tree_flatten(c)
    assert len(leaves) == 5 and jax.tree_util.tree_unflatten(tree, leaves).layout == c.layout


def test_two_layer_model_prefill_then_decode(rng):
    """Two mamba2 layers (the second reads the first's output): prefill + token-by-token decode through the
    cache equals one full-sequence forward."""
    v = VARIANTS["mamba2"]
    k = ssmc.compile(str(v.path))
    T, t0 = 12, 7
    layers = [v.make_inputs(rng, {"t": T}) for _ in range(2)]

    def layer_in(j, x, a, b):
        inp = {n: (a_[:, a:b] if n != "x" and a_.ndim > 1 and a_.shape[1] == T else a_) for n, a_ in layers[j].items()}
        inp["x"] = x
        return inp

    def forward(x, a, b, cache=None):
        for j in range(2):
            if cache is None:
                x, _ = k(**layer_in(j, x, a, b))
            else:  # the prompt through the kernel call, then one token at a time through step
                x, h = k(**layer_in(j, x, a, b), initial_states=cache.layer(j)) if b - a > 1 else \
                    k.step(cache.layer(j), **layer_in(j, x, a, b))
                cache = cache.update(j, h, num_tokens=b - a)
        return x, cache

    x = layers[0]["x"]
    y_full, _ = forward(x, 0, T)
    cache = StateCache.create(k, num_layers=2, batch_size=2, sizes={"h": 4, "p": 8, "n": 8})
    y0, cache = forward(x[:, :t0], 0, t0, cache)
    ys = [y0]
    for t in range(t0, T):
        y, cache = forward(x[:, t:t + 1], t, t + 1, cache)
        ys.append(y)
    np.testing.assert_array_equal(cache.positions, [T, T])
    assert rel_l2(np.concatenate(ys, axis=1), y_full) < 1e-5


def test_errors(kconv, rng):
    with pytest.raises(ShapeError, match=r"size of dims p, n of state s\[b,h,p,n\] is unknown; pass sizes="):
        StateCache.create(kconv, 2, 2, sizes={"h": 4, "g": 2, "k": 4})
    with pytest.raises(ShapeError, match=r"dim k-1 of state xr_win\[b,k-1,h,p\] is unknown; pass sizes=\{'k': ...\}"):
        StateCache.create(kconv, 2, 2, sizes={"h": 4, "p": 8, "n": 8, "g": 2})
    with pytest.raises(ShapeError, match="num_layers must be a positive int"):
        StateCache.create(kconv, 0, 2, sizes=SIZES)
    with pytest.raises(ShapeError, match="no batch dim 'batch'"):
        StateCache.create(kconv, 2, 2, sizes=SIZES, batch_dim="batch")
    c = StateCache.create(kconv, num_layers=2, batch_size=2, sizes=SIZES)
    with pytest.raises(LayerIndexError, match=r"layer 2 out of range; the cache holds 2 layers \(0\.\.1\)"):
        c.layer(2)
    with pytest.raises(IndexError):
        c.update(-3, c.layer(0))
    with pytest.raises(LayerIndexError, match="must be an int"):
        c.layer(1.0)
    bad = dict(c.layer(0))
    bad["s"] = np.zeros((2, 4, 8, 7), np.float32)
    with pytest.raises(ShapeError, match=r"state 's' for layer 0 has shape \(2, 4, 8, 7\), expected \(2, 4, 8, 8\)"):
        c.update(0, bad)
    with pytest.raises(ShapeError, match="missing Cr_win"):
        c.update(0, {n: x for n, x in c.layer(0).items() if n != "Cr_win"})
    with pytest.raises(ShapeError, match="got 1 states, expected 4"):
        c.update(0, (c.layer(0)["s"],))
    with pytest.raises(ShapeError, match="holds 4 states per layer"):
        c.update(0, c.layer(0)["s"])
    with pytest.raises(ShapeError, match=r"mask of sequences must have shape \(2,\)"):
        c.reset(np.array([True, False, True]))


def test_partition_specs(kconv):
    c = StateCache.create(kconv, 2, 2, sizes=SIZES)
    specs = c.partition_specs(batch_axis="data", head_axis="model")
    assert specs.states["s"] == P(None, "data", "model", None, None)
    assert specs.states["xr_win"] == P(None, "data", None, "model", None)
    assert specs.states["Br_win"] == P(None, "data", None, None, None)  # no head dim: only the batch is split
    assert specs.layer_positions == P(None, "data")
    assert jax.tree_util.tree_structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree_util.tree_structure(c)


SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, ssmc
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    assert len(jax.devices()) == 2, jax.devices()
    k = ssmc.compile("examples/mamba2.ssm")
    rng = np.random.default_rng(0)
    b, h, p, n = 2, 4, 8, 8
    tok = {"x": rng.standard_normal((b, h, p)), "dt": np.full((b, h), 0.1), "A": -np.ones(h),
           "B": rng.standard_normal((b, 2, n)), "C": rng.standard_normal((b, 2, n)), "D": np.ones(h)}
    tok = {kk: v.astype(np.float32) for kk, v in tok.items()}
    for shape, axes in (((2, 1), ("data", None)), ((1, 2), (None, "model"))):
        mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "model"))
        cache = ssmc.StateCache.create(k, num_layers=2, batch_size=b, sizes={"h": h, "p": p, "n": n})
        sh = cache.shardings(mesh, batch_axis="data", head_axis="model")
        cache = jax.device_put(cache, sh)
        born = ssmc.StateCache.create(k, num_layers=2, batch_size=b, sizes={"h": h, "p": p, "n": n}, mesh=mesh,
                                      head_axis="model")  # created sharded
        assert born.states["h"].sharding.spec == P(None, "data", "model", None, None), born.states["h"].sharding
        assert born.layer_positions.sharding.is_equivalent_to(sh.layer_positions, 2)

        def decode(cache, tok):
            for i in range(cache.num_layers):
                y, new = k.step(cache.layer(i), **tok)
                cache = cache.update(i, new)
            return y, cache

        y, out = jax.jit(decode, out_shardings=(None, sh))(cache, tok)
        assert out.states["h"].sharding.spec == P(None, "data", "model", None, None), out.states["h"].sharding
        assert out.layer_positions.sharding.spec == P(None, "data")
        shard_shape = out.states["h"].sharding.shard_shape(out.states["h"].shape)
        assert shard_shape == (2, b // shape[0], h // shape[1], p, n), shard_shape
        y0, ref = decode(jax.device_get(cache), tok)
        assert np.allclose(np.asarray(y), np.asarray(y0), rtol=1e-5, atol=1e-6)
        assert np.allclose(np.asarray(out.states["h"]), np.asarray(ref.states["h"]), rtol=1e-5, atol=1e-6)
    print("sharded ok")
""")


def test_sharded_over_batch_and_heads_on_two_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", SHARDED], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "sharded ok" in proc.stdout, proc.stdout + proc.stderr
