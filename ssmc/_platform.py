"""Keep jax from starting libtpu on machines without a TPU.

With libtpu installed (the test extra: the Pallas TPU interpreter and ahead-of-time TPU compiles need it), jax's
backend discovery tries its 'tpu' backend whenever JAX_PLATFORMS is unset, on every machine: libtpu then prints
five lines of warnings (one an `E0000 ... INVALID_ARGUMENT`) and the 'tpu' backend fails quietly. jax itself
treats a machine as a TPU VM only when a TPU chip is on the PCI bus (jax._src.cloud_tpu_init); with no chip and
no explicit platform choice the 'tpu' backend can only fail, so ssmc swaps its factory for one that fails at
once and quietly (jax logs it at info level), before jax initialises its backends. The registration stays: 'tpu'
remains a platform jax knows, which importing Pallas needs on jax 0.11 (it registers TPU lowering rules; with the
factory removed that import failed with "unknown platform tpu"). Nothing changes when JAX_PLATFORMS / jax_platforms is set, JAX_FORCE_TPU_INIT is set, a TPU chip is
present, or jax's backends already exist. The CPU and GPU (cuda plugin) backends are untouched, and the Pallas
TPU interpreter and `jax.export(..., platforms=["tpu"])` do not need the backend."""
from __future__ import annotations

import dataclasses
import os


def _no_tpu_chip():
    raise RuntimeError("no TPU chip on this machine (ssmc skipped libtpu's start)")


def skip_absent_tpu() -> bool:
    """Make jax's 'tpu' backend factory fail quietly when no TPU can be there; True when it did."""
    if os.environ.get("JAX_PLATFORMS") or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    try:  # private jax API: any change there leaves jax's default behaviour
        import jax
        from jax._src import hardware_utils, xla_bridge
        if jax.config.jax_platforms or xla_bridge._backends or "tpu" not in xla_bridge._backend_factories:
            return False
        if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
            return False
        with xla_bridge._backend_lock:
            reg = xla_bridge._backend_factories["tpu"]
            xla_bridge._backend_factories["tpu"] = dataclasses.replace(reg, factory=_no_tpu_chip, fail_quietly=True)
        return True
    except Exception:  # pragma: no cover
        return False
