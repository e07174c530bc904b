"""matmul="auto" feeds bf16/fp16 inputs to the contractions at their own precision (fp32 accumulation);
matmul="float32" keeps every contraction at full precision. Both against the float64 reference on the rounded
inputs."""
import jax.numpy as jnp
import numpy as np
import pytest

import ssmc
from reference import VARIANTS, rel_l2


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", ["mamba2", "gla", "deltanet"])
def test_matmul_modes(name, dtype, rng):
    v = VARIANTS[name]
    inp = {n: jnp.asarray(a, dtype) for n, a in v.make_inputs(rng, {"t": 70}).items()}
    outs, finals = v.reference({n: np.asarray(a.astype(jnp.float32)) for n, a in inp.items()})
    full = ssmc.compile(str(v.path), matmul="float32")(**inp)
    auto = ssmc.compile(str(v.path))(**inp)
    n_out = len(v.out_names)
    for res, state_tol in ((full, 1e-5), (auto, 2e-2)):
        assert res[0].dtype == dtype and res[n_out].dtype == jnp.float32
        for got, want in zip(res[:n_out], outs):
            assert rel_l2(np.asarray(got.astype(jnp.float32)), want) < 2e-2
        for got, want in zip(res[n_out:], finals):  # states: fp32, only the matmul operands are rounded
            assert rel_l2(np.asarray(got), want) < state_tol


def test_matmul_option_is_checked():
    with pytest.raises(ssmc.SSMCError, match="matmul"):
        ssmc.compile(str(VARIANTS["mamba2"].path), matmul="tf32")
