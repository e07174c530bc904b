"""The default schedule on the CPU backend is never slower than the sequential form (issue 12, item 6).

The XLA target on CPU measures the chunked and the sequential form once per shape bucket and runs the faster
(ssmc/autoschedule.py). Checked here: at GLA's issue size the default runs within 1.3x of the faster form measured
side by side in this process (the chunked default was 5-8x slower than sequential before); the choice is persisted
(a second process does not measure again); an explicit chunk_size is never measured; results still match the
float64 references; `k.schedule` and `ssmc run` say what was chosen and why.
conftest.py turns measuring off for the other tests; here it is on (SSMC_AUTOSCHEDULE=1) and every test compiles
its own spec text (a leading comment), so no kernel compiled without measuring is reused from memory.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmc
from reference import VARIANTS

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def auto(monkeypatch, tmp_path):
    monkeypatch.setenv("SSMC_AUTOSCHEDULE", "1")
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def spec_text(name: str, tag: str) -> str:
    return f"# {tag}\n" + VARIANTS[name].path.read_text(encoding="utf-8")


def inputs_for(k, sizes, seed=0):
    from ssmc.sampling import random_inputs
    return {n: jnp.asarray(v) for n, v in random_inputs(k, sizes, seed=seed, probe=False).items()}


def best_of(fns: dict, args) -> dict:
    """bench/cpu_schedule.py's timing: best wall time in ms of each function, run interleaved."""
    spec = importlib.util.spec_from_file_location("bench_cpu_schedule", ROOT / "bench" / "cpu_schedule.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.best_of(fns, args, runs=7)


# GLA at the size (key-wise: chunked was 4.6x slower than sequential there) and a Mamba2 shape
CASES = [("gla", {"b": 1, "t": 2048, "h": 4, "dk": 16, "dv": 16}, 16),
         ("mamba2", {"b": 2, "t": 1024, "h": 8, "p": 32, "n": 32, "g": 1}, 64)]


@pytest.mark.slow
@pytest.mark.parametrize("name,sizes,Q", CASES, ids=[c[0] for c in CASES])
def test_default_is_not_slower_than_either_form(auto, name, sizes, Q):
    text = spec_text(name, "timing")
    default = ssmc.compile(text)
    chunked = ssmc.compile(text, chunk_size=Q)
    seq = ssmc.compile(text, chunk_size=1)
    xs = inputs_for(default, sizes)
    fns = {n: jax.jit(lambda a, k=k: k(**a)) for n, k in (("default", default), ("chunked", chunked),
                                                             ("sequential", seq))}
    # The other pytest worker shares the two cores, so one interleaved measurement can land a burst of its load
    # on one function (CI once timed the default, which runs the chunked form, at 1.35x the chunked form). A slow
    # choice is slow in every measurement; noise is not: up to three measurements, the default must pass one.
    tries = []
    for _ in range(3):
        ms = best_of(fns, xs)
        tries.append(ms)
        if ms["default"] <= 1.3 * min(ms["chunked"], ms["sequential"]):
            break
    else:
        raise AssertionError(f"the default was > 1.3x the faster form in 3 measurements: {tries}; "
                             f"{getattr(default, 'schedule', '(no schedule)')}")


def test_numerics_match_reference_in_the_chosen_form(sx, rng, auto):
    from ssmc import autoschedule
    for name in ("gla", "mamba2"):
        k = ssmc.compile(spec_text(name, "numerics"))
        assert k._auto is not None, name
        sx.check(rng, VARIANTS[name], {"t": 37}, True, kernel=k, tol=1e-4, what=" (auto schedule)")
        assert autoschedule.chosen_form(k) in ("chunked", "sequential")
        assert "measured at" in k.schedule and "t=64:" in k.schedule, k.schedule
        assert "# autoschedule:" in k.ir


def test_measured_while_traced_by_jit_and_grad(sx, rng, auto):
    """Inside jax.jit / jax.grad the inputs are tracers: the timing runs eagerly on random inputs of the same
    shapes; the gradient equals the chunked form's."""
    from ssmc import autoschedule
    text = spec_text("gla", "traced")
    k, chunked = ssmc.compile(text), ssmc.compile(text, chunk_size=16)
    xs = VARIANTS["gla"].make_inputs(rng, {"t": 40})
    before = autoschedule.MEASUREMENTS

    def loss(kern, q):
        return kern(q, xs["k"], xs["v"], xs["g_raw"])[0].sum()

    g = jax.jit(jax.grad(lambda q: loss(k, q)))(xs["q"])
    assert autoschedule.MEASUREMENTS == before + 1
    want = jax.grad(lambda q: loss(chunked, q))(xs["q"])
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_explicit_chunk_size_is_never_measured(auto, rng):
    from ssmc import autoschedule
    before = autoschedule.MEASUREMENTS
    k = ssmc.compile(spec_text("gla", "explicit"), chunk_size=16)
    assert k._auto is None and "fixed at compile time" in k.schedule
    k(**VARIANTS["gla"].make_inputs(rng, {"t": 20}))
    assert autoschedule.MEASUREMENTS == before


CHILD = r"""
import json, sys
import jax.numpy as jnp
import ssmc
from ssmc import autoschedule
from ssmc.sampling import random_inputs
k = ssmc.compile(sys.argv[1])
for t in json.loads(sys.argv[2]):
    k(**{n: jnp.asarray(v) for n, v in random_inputs(k, {"b": 1, "t": t, "h": 2, "dk": 8, "dv": 8},
                                                     probe=False).items()})
print(json.dumps({"measured": autoschedule.MEASUREMENTS, "schedule": k.schedule,
                  "form": autoschedule.chosen_form(k)}))
"""


@pytest.mark.slow
def test_choice_is_persisted_across_processes(auto):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    spec = str(VARIANTS["gla"].path)

    def child(lengths):
        proc = subprocess.run([sys.executable, "-c", CHILD, spec, json.dumps(lengths)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = child([100, 120])    # one bucket (t -> 128): measured once
    assert first["measured"] == 1, first
    second = child([110])        # a new process, same bucket: taken from the disk cache
    assert second["measured"] == 0 and "(disk cache)" in second["schedule"], second
    assert second["form"] == first["form"]
    third = child([300])         # a new bucket: measured
    assert third["measured"] == 1, third


@pytest.mark.slow
def test_cli_run_shows_the_default(auto):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "ssmc", "run", "examples/gla.ssm", "--dims",
                           "b=1,t=64,h=2,dk=8,dv=8", "--repeats", "2"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "schedule  auto:" in out, out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.split() and ln.split()[0] in
            ("default", "chunked", "sequential")}
    assert set(rows) == {"default", "chunked", "sequential"}, out
    assert "auto: chunked" in rows["default"] or "auto: sequential" in rows["default"], out
    assert "chosen    b=1,dk=8,dv=8,h=2,t=64:" in out and "measured at b=1 dk=8 dv=8 h=2 t=64" in out, out
    assert "OK" in out, out
