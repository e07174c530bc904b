"""A quiet start (issue 10, item 10): the README's test command prints its summary line, and a normal CPU run
prints no libtpu start-up warnings (the test extra installs libtpu; jax's backend discovery would start it on
every machine when JAX_PLATFORMS is unset)."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOISE = re.compile(r"warn|E0000|W0000|INVALID_ARGUMENT|libtpu|error", re.IGNORECASE)


def _env():
    """The environment of a user's shell: no JAX_PLATFORMS (tests/conftest.py sets it for this process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args, timeout=600):
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_ssmc_run_prints_no_warnings(tmp_path):
    env_cache = {"SSMC_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "ssmc", "run", "examples/mamba2.ssm", "--dims", "b=1,t=64,h=2",
                        "--repeats", "1"], cwd=ROOT, env={**_env(), **env_cache}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    noisy = [line for line in r.stderr.splitlines() if NOISE.search(line)]
    assert not noisy, "stderr:\n" + r.stderr
    assert "mamba2" in r.stdout


def test_import_and_compute_is_quiet_and_on_cpu():
    r = _run([sys.executable, "-c", "import ssmc, jax, jax.numpy as jnp; "
              "ssmc.compile('examples/mamba2.ssm'); print(jax.default_backend(), float(jnp.ones(3).sum()))"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["cpu", "3.0"], r.stdout
    assert not [line for line in r.stderr.splitlines() if NOISE.search(line)], r.stderr


def test_explicit_platform_choice_is_left_alone():
    """With JAX_PLATFORMS set ssmc changes nothing (jax's 'tpu' factory stays registered)."""
    r = subprocess.run([sys.executable, "-c", "import ssmc; from jax._src import xla_bridge as xb; "
                        "print('tpu' in xb._backend_factories, ssmc._platform.skip_absent_tpu())"],
                       cwd=ROOT, env={**_env(), "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False"], r.stdout


def test_pytest_q_prints_the_summary():
    """`python -m pytest -q` (the README's command) ends with "N passed in ...s"; pyproject's addopts must not
    add a second -q, which hides it."""
    r = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
              "tests/test_semantics.py::test_examples_still_check"], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"^\d+ passed in [\d.]+s", r.stdout, re.MULTILINE), r.stdout


def test_tpu_stays_a_known_platform():
    """After ssmc quiets the 'tpu' backend, jax still knows the platform: Pallas (imported by jax-triton and by the
    tpu target) registers TPU lowering rules at import, which jax 0.11 refused for an unknown platform once the
    factory was removed. The backend itself does not start (no libtpu output), and jax runs on the CPU."""
    r = _run([sys.executable, "-c", "import ssmc, jax; from jax._src import xla_bridge as xb; "
              "print(ssmc._platform.skip_absent_tpu() or xb._backend_factories['tpu'].fail_quietly, "
              "xb.is_known_platform('tpu')); "
              "from jax._src import checkify; from jax.experimental import pallas; "
              "from jax.experimental.pallas import tpu as pltpu; print(jax.default_backend())"], timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "cpu"], r.stdout
    assert not [line for line in r.stderr.splitlines() if NOISE.search(line)], r.stderr
