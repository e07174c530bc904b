"""jax.vmap through a compiled kernel, on every target (the kernel targets in their interpreters): each vmapped
example against the float64 reference, nested vmaps with an operand shared by the inner level, and on the tpu
target the vmapped kernel still lowers for a TPU (Mosaic marks the vmapped grid axes itself)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmc
from reference import VARIANTS, rel_l2

TOL = 1e-4
TARGETS = ["xla", "triton", "tpu"]
DIMS = dict(b=1, t=11, h=2, dk=4, dv=4)


def _kernel(target, name="retnet"):
    return ssmc.compile(str(VARIANTS[name].path), target=target, interpret=target != "xla", chunk_size=8)


@pytest.mark.parametrize("target", TARGETS)
def test_vmap(rng, target):
    v = VARIANTS["retnet"]
    k = _kernel(target)
    ins = [v.make_inputs(rng, DIMS) for _ in range(3)]
    stk = {n: jnp.asarray(np.stack([i[n] for i in ins])) for n in v.in_names}
    o, S = jax.vmap(lambda x: k(**x))(stk)
    assert o.shape == (3,) + ins[0]["v"].shape[:3] + (DIMS["dv"],)
    for j in range(3):
        (ro,), (rS,) = v.reference(ins[j])
        assert rel_l2(np.asarray(o[j]), ro) < TOL and rel_l2(np.asarray(S[j]), rS) < TOL, j


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_nested_vmap_with_a_shared_operand(rng, target):
    """vmap(vmap(f), in_axes=(0, None)) inside jit, one operand mapped only by the inner vmap, gamma by none."""
    v = VARIANTS["retnet"]
    k = _kernel(target)
    grid = [[v.make_inputs(rng, DIMS) for _ in range(2)] for _ in range(2)]
    gamma = grid[0][0]["gamma"]
    qk = {n: np.stack([np.stack([x[n] for x in row]) for row in grid]) for n in ("q", "k")}
    vv = np.stack([x["v"] for x in grid[0]])
    f = jax.jit(jax.vmap(jax.vmap(lambda q, kk, vx: k(q=q, k=kk, v=vx, gamma=gamma)), in_axes=(0, 0, None)))
    o, S = f(qk["q"], qk["k"], vv)
    for a in range(2):
        for j in range(2):
            x = dict(grid[a][j], v=grid[0][j]["v"], gamma=gamma)
            (ro,), (rS,) = v.reference(x)
            assert rel_l2(np.asarray(o[a, j]), ro) < TOL and rel_l2(np.asarray(S[a, j]), rS) < TOL, (a, j)


def test_vmapped_tpu_kernel_lowers_for_tpu(rng):
    """Outside the interpreter the vmapped pallas_call is Pallas' own batching (Mosaic marks the vmapped grid axis
    parallel): it must still export for a TPU."""
    v = VARIANTS["retnet"]
    kt = ssmc.compile(str(v.path), target="tpu", chunk_size=8)
    ins = v.make_inputs(rng, DIMS)
    avals = {n: jax.ShapeDtypeStruct((3,) + x.shape, jnp.float32) for n, x in ins.items()}
    exported = jax.export.export(jax.jit(jax.vmap(lambda x: kt(**x))), platforms=["tpu"])(avals)
    assert "tpu_custom_call" in exported.mlir_module()
