"""Shared test setup: CPU-only jax, float32 default, cached compilation and a calling helper."""
from __future__ import annotations

import os

os.environ["JAX_PLATFORMS"] = "cpu"          # before jax is imported anywhere
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in its CPU interpreter (before triton is imported)
# the CPU default schedule is measured per shape bucket (ssmc/autoschedule.py); tests keep the class default (the
# chunked form) so they test what they name, and tests/test_cpu_schedule.py turns measuring on
os.environ.setdefault("SSMC_AUTOSCHEDULE", "0")

import functools

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", False)

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ssmc", deadline=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ssmc"))
except ImportError:  # pragma: no cover
    pass

from reference import VARIANTS, rel_l2  # noqa: E402


@functools.lru_cache(maxsize=None)
def _compile(name: str, chunk_size, target: str = "xla"):
    import ssmc

    return ssmc.compile(str(VARIANTS[name].path), target=target, chunk_size=chunk_size)


class SSMC:
    """Helpers handed to tests through the `sx` fixture."""

    @staticmethod
    def kernel(name: str, chunk_size=None, target: str = "xla"):
        """Compiled kernel for variant `name` (cached per name/chunk_size/target within the session)."""
        return _compile(name, chunk_size, target)

    @staticmethod
    def kwargs(variant, inputs: dict, initial_states: dict | None = None) -> dict:
        kw = dict(inputs)
        if initial_states is not None:
            if len(variant.state_names) == 1:
                kw["initial_state"] = initial_states[variant.state_names[0]]
            else:
                kw["initial_states"] = dict(initial_states)
        return kw

    @staticmethod
    def split(variant, result):
        """(outs..., states...) -> (outs, states), checking the count."""
        result = tuple(result)
        n_out, n_state = len(variant.out_names), len(variant.state_names)
        assert len(result) == n_out + n_state, (
            f"{variant.name}: expected {n_out} outs + {n_state} states, got {len(result)} results")
        return result[:n_out], result[n_out:]

    @staticmethod
    def compare(variant, outs, states, ref_outs, ref_states, tol, out_dtype=np.float32, what=""):
        """Check count, shape and dtype of every result (outs take `out_dtype`, states float32) and
        rel L2 error < tol against the float64 reference.  Failures name the result and the error."""
        assert len(outs) == len(ref_outs) and len(states) == len(ref_states)
        errs = {}
        for kind, names, got, want, dt in (("out", variant.out_names, outs, ref_outs, np.dtype(out_dtype)),
                                           ("state", variant.state_names, states, ref_states, np.dtype(np.float32))):
            for n, g, w in zip(names, got, want):
                assert tuple(g.shape) == tuple(w.shape), f"{variant.name}{what}: {kind} {n} shape {tuple(g.shape)} != {w.shape}"
                assert np.dtype(g.dtype) == dt, f"{variant.name}{what}: {kind} {n} dtype {g.dtype} != {dt}"
                errs[f"{kind} {n}"] = rel_l2(np.asarray(g).astype(np.float64), w)
        bad = {k: v for k, v in errs.items() if not v < tol}
        assert not bad, f"{variant.name}{what}: rel L2 error >= {tol:g}: " + ", ".join(f"{k}: {v:.3g}" for k, v in errs.items())
        return errs

    @classmethod
    def check(cls, rng, variant, dims: dict, with_init: bool = True, kernel=None, chunk_size=None, tol=1e-4,
              what: str = ""):
        """Fresh random inputs (and initial states) at `dims`, the kernel's outs and final states against the
        float64 reference; returns the errors."""
        inputs = variant.make_inputs(rng, dims)
        init = variant.make_initial_states(rng, dims) if with_init else None
        ref_outs, ref_states = variant.reference(inputs, init)
        outs, states = cls.run(variant, inputs, init, chunk_size=chunk_size, kernel=kernel)
        return cls.compare(variant, outs, states, ref_outs, ref_states, tol, what=what)

    @classmethod
    def run(cls, variant, inputs: dict, initial_states: dict | None = None, chunk_size=None, kernel=None):
        """Call the compiled kernel with keyword inputs; returns (outs, states) as jax arrays."""
        k = kernel if kernel is not None else cls.kernel(variant.name, chunk_size)
        return cls.split(variant, k(**cls.kwargs(variant, inputs, initial_states)))


@pytest.fixture(scope="session")
def sx():
    return SSMC


def _seed_of(nodeid: str) -> int:
    import zlib

    return zlib.crc32(nodeid.encode())


@pytest.fixture
def rng(request):
    return np.random.default_rng(_seed_of(request.node.nodeid))


# The fast set (`-m "not slow"`, for local runs; CI runs everything) keeps the first FAST_CASES cases of every
# parametrized test that are not marked slow already; the later cases of long parametrizations (every example x
# every size x every target) are marked slow here, so each test function and each target keeps fast cases.
FAST_CASES = 1


@pytest.hookimpl(tryfirst=True)  # before the mark plugin deselects by -m
def pytest_collection_modifyitems(config, items):
    kept: dict = {}
    for item in items:
        if getattr(item, "callspec", None) is None or item.get_closest_marker("slow"):
            continue
        key = (str(item.fspath), item.originalname)
        kept[key] = kept.get(key, 0) + 1
        if kept[key] > FAST_CASES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def launched(monkeypatch):
    """Names of the kernels every launch ran (both kernel targets' runtimes)."""
    from ssmc.targets import pallas_runtime, triton_runtime
    names = []
    for mod in (triton_runtime, pallas_runtime):
        def rec(kern, *a, _orig=mod.launch, **kw):
            fn = getattr(kern, "fn", kern)
            names.append(getattr(fn, "__name__", str(fn)))
            return _orig(kern, *a, **kw)
        monkeypatch.setattr(mod, "launch", rec)
    return names
