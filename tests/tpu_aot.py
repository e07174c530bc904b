"""Compile the tpu target's kernels with the real Mosaic compiler, without a TPU: libtpu (`pip install
libtpu==0.0.42.*`, the version jax[tpu] pins) describes a TPU topology, and `jax.jit(...).lower(...).compile()`
against one of its devices runs XLA:TPU and Mosaic ahead of time on this host, layouts and all - stricter than
the `jax.export` lowering check, which stops at Mosaic's MLIR.

    python tests/tpu_aot.py [--topology v5e:2x2] [--dtype float32,bfloat16] [--chunk-size N] [--dims h=80,...]
        [--backward mamba2,gla,...] [--packed mamba2,...] [names]

prints one JSON line per (example, dtype, forward, backward or packed: a cu_seqlens call of 3 sequences): {"name", "dtype", "kind", "ok", "error"}. tests/test_pallas.py runs it when
libtpu is installed."""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--topology", default="v5e:2x2")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--t", type=int, default=300)
    ap.add_argument("--dims", default="")
    ap.add_argument("--backward", default="", help="comma-separated examples whose gradient is compiled too")
    ap.add_argument("--packed", default="", help="comma-separated examples whose packed call is compiled too")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P

    import ssmc
    from reference import VARIANTS

    topo = topologies.get_topology_desc(a.topology, "tpu")
    rep = NamedSharding(jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",)), P())
    extra = {k: int(v) for k, v in (kv.split("=") for kv in a.dims.split(",") if kv)}
    for name in a.names or list(VARIANTS):
        v = VARIANTS[name]
        dims = v.dims(b=2, t=a.t, **{k: n for k, n in extra.items() if k in v.small_dims})
        rng = np.random.default_rng(0)
        inputs, states = v.make_inputs(rng, dims), v.make_initial_states(rng, dims)
        k = ssmc.compile(str(v.path), target="tpu", chunk_size=a.chunk_size, cache=False)
        def forward(i, s):
            return k(**i, initial_states=s)

        def backward(i, s):  # gradients of every input and initial state (the kernels' values, XLA's derivatives)
            def loss(i, s):
                return sum(jnp.sum(r.astype(jnp.float32)) for r in k(**i, initial_states=s))
            return jax.grad(loss, argnums=(0, 1))(i, s)
        def packed(i, s, cu):  # 3 sequences packed along the scan dim of a batch of one
            return k(**i, initial_states=s, cu_seqlens=cu)

        def one_row(n, x):  # an input with the batch dim: a batch of one
            return (1,) + x.shape[1:] if "b" in dict(k.inputs)[n][:1] else x.shape

        for dt in a.dtype.split(","):
            kinds = [("forward", forward)] + ([("backward", backward)] if name in a.backward.split(",") else [])
            kinds += [("packed", packed)] if name in a.packed.split(",") else []
            for kind, f in kinds:
                res = {"name": name, "dtype": dt, "kind": kind, "ok": True, "error": ""}
                try:
                    shape = one_row if kind == "packed" else (lambda n, x: x.shape)
                    ins = {n: jax.ShapeDtypeStruct(shape(n, x), jnp.dtype(dt), sharding=rep) for n, x in inputs.items()}
                    sts = {n: jax.ShapeDtypeStruct((3,) + x.shape[1:] if kind == "packed" else x.shape, jnp.float32,
                                                   sharding=rep) for n, x in states.items()}
                    cu_arg = (jax.ShapeDtypeStruct((4,), jnp.int32, sharding=rep),) if kind == "packed" else ()
                    jax.jit(f).lower(ins, sts, *cu_arg).compile()
                except Exception as e:  # report, go on with the next
                    res.update(ok=False, error=f"{type(e).__name__}: {str(e)[:2000]}")
                print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
