"""Code generators. Each target is an object with a `pipeline` (pass string) and one `emit(program, pipeline)`
method returning Python source; `get_target` resolves names and aliases. Kernel targets (`kernels = True`) emit
a launcher that takes an `interpret` flag."""
from __future__ import annotations

import importlib

import jax

from ssmc.errors import TargetError

ALIASES = {"xla": "xla", "jax": "xla", "gpu": "triton", "triton": "triton", "tpu": "tpu", "pallas_tpu": "tpu",
           "pallas": "tpu"}
MODULES = {"xla": ("xla", "XlaTarget"), "triton": ("triton_gpu", "TritonTarget"), "tpu": ("pallas_tpu", "PallasTpuTarget")}


def resolve(name: str) -> str:
    if name == "auto":
        backend = jax.default_backend()
        name = {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(backend, "xla")
        if not available(ALIASES[name]):
            name = "xla"
    if name not in ALIASES:
        raise TargetError(f"unknown target '{name}'; targets: xla, triton (alias gpu), tpu (alias pallas_tpu), auto")
    return ALIASES[name]


def available(canon: str) -> bool:
    try:
        importlib.import_module(f"{__name__}.{MODULES[canon][0]}")
    except ImportError:
        return False
    return True


def get_target(name: str):
    canon = resolve(name)
    mod, cls = MODULES[canon]
    try:
        module = importlib.import_module(f"{__name__}.{mod}")
    except ImportError as e:
        raise TargetError(f"target '{name}' is not available: {e}") from None
    return getattr(module, cls)()
