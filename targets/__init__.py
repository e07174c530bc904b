"""Code generators. Each target is a `base.Target`: a `pipeline` (pass string) and one `emit(program, pipeline)`
method returning Python source whose entry follows one calling convention (targets/base.py); `get_target`
resolves names and aliases and checks the target object is complete. Kernel targets (`kernels = True`) emit a
launcher that also takes an `interpret` flag."""
from __future__ import annotations

import importlib

import jax

from ssmc.errors import TargetError

from .base import ENTRY_CONTRACT, Target, checked_target  # noqa: F401

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


def get_target(name: str) -> Target:
    canon = resolve(name)
    mod, cls = MODULES[canon]
    try:
        module = importlib.import_module(f"{__name__}.{mod}")
    except ImportError as e:
        raise TargetError(f"target '{name}' is not available: {e}") from None
    return instantiate(getattr(module, cls), canon)


def instantiate(cls, label: str) -> Target:
    """An instance of target class `cls`, checked complete (an abstract method left out fails here, as does a
    missing or mistyped attribute), so a broken target fails when it is looked up, never inside a call."""
    try:
        obj = cls()
    except TypeError as e:  # abc: "Can't instantiate abstract class ... without an implementation for ..."
        raise TargetError(f"target '{label}' ({getattr(cls, '__name__', cls)}) is incomplete: {e}") from None
    return checked_target(obj, label)
