"""Runs ssmc.shard cases on 4 host CPU devices (a process of its own: the device count is fixed when jax starts,
and the rest of the suite runs on one device). Called by tests/test_shard.py:

    python tests/shard_worker.py TARGET SEED

Prints one JSON line per case: the case, the rel L2 error of every result against the float64 numpy loop of
tests/reference.py, the results' PartitionSpecs, and for the error cases the message.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SSMC_AUTOSCHEDULE", "0")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402

import ssmc  # noqa: E402
from reference import VARIANTS, central_differences, rel_l2  # noqa: E402

DIMS = {"b": 2, "t": 20, "h": 4, "g": 2, "p": 3, "n": 4, "dk": 3, "dv": 4, "d": 4, "k": 3}
CHUNK = 4
# (variant, dims overrides, axes): batch and heads (with their groups), the sequence over 2 and over 4 devices
# (parts of 10 and 5 steps: not whole chunks of 4, so a part ends inside a chunk), batch with sequence
MAPPINGS = [{"b": "x", "h": "y"}, {"t": "x"}, {"t": ("x", "y")}, {"b": "x", "t": "y"}]
CASES = [(name, {}, axes) for name in ("mamba2", "mamba2_conv", "gla") for axes in MAPPINGS]
CASES += [(name, {}, axes) for name in ("mamba1", "deltanet") for axes in MAPPINGS[1:3]]  # the sequence splits
CASES += [
    ("mamba2", {"g": 1}, {"h": "x"}),            # one group: every device reads it
    ("mamba2", {}, {"h": ("x", "y")}),           # 4 devices, 2 groups: one head each, the group it belongs to
    ("linear_attention", {}, {"b": "y", "t": "x"}),
    ("retnet", {"t": 24}, {"t": ("y", "x")}),    # axes in the other order
]
# the interpreters are slow: on triton and tpu, every mode and feature once (the xla target runs every case)
KERNEL_CASES = [
    ("mamba2", {}, {"b": "x", "h": "y"}), ("mamba2", {}, {"t": ("x", "y")}), ("mamba2_conv", {}, {"b": "x", "t": "y"}),
    ("gla", {}, {"t": "x"}), ("deltanet", {}, {"t": "x"}), ("mamba2", {}, {"h": ("x", "y")}),
]
ERRORS = [  # (variant, axes, sizes overrides, what the message must name)
    ("mamba2", {"n": "x"}, {}, "'n' cannot be split"),
    ("mamba2", {"q": "x"}, {}, "'q' is not a dim"),
    ("mamba2", {"b": "z"}, {}, "mesh axis 'z'"),
    ("mamba2", {"b": "x", "h": "x"}, {}, "mapped twice"),
    ("mamba2", {"g": "x"}, {}, "splits with its heads"),
    ("mamba2", {"t": ("x", "y")}, {"t": 10}, "not a multiple of the 4 devices"),
    ("mamba2_conv", {"h": ("x", "y")}, {}, "spans each group"),
    ("mamba2_conv", {"t": ("x", "y")}, {"t": 4, "k": 3}, "shorter than the conv window"),
    ("mamba2_gated", {"p": "x"}, {}, "'p' cannot be split"),
    ("gqa", {"h": ("x", "y")}, {}, "indexed by the group dim"),
]


def spec_of(x):
    s = getattr(x, "sharding", None)
    return str(s.spec) if isinstance(s, NamedSharding) else None


def kernel(name, target):
    return ssmc.compile(str(VARIANTS[name].path), target=target, interpret=target != "xla", chunk_size=CHUNK)


def kwargs(v, inputs, init):
    return {**inputs, "initial_states": init}


def main():
    target, seed = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(seed)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("x", "y"))
    # tpu's interpreter is the slowest: each mode once (local, parts with a conv window, hand-over)
    # triton: both ways of splitting heads and the sequence, a conv window, a sequential spec
    cases = CASES if target == "xla" else [KERNEL_CASES[i] for i in ((0, 1, 2, 4) if target == "triton" else (0, 2, 4))]
    for name, over, axes in cases:
        v = VARIANTS[name]
        dims = {**DIMS, **over}
        k = kernel(name, target)
        axes = {d: a for d, a in axes.items() if d in k.program.dims}
        inputs = v.make_inputs(rng, dims)
        init = v.make_initial_states(rng, dims)
        ref_outs, ref_states = v.reference(inputs, init)
        sk = ssmc.shard(k, mesh, axes)
        res = sk(**kwargs(v, inputs, init))
        errs = [rel_l2(np.asarray(r, np.float64), w) for r, w in zip(res, list(ref_outs) + list(ref_states))]
        print(json.dumps({"case": [name, over, axes], "mode": sk.mode, "errors": errs, "note": sk.ir.splitlines()[-1],
                          "specs": [spec_of(r) for r in res],
                          "dims": [list(d) for _, d in k.outs + k.states]}), flush=True)
    # specs written unlike the examples (tests/test_generated_specs.py: renamed dims, permuted layouts, groups
    # declared first, a group-indexed state): batch and heads, and batch with the sequence
    from test_generated_specs import FIXED, _err
    names = list(FIXED) if target == "xla" else ["layouts-grouped"]
    for name in names:
        case, sizes = FIXED[name]
        sizes = {**sizes, "t": 20, "h": 4}
        k = ssmc.compile(case.text, target=target, interpret=target != "xla", chunk_size=CHUNK)
        inputs = case.base.make_inputs(rng, sizes)
        init = case.initial_states(rng, sizes)
        want = case.expected(inputs, init)
        dn = case.dim_names
        for axes in ({dn["b"]: "x", dn["h"]: "y"}, {dn["b"]: "x", dn["t"]: "y"}):
            sk = ssmc.shard(k, mesh, axes)
            got = sk(**case.call_args(inputs, init))
            print(json.dumps({"generated": [name, axes], "errors": [_err(g, w) for g, (_, w) in zip(got, want)],
                              "results": [len(got), len(want)]}), flush=True)
        # gradients through the batch + sequence split against the one-device call's (each checked against
        # float64 differences elsewhere: tests/test_adjoint_generated.py): the kernel targets' derived backward,
        # chained across the devices, on this spec's own layouts
        args = case.call_args(inputs, init)
        ws = [jnp.asarray(rng.standard_normal(np.shape(g)), jnp.float32) for g in got]
        floats = {n: jnp.asarray(a) for n, a in args.items() if n != "initial_states"}

        def gen_loss(fl, f):
            return sum(jnp.sum(r.astype(jnp.float32) * w) for r, w in zip(f(**{**args, **fl}), ws))
        g_sh = jax.jit(jax.grad(lambda fl: gen_loss(fl, sk)))(floats)
        g_one = jax.jit(jax.grad(lambda fl: gen_loss(fl, k)))(floats)
        bw = k._derived_backward() if k._target.kernels else None
        print(json.dumps({"generated_grad": [name, axes], "errors": {n: rel_l2(np.asarray(g_sh[n], np.float64),
                                                                             np.asarray(g_one[n], np.float64))
                                                                      for n in floats},
                          "derived": bool(bw is not None and bw.takes({"across": "y"}))}), flush=True)
    # the batch/head-sharded call under jit with sharded inputs: no all-gather in the compiled HLO
    v = VARIANTS["mamba2"]
    k = kernel("mamba2", target)
    sk = ssmc.shard(k, mesh, {"b": "x", "h": "y"})
    inputs = v.make_inputs(rng, DIMS)
    placed = {n: jax.device_put(a, sk.sharding(n, DIMS)) for n, a in inputs.items()}
    hlo = jax.jit(lambda kw: sk(**kw)).lower(placed).compile().as_text()
    print(json.dumps({"hlo": {"all-gather": hlo.count("all-gather"), "all-to-all": hlo.count("all-to-all"),
                              "collective-permute": hlo.count("collective-permute"), "ops": hlo.count("\n")}}))
    # a sharded prefill then a sharded step of one token equals the loop over t + 1 tokens
    full = v.make_inputs(rng, {**DIMS, "t": 9})
    init = v.make_initial_states(rng, DIMS)
    head = {n: (a[:, :8] if "t" in dict(k.inputs)[n] else a) for n, a in full.items()}
    tok = {n: a[:, 8] for n, a in full.items() if "t" in dict(k.inputs)[n]}
    y0, s0 = sk(**head, initial_state=init["h"])
    y1, s1 = sk.step(s0, **tok, **{n: a for n, a in full.items() if n not in tok})
    ref_outs, ref_states = v.reference(full, init)
    print(json.dumps({"step": [rel_l2(np.asarray(y0, np.float64), ref_outs[0][:, :8]),
                               rel_l2(np.asarray(y1, np.float64), ref_outs[0][:, 8]),
                               rel_l2(np.asarray(s1, np.float64), ref_states[0])],
                      "specs": [spec_of(y1), spec_of(s1)]}), flush=True)
    # jax.grad through the sharded call (heads and batch; the sequence over 4 devices) against central finite
    # differences of the float64 loop, a few coordinates of every input
    inputs = v.make_inputs(rng, DIMS)
    init = v.make_initial_states(rng, DIMS)
    ref_outs, ref_states = v.reference(inputs, init)
    wy, wh = rng.standard_normal(ref_outs[0].shape), rng.standard_normal(ref_states[0].shape)

    def ref_loss(ins):
        o, st = v.reference(ins, init)
        return float(np.sum(o[0] * wy) + np.sum(st[0] * wh))
    def ref_loss_init(st):
        o, s = v.reference(inputs, st)
        return float(np.sum(o[0] * wy) + np.sum(s[0] * wh))
    for axes in ({"b": "x", "h": "y"}, {"t": ("x", "y")}):
        sk = ssmc.shard(k, mesh, axes)

        def loss(ins, h0):
            y, h = sk(**ins, initial_state=h0)
            return jnp.sum(y * wy.astype(np.float32)) + jnp.sum(h * wh.astype(np.float32))
        grads, g0 = jax.jit(jax.grad(loss, argnums=(0, 1)))({n: jnp.asarray(a) for n, a in inputs.items()},
                                                            jnp.asarray(init["h"]))
        errs = {}
        for n, a in inputs.items():
            a64 = {m: b.astype(np.float64) for m, b in inputs.items()}
            idx = rng.choice(a.size, size=min(3, a.size), replace=False)
            fd = central_differences(lambda: ref_loss(a64), a64, n, idx)
            errs[n] = rel_l2(np.asarray(grads[n], np.float64).ravel()[idx], fd)
        st = {"h": np.asarray(init["h"], np.float64)}
        idx = rng.choice(st["h"].size, size=3, replace=False)
        errs["initial h"] = rel_l2(np.asarray(g0, np.float64).ravel()[idx],
                                   central_differences(lambda: ref_loss_init(st), st, "h", idx))
        # the derived backward kernels, or (xla, or what they do not take) the XLA code's derivatives
        bw = k._derived_backward() if k._target.kernels else None
        opts = {"across": ("x", "y")} if "t" in axes else {}
        print(json.dumps({"grad": axes, "errors": errs, "derived": bool(bw is not None and bw.takes(opts))}),
              flush=True)
    for name, axes, over, want in ERRORS:
        if name == "gqa":  # a state indexed by the group dim (tests/specgen.py)
            case, sizes = FIXED["gqa-state"]
            k = ssmc.compile(case.text, target=target, interpret=target != "xla", chunk_size=CHUNK)
            make = lambda: case.call_args(case.base.make_inputs(rng, {**sizes, "t": 20}))  # noqa: E731
        else:
            v = VARIANTS[name]
            k = kernel(name, target)
            make = lambda: v.make_inputs(rng, {**DIMS, **over})  # noqa: E731
        try:
            sk = ssmc.shard(k, mesh, axes)
            sk(**make())
            msg = None
        except ssmc.SSMCError as e:
            msg = f"{type(e).__name__}: {e}"
        print(json.dumps({"error": [name, axes, over], "want": want, "message": msg}), flush=True)


if __name__ == "__main__":
    main()
