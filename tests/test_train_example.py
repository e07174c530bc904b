"""examples/train.py: a short run on CPU learns (the recall loss falls well below chance), and a few steps on the
Triton target (interpreter) follow the XLA target's training trajectory."""
from __future__ import annotations

import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))

import train  # noqa: E402


@pytest.mark.slow  # 35-55 s: the fast set stays under 5 minutes; CI runs it
def test_short_training_run_learns():
    log = train.train(steps=120, target="xla", batch=32, seed=1, log_every=40, printer=lambda *_: None)
    chance = math.log(32 // 2)
    assert [r["step"] for r in log] == [1, 40, 80, 120]
    assert all(math.isfinite(r["loss"]) for r in log)
    assert log[-1]["loss"] < chance - 0.2, log      # chance: the answer is one of 16 values
    assert log[-1]["loss"] < log[0]["loss"] - 0.8, log
    assert log[-1]["tokens_per_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("target", ["triton"])  # every target's derived gradients: tests/test_adjoint.py
def test_kernel_target_training_follows_xla(target):
    kw = dict(steps=2, layers=1, batch=2, d_model=16, seed=2, log_every=1, printer=lambda *_: None)
    want = train.train(target="xla", chunk_size=8, **kw)
    got = train.train(target=target, interpret=True, chunk_size=8, **kw)
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) < 1e-3 * max(1.0, abs(w["loss"])), (got, want)
    assert want[-1]["loss"] != want[0]["loss"]  # the steps changed the parameters
