"""Run by tests/test_triton.py::test_untuned_configs_fit_shared_memory in a process without Triton's interpreter:
traces a Mamba2 forward+backward (chunk 128, fp32 backward dots, untuned) with the GPU launch replaced by a record,
and prints one JSON line per launched kernel: its config, whether that is the heuristic's, and its shared memory
compiled for sm_90 against an H200's limit."""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import ssmc  # noqa: E402
from reference import VARIANTS  # noqa: E402
from ssmc.targets import triton_runtime as tr  # noqa: E402

H200 = (90, 232448)


def main():
    tr.device_limits = lambda: H200
    k = ssmc.compile(str(VARIANTS["mamba2"].path), target="triton", chunk_size=128, backward_matmul="float32")
    b, t, h, p, n = 1, 256, 2, 64, 128
    bf, f32 = jnp.bfloat16, jnp.float32
    args = [jax.ShapeDtypeStruct(s, d) for s, d in (((b, t, h, p), bf), ((b, t, h), bf), ((h,), f32),
                                                     ((b, t, 1, n), bf), ((b, t, 1, n), bf), ((h,), f32))]
    with tr.recorded_launches() as launched:  # traced only (jax.eval_shape): nothing runs
        jax.eval_shape(jax.grad(lambda *a: jnp.sum(k(*a)[0].astype(f32)), argnums=tuple(range(6))), *args)
    for kern, layout, sizes, cfg, ins, specs, mm in launched:
        used = tr.shared_bytes(kern, layout, sizes, cfg, ins, specs, mm, H200[0])
        print(json.dumps({"kernel": kern.__name__, "config": cfg, "heuristic": cfg == tr.heuristic(layout, sizes),
                          "shared": used, "limit": H200[1]}), flush=True)


if __name__ == "__main__":
    main()
