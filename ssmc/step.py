"""Kernel.step: one decode step of a compiled spec, continuing from the states a previous call returned.

Serving runs a prefill over the prompt (the kernel call, chunk-parallel where the spec allows it) and then a few
tokens at a time with the states carried between calls. A step is the same spec run on a scan length of 1..8 from
given initial states; on the XLA target that is the sequential form (the spec compiled with chunk_size=1), which
for a handful of steps does less work than padding them to a whole chunk. Both forms compute the same recurrence
in fp32, so a prefill of t tokens followed by s steps equals one call on t+s tokens up to rounding.
"""
from __future__ import annotations

import jax.numpy as jnp

from .errors import ShapeError

MAX_STEP_TOKENS = 8  # multi-token / speculative decode; longer runs are a prefill (the kernel call)


def step_kernel(k):
    """The kernel that runs k's steps: its spec in the sequential form on k's target (compiled once, cached).
    k.variant compiles it (compile hands the Kernel its compiler), so this module imports neither ssmc/api.py nor
    ssmc/kernel.py: both import it, never the reverse."""
    seq = k.__dict__.get("_step_kernel")
    if seq is None:
        seq = k.variant(chunk_size=1)
        k.__dict__["_step_kernel"] = seq
    return seq


def state_dict(k, state) -> dict:
    """step's `state` argument -> {state name: array}: a dict, the states in k.states order (a tuple or list,
    e.g. the tail of a previous result), a single array when k has one state, or None for zero states."""
    return dict(k._states_arg(state, f"{k.name}.step", what="state") or {})


def step(k, state, args, kwargs, apply=None):
    """See Kernel.step. `apply(inputs, states)` runs the step kernel (default: its own apply; ssmc.shard passes
    the step kernel run on a mesh)."""
    given = k.named_inputs(args, kwargs, f"{k.name}.step")
    scan, declared = k.program.scan, dict(k.inputs)
    single = {}  # input -> given without the scan dim (one token)
    for name, x in given.items():
        dims = declared[name]
        if scan not in dims:
            continue
        ax, rank = dims.index(scan), jnp.ndim(x)
        if rank == len(dims) - 1:
            given[name] = jnp.expand_dims(jnp.asarray(x), ax)
            single[name] = True
        elif rank == len(dims):
            n = jnp.shape(x)[ax]
            if not 1 <= n <= MAX_STEP_TOKENS:
                raise ShapeError(f"{k.name}.step: input '{name}' has {n} steps along the scan dim '{scan}' (axis "
                                 f"{ax}); a step takes 1..{MAX_STEP_TOKENS} (run a prefill through the kernel call)")
            single[name] = False
    if len(set(single.values())) > 1:
        without = ", ".join(n for n, s in single.items() if s)
        raise ShapeError(f"{k.name}.step: inputs {without} come without the scan dim '{scan}' (one token) but "
                         f"{', '.join(n for n, s in single.items() if not s)} with it; give all of them one way")
    apply = apply or step_kernel(k).apply
    res = apply(given, state_dict(k, state) or None)  # any input name, no keyword to meet
    if not any(single.values()):
        return res
    n_out = len(k.outs)
    outs = tuple(jnp.squeeze(y, dims.index(scan)) for y, (_, dims) in zip(res[:n_out], k.outs))
    return outs + tuple(res[n_out:])
