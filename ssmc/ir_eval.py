"""Evaluate the state-free instructions of a step IR with jax.numpy, in the IR's layout.

The derived backward (ssmc/backward.py) runs the recurrences in kernels and the state-free parts around them
(the prologue that makes decays and update factors from the inputs, the epilogue that makes outs from readouts)
here, where jax differentiates them: they are elementwise maps, contractions and norms that XLA fuses. Values are
arrays whose axes are the instruction's dims in order; `Env` holds them by SSA name. Elementwise ops are
ssmc/ops.py's functions; the others have a method each below; ops that are not state-free (chunk stages, states)
are refused.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .errors import SSMCError
from .ir import Instr, Program
from .ops import ELEMENTWISE



class NotEvaluable(SSMCError):
    pass


def align(x, src, to):
    """x with axes `src` broadcastable against axes `to` (src ⊆ to): transposed to to's order, size-1 axes added."""
    x = jnp.asarray(x)
    if not src:
        return x
    order = [d for d in to if d in src]
    x = jnp.transpose(x, [list(src).index(d) for d in order])
    return x.reshape([x.shape[order.index(d)] if d in src else 1 for d in to])


def to_dims(x, src, to):
    """x with axes `src` as an array with axes exactly `to`: dims of src not in `to` summed, missing ones must be
    absent from src (a broadcast is made explicit by the caller)."""
    extra = tuple(k for k, d in enumerate(src) if d not in to)
    if extra:
        x = jnp.sum(x, axis=extra)
        src = tuple(d for d in src if d in to)
    missing = [d for d in to if d not in src]
    if missing:
        raise NotEvaluable(f"internal: cannot make dims {list(to)} from {list(src)}")
    return jnp.transpose(x, [list(src).index(d) for d in to]) if tuple(src) != tuple(to) else x


def contract(args, dims_of, out, precision=lax.Precision.HIGHEST):
    """Multiply the operands (dims by name) and sum the dims absent from `out` (one einsum)."""
    names = sorted(set(d for a in dims_of for d in a) | set(out))
    letter = {d: chr(ord("a") + k) if k < 26 else chr(ord("A") + k - 26) for k, d in enumerate(names)}
    eq = ",".join("".join(letter[d] for d in ds) for ds in dims_of) + "->" + "".join(letter[d] for d in out)
    return jnp.einsum(eq, *args, precision=precision)


class Env:
    """Values of a program's instructions by name (jnp arrays with axes = the instruction's dims)."""

    def __init__(self, p: Program, sizes: dict, packed: tuple | None = None):
        """packed: (offsets, the packed dim) of a packed call: a causal conv then restarts at every sequence, from
        that sequence's window (targets/packed.py, as the xla target's packed code)."""
        self.p, self.sizes = p, sizes
        self.by = p.by_name()
        self.v: dict[str, jax.Array] = {}
        self.pk = self.pdim = None
        if packed is not None:
            from ssmc.targets.packed import packing
            cu, self.pdim = packed
            self.pk = packing(cu, sizes[p.scan], 1)

    def dims(self, name):
        return self.by[name].dims

    def __getitem__(self, name):
        return self.v[name]

    def __contains__(self, name):
        return name in self.v

    def set(self, name, value):
        self.v[name] = value

    def run(self, i: Instr):
        """Evaluate one state-free instruction from its operands' values."""
        self.by.setdefault(i.name, i)
        fn = getattr(self, "op_" + i.op.replace(".", "_"), None)
        if i.op in ELEMENTWISE or i.op == "clamp":
            args = [align(self.v[a], self.dims(a), i.dims) for a in i.args]
            f = ELEMENTWISE[i.op].fn if i.op in ELEMENTWISE else jnp.clip
            self.v[i.name] = f(*args)  # every dim of the result is some operand's: full shape
        elif fn is not None:
            self.v[i.name] = fn(i)
        else:
            raise NotEvaluable(f"op '{i.op}' has no jnp evaluation here (at {i.span})")

    def op_const(self, i):
        return jnp.asarray(i.attr("value"), jnp.float32)

    def op_contract(self, i):
        return contract([self.v[a] for a in i.args], [self.dims(a) for a in i.args], i.dims)

    def op_reduce(self, i):
        src = self.dims(i.args[0])
        axes = tuple(src.index(d) for d in i.attr("over"))
        f = jnp.sum if i.attr("kind") == "sum" else jnp.mean
        return align(f(self.v[i.args[0]], axis=axes), tuple(d for d in src if d not in i.attr("over")), i.dims)

    def op_rmsnorm(self, i):
        x, src = self.v[i.args[0]], self.dims(i.args[0])
        over, group = list(i.attr("over")), i.attr("group")
        x = align(x, src, i.dims)
        if group:  # normalise over (heads of one group) x over: split the grouped dim h into (g, h/g)
            h = next(hh for g, hh in self.p.groups if g == group)
            ax = i.dims.index(h)
            G = self.sizes[group]
            shape = x.shape
            xs = x.reshape(shape[:ax] + (G, shape[ax] // G) + shape[ax + 1:])
            axes = tuple([ax + 1] + [k + (1 if k > ax else 0) for k in (i.dims.index(d) for d in over)])
            ms = jnp.mean(jnp.square(xs), axis=axes, keepdims=True)
            return (xs * lax.rsqrt(ms + i.attr("eps"))).reshape(shape)
        axes = tuple(i.dims.index(d) for d in over)
        return x * lax.rsqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True) + i.attr("eps"))

    def op_expand(self, i):
        """A group-indexed value read by each head: g -> h (head j reads group j // (h/g))."""
        g, h = i.attr("group"), i.attr("to")
        src = self.dims(i.args[0])
        x = jnp.repeat(self.v[i.args[0]], self.sizes[h] // self.sizes[g], axis=src.index(g))
        return to_dims(x, tuple(h if d == g else d for d in src), i.dims)

    def _window(self, win, dims):
        """A conv window (dims with its window dim) as an array over `dims` (the window dim read as the scan)."""
        wd = self.dims(win)
        as_scan = tuple(self.p.scan if d == self.by[win].attr("dim") else d for d in wd)
        return align(self.v[win], as_scan, dims)

    def op_conv(self, i):
        """Causal depthwise conv over the scan: y[t] = sum_j w[j] * (window, x)[t + j]."""
        x, w, win = i.args
        k, ax = i.attr("k"), i.dims.index(i.attr("over"))
        xv = align(self.v[x], self.dims(x), i.dims)
        wv = align(self.v[w], self.dims(w), i.dims + (k,))
        if self.pk is not None:  # every sequence from its own window
            from ssmc.targets.packed import causal_conv
            xv = jnp.broadcast_to(xv, [self.sizes[d] for d in i.dims])
            return causal_conv(xv, ax, self._window(win, i.dims), wv, i.dims.index(self.pdim), self.pk["seq_p"],
                               self.pk["pos_p"])
        xp = jnp.concatenate([self._window(win, i.dims).astype(xv.dtype), xv], axis=ax)
        T = xv.shape[ax]
        y = 0.0
        for j in range(self.sizes[k]):
            y = y + lax.slice_in_dim(xp, j, j + T, axis=ax) * lax.index_in_dim(wv, j, axis=-1, keepdims=False)
        return y

    def op_conv_window(self, i):
        """The window after the call: the last K-1 steps of (window, x)."""
        x, win = i.args
        tl = tuple(self.p.scan if d == self.by[win].attr("dim") else d for d in self.dims(win))
        ax = tl.index(self.p.scan)
        xv = align(self.v[x], self.dims(x), tl)
        wv = self._window(win, tl)
        if self.pk is not None:  # each sequence's last K-1 inputs
            from ssmc.targets.packed import conv_window
            xv = jnp.broadcast_to(xv, [self.sizes[d] for d in tl])
            return conv_window(xv, ax, wv, tl.index(self.pdim), self.pk, aligned=False)
        W, T = wv.shape[ax], xv.shape[ax]
        return lax.slice_in_dim(jnp.concatenate([wv.astype(xv.dtype), xv], axis=ax), T, T + W, axis=ax)
