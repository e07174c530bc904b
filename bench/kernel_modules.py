"""Time generated Triton kernel modules side by side on a GPU: each FILE is a module as `ssmc compile --emit source`
(or `--backward --emit source`, one part per file) writes it; its entry is called on random inputs of one shape,
autotuned as in a call. For comparing two emissions of one kernel (two commits, or a hand edit) in one process.

    python3 bench/kernel_modules.py S1 dq_before.py dq_after.py [--segments auto 2 8] [--repeats 10]

Inputs: log-decays fp32 in [-0.3, -1e-3], dt bf16 in [1e-3, 0.1], the other inputs bf16 normal, states zero;
dots in bf16, outs bf16 (the fp32 ones stay fp32). Shapes: S1, S2, L64K (Mamba2 sizes of bench/backward.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _tree  # noqa: E402,F401  (ssmc from the working tree, installed or not)

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

SHAPES = {"S1": dict(b=4, t=2048, h=80, p=64, n=128, g=1), "S2": dict(b=4, t=8192, h=80, p=64, n=128, g=1),
          "L64K": dict(b=1, t=65536, h=80, p=64, n=128, g=1)}


def load(path: str):
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # a real file: @triton.jit reads its kernels' source from it
    return mod


def random_input(name: str, shape, key):
    """A derived program's input as the backward feeds it: log-decays fp32 in [-0.3, -1e-3], dt bf16 in
    [1e-3, 0.1], anything else bf16 normal (shared with bench/backward.py --parts)."""
    import jax
    import jax.numpy as jnp
    if name.startswith("log_a"):
        return -jax.random.uniform(key, shape, jnp.float32, 1e-3, 0.3)
    if name == "dt":
        return jax.random.uniform(key, shape, jnp.float32, 1e-3, 0.1).astype(jnp.bfloat16)
    return jax.random.normal(key, shape, jnp.float32).astype(jnp.bfloat16)


def inputs(info, sizes, key):
    """The entry's positional arguments: random_input for the inputs, zero initial states."""
    import jax
    import jax.numpy as jnp
    out = []
    for prm in info.params:
        key, sub = jax.random.split(key)
        shape = [sizes[d] for d in prm.dims]
        out.append(jnp.zeros(shape, jnp.float32) if prm.kind == "state" else random_input(prm.name, shape, sub))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=list(SHAPES))
    ap.add_argument("files", nargs="+")
    ap.add_argument("--segments", nargs="+", default=["auto"], help="segment counts ('auto': as a call picks)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import jax
    import jax.numpy as jnp

    import gpu
    for path in args.files:
        mod = load(path)
        info = mod.MODULE_INFO
        entry = getattr(mod, info.entry)
        sizes = dict(SHAPES[args.shape])
        if info.chunk:
            sizes["t#"] = -(-sizes["t"] // info.chunk)
        xs = inputs(info, sizes, jax.random.PRNGKey(0))
        for sg in args.segments:
            seg = None if sg == "auto" else int(sg)
            f = jax.jit(lambda *a, seg=seg: entry(*a, mm=jnp.bfloat16, out_dtype=jnp.bfloat16, segments=seg))
            rec = dict(shape=args.shape, file=path, segments=sg)
            try:
                rec["ms"] = round(gpu.time_jax(f, [tuple(xs)], repeats=args.repeats), 4)
            except Exception as e:  # noqa: BLE001  (report and go on)
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
