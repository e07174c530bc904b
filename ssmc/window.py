"""Conventions of the causal convolution's window state, shared by the front end, the kernel and StateCache.

`y = conv(x, w, over=t)` with w[..., k] keeps the last (k - 1) inputs x as a state: when the call ends, the
window holds the last k-1 values of x (the initial window first when the sequence is shorter), and the next
call starts from it, exactly like an SSM state. The window state is named `<x>_win` (x as written in the spec,
or the statement's target when x is an expression) and has x's dims with the scan dim replaced by the window
dim `k-1` (a dim no spec can spell, whose size is always size(k) - 1).
"""
from __future__ import annotations

from .errors import ShapeError

def window_dim(k: str) -> str:
    """The dim of a window state for a conv weight with window dim `k`."""
    return f"{k}-1"


def is_window_dim(d: str) -> bool:
    """Spec dims are identifiers, so a '-' marks a window dim (which may have size 0: a conv of width 1)."""
    return "-" in d


def window_state_name(base: str) -> str:
    return f"{base}_win"


def window_dims(program) -> dict[str, str]:
    """{window dim: weight's window dim} of a program's conv window states (from its `window` leaves)."""
    return {i.attr("dim"): i.attr("k") for i in program.instrs if i.op == "window"}


def window_state_names(program) -> tuple[str, ...]:
    return tuple(i.attr("state") for i in program.instrs if i.op == "window")


def derive_sizes(name: str, program, sizes: dict, where: dict | None = None) -> None:
    """Set the size of every window dim from its weight's window dim (in place), checking an initial window
    state's size against it. `where` names where each size came from, for the error message."""
    where = where or {}
    for wd, k in window_dims(program).items():
        if k not in sizes:
            continue
        if wd in sizes and sizes[wd] != sizes[k] - 1:
            raise ShapeError(f"{name}: a conv window state holds {k}-1 = {sizes[k] - 1} steps (dim '{k}' is "
                             f"{sizes[k]} in {where.get(k, 'the conv weight')}) but {where.get(wd, 'it')} has "
                             f"{sizes[wd]} along its window dim '{wd}'")
        sizes[wd] = max(sizes[k] - 1, 0)  # k < 1 is reported as a bad size of k
