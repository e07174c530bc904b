"""Moving arrays between the layout users declare and the IR layout kernels compute in.

The IR orders every value's dims canonically, and expand-groups may split a head dim h into (g, h/g). Arrays enter
as declared (x[b,t,h,p]) and leave as declared; these helpers reshape and transpose at the edges only.
"""
from __future__ import annotations

import jax.numpy as jnp


def split_dims(dims, splits: dict) -> list[str]:
    out: list[str] = []
    for d in dims:
        out.extend(splits.get(d, (d,)))
    return out


def to_ir(x, declared, ir_dims, splits: dict, sizes: dict):
    """Declared layout -> IR layout (split grouped dims, then transpose to canonical order)."""
    shape = []
    for d in declared:
        if d in splits:
            g, _ = splits[d]
            shape += [sizes[g], sizes[d] // sizes[g]]
        else:
            shape.append(sizes[d])
    x = x.reshape(shape)
    cur = split_dims(declared, splits)
    perm = [cur.index(d) for d in ir_dims]
    return x if perm == list(range(len(perm))) else jnp.transpose(x, perm)


def from_ir(v, v_dims, declared, splits: dict, sizes: dict, canon):
    """IR value -> declared layout (sizes include the split dims): broadcast dims the value doesn't vary along, merge splits, transpose."""
    want = split_dims(declared, splits)
    full = [d for d in canon if d in want]  # canonical order of the declared dims (split)
    v = jnp.asarray(v)
    idx = tuple(slice(None) if d in v_dims else None for d in full)
    v = v[idx] if any(i is None for i in idx) else v
    v = jnp.broadcast_to(v, tuple(sizes[d] for d in full))
    perm = [full.index(d) for d in want]
    if perm != list(range(len(perm))):
        v = jnp.transpose(v, perm)
    return v.reshape(tuple(sizes[d] for d in declared))
