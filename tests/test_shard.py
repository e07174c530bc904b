"""ssmc.shard on 4 host CPU devices, every target: sharded over batch, heads (with their groups), both, and the
sequence over 2 and 4 devices (chunk-parallel parts, and the hand-over of a sequential spec), against the float64
loops; the outputs' shardings; no gather in the batch/head-sharded HLO; a sharded step; gradients; the errors.

The cases run in tests/shard_worker.py, a process of its own (jax fixes the device count when it starts)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).resolve().parent / "shard_worker.py"
TOL = 1e-4  # fp32 against float64


@pytest.fixture(scope="module", params=["xla", "triton", "tpu"])
def runs(request):
    target = request.param
    seed = int(np.random.default_rng().integers(2**31))  # fresh inputs every run; the seed is in the messages
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(WORKER), target, str(seed)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"seed {seed}: " + proc.stderr[-4000:]
    rows = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return f"{target} (seed {seed})", rows


def _spec_wanted(dims, axes) -> str:
    """The PartitionSpec a result of `dims` must have: its mapped dims over their axes (states have no scan dim:
    whole along time, on every device of the sequence's axes)."""
    from jax.sharding import PartitionSpec
    parts = [axes.get(d) for d in dims]
    parts = [tuple(a) if isinstance(a, list) else a for a in parts]
    while parts and parts[-1] is None:
        parts.pop()
    return str(PartitionSpec(*parts))


def test_sharded_calls_match_the_float64_loops(runs):
    target, rows = runs
    cases = [r for r in rows if "case" in r]
    # tests/shard_worker.py: every CASES on xla, four KERNEL_CASES on triton, three on tpu
    want = {"xla": 20, "triton": 4, "tpu": 3}[target.split()[0]]
    assert len(cases) == want, f"{target}: {len(cases)} cases ran, expected {want}"
    modes = set()
    for r in cases:
        name, over, axes = r["case"]
        modes.add(r["mode"])
        assert r["note"].startswith("# shard: ") and {"local": "no communication", "parts": "run at once",
                                                     "hand-over": "one after another"}[r["mode"]] in r["note"], r
        bad = [e for e in r["errors"] if not e < TOL]
        assert not bad and r["errors"], f"{target} {name} {over} {axes}: errors {r['errors']}"
        h_axes = axes.get("h")
        if h_axes is not None and over.get("g", 2) % (2 if isinstance(h_axes, str) else 4) == 0:
            axes = {**axes, "g": h_axes}  # whole groups per device: a group dim splits with its heads
        for dims, spec in zip(r["dims"], r["specs"]):
            want = _spec_wanted(dims, axes)
            assert spec == want, f"{target} {name} {axes}: result of dims {dims} is sharded {spec}, wanted {want}"
    assert modes == {"local", "parts", "hand-over"}, modes


def test_batch_head_sharding_gathers_nothing(runs):
    target, rows = runs
    hlo, = [r["hlo"] for r in rows if "hlo" in r]
    assert hlo["ops"] > 10, hlo
    assert hlo["all-gather"] == 0 and hlo["all-to-all"] == 0 and hlo["collective-permute"] == 0, hlo


def test_sharded_prefill_then_step(runs):
    target, rows = runs
    step, = [r for r in rows if "step" in r]
    assert all(e < TOL for e in step["step"]), step
    assert step["specs"] == ["P('x', 'y')", "P('x', 'y')"], step["specs"]


def test_errors_name_the_dim(runs):
    target, rows = runs
    errors = [r for r in rows if "error" in r]
    assert len(errors) == 10
    for r in errors:
        assert r["message"] is not None, f"{target}: {r['error']} raised nothing"
        assert r["want"] in r["message"], f"{target}: {r['error']}: {r['message']}"
        assert r["message"].startswith("ShapeError: ssmc.shard("), r["message"]


def test_gradients_through_a_sharded_call(runs):
    """jax.grad through sk (batch/heads, and the sequence over 4 devices) against float64 finite differences, of
    every input and the initial state. The kernel targets take their derived backward kernels in both: over the
    sequence the forward's parts and the adjoint's (in reverse device order) chain across the devices."""
    target, rows = runs
    grads = [r for r in rows if "grad" in r]
    assert len(grads) == 2
    for r in grads:
        bad = {n: e for n, e in r["errors"].items() if not e < TOL}
        assert len(r["errors"]) == 7 and not bad, f"{target} {r['grad']}: {r['errors']}"
        assert r["derived"] == (not target.startswith("xla")), r


def test_specs_written_unlike_the_examples(runs):
    """Renamed dims, permuted layouts, groups declared first, a group-indexed state: sharded over batch and heads,
    and batch with the sequence, against the float64 loops."""
    target, rows = runs
    gen = [r for r in rows if "generated" in r]
    assert len(gen) == (12 if target.startswith("xla") else 2), gen
    for r in gen:
        assert r["results"][0] == r["results"][1] and r["errors"], r
        assert all(e < TOL for e in r["errors"]), f"{target} {r['generated']}: {r['errors']}"
    # gradients through the batch + sequence split (the kernel targets' derived backward across the devices)
    grads = [r for r in rows if "generated_grad" in r]
    assert len(grads) == (6 if target.startswith("xla") else 1), grads
    for r in grads:
        assert r["errors"] and all(e < TOL for e in r["errors"].values()), f"{target} {r['generated_grad']}: {r}"
        if not target.startswith("xla"):
            assert r["derived"], r
