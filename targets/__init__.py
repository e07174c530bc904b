"""Code generators. Each target is an object with a `pipeline` (pass string) and one `emit(program, options)`
method returning Python source; `get_target` resolves names and aliases."""
from __future__ import annotations

import jax

from ssmc.errors import TargetError

ALIASES = {"xla": "xla", "jax": "xla", "gpu": "triton", "triton": "triton", "tpu": "tpu", "pallas_tpu": "tpu",
           "pallas": "tpu"}
NOT_YET = {"triton": "the Triton GPU target is not available yet (tracked in its own issue); use target='xla'",
           "tpu": "the Pallas TPU target is not available yet (tracked in its own issue); use target='xla'"}


def resolve(name: str) -> str:
    if name == "auto":
        backend = jax.default_backend()
        name = {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(backend, "xla")
        if ALIASES[name] in NOT_YET:
            name = "xla"
    if name not in ALIASES:
        raise TargetError(f"unknown target '{name}'; targets: xla, triton (alias gpu), tpu (alias pallas_tpu), auto")
    return ALIASES[name]


def get_target(name: str):
    canon = resolve(name)
    if canon in NOT_YET:
        raise TargetError(NOT_YET[canon])
    from .xla import XlaTarget
    return {"xla": XlaTarget}[canon]()
