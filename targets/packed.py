"""Packed variable-length sequences (cu_seqlens), in jax.numpy: what every target's generated code calls.

A packed call holds num_seqs sequences end to end along the scan dim of a batch of one (fla's and mamba_ssm's
convention): sequence i is steps cu[i] .. cu[i+1]-1. Nothing flows across a boundary: each sequence starts from its
own initial state (its index along the batch dim of the states) and ends in its own final state.

Chunked forms run on the *chunk-aligned* layout: every sequence is moved to start on a chunk boundary and padded to
whole chunks, so a chunk holds steps of one sequence only. The in-chunk forms need nothing new (the padded steps
are masked exactly like the padding past the end of an ordinary call: log-decay 0, update 0), the state passing
starts afresh at each sequence's first chunk (from that sequence's initial state), and each sequence's final state
is the state leaving its last chunk. A reset is never a log-decay of -inf, whose differences are NaN. The aligned
layout has a static length, (ceil(T/Q) + num_seqs) chunks, whatever the lengths (each sequence adds at most one
partial chunk), so one compile serves every packing of the same T and num_seqs, also under jax.jit with `cu`
traced. Sequential forms use the same layout with Q = 1 (no padding, an unused tail of num_seqs steps).

A causal conv reads, before a sequence's first step, that sequence's initial window (zeros by default), and leaves
each sequence's last k-1 inputs as its final window (its initial window's tail first when it is shorter).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def packing(cu, T: int, Q: int):
    """The layout tables of a packed call (None when cu is None): `T` the packed length, `Q` the chunk length.

    Per aligned chunk c: seq (its sequence), first (it begins its sequence), used (it holds steps). Per aligned
    step p: valid, src (the packed step it reads), seq_a / pos_a (its sequence and position in it). Per packed step
    t: dst (its aligned step), seq_p / pos_p. Per sequence: lens, nch (chunks), last (its last chunk)."""
    if cu is None:
        return None
    cu = jnp.asarray(cu).astype(jnp.int32)
    n = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]
    nch = (lens + Q - 1) // Q
    cend = jnp.cumsum(nch)
    cstart = cend - nch
    NC = -(-T // Q) + n
    c = jnp.arange(NC, dtype=jnp.int32)
    seq = jnp.searchsorted(cend, c, side="right").astype(jnp.int32)  # the first sequence whose chunks end after c
    used = seq < n
    seq = jnp.minimum(seq, n - 1)
    k = c - cstart[seq]
    pos = k[:, None] * Q + jnp.arange(Q, dtype=jnp.int32)[None, :]
    valid = used[:, None] & (pos < lens[seq][:, None])
    t = jnp.arange(T, dtype=jnp.int32)
    seq_p = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), n - 1).astype(jnp.int32)
    pos_p = t - cu[seq_p]
    return {"Q": Q, "n": n, "NC": NC, "cu": cu, "lens": lens, "nch": nch, "cstart": cstart,
            "last": jnp.maximum(cend - 1, 0),
            "seq": seq, "first": used & (k == 0), "used": used,
            "valid": valid.reshape(-1), "src": jnp.where(valid, cu[seq][:, None] + pos, 0).reshape(-1),
            "seq_a": jnp.repeat(seq, Q), "pos_a": pos.reshape(-1),
            "dst": cstart[seq_p] * Q + pos_p, "seq_p": seq_p, "pos_p": pos_p}


def aligned_length(T: int, Q: int, pk) -> int:
    """Steps along the scan axis the chunked form walks: T padded to whole chunks, or the aligned layout's."""
    return -(-T // Q) * Q if pk is None else pk["NC"] * Q


def to_aligned(x, axis: int, pk):
    """A packed array -> the aligned layout along `axis` (padded steps read step 0: finite, and masked)."""
    return jnp.take(x, pk["src"], axis=axis)


def from_aligned(y, axis: int, pk):
    """A result on the aligned layout -> packed along `axis`."""
    return jnp.take(y, pk["dst"], axis=axis)


def valid_steps(T: int, Tp: int, pk):
    """1.0 where an aligned (or padded) step holds a step of the sequence, else 0.0."""
    if pk is None:
        return (jnp.arange(Tp) < T).astype(jnp.float32)
    return pk["valid"].astype(jnp.float32)


def one_row(x, bax: int):
    """The batch axis of a state cut to one entry: the shape of the running state of a packed walk."""
    return lax.slice_in_dim(x, 0, 1, axis=bax)


def seq_state(init, seq, bax: int):
    """Sequence `seq`'s initial state (traced index) with a batch axis of one."""
    return lax.dynamic_slice_in_dim(init, seq, 1, axis=bax)


def pass_states(step, init, xs, bax: int, pk):
    """The state entering each aligned chunk: `step(S, (a, s)) -> (a * S + s, S)` chained over the chunks (xs:
    per-chunk decays and states from zero, chunk axis first), restarting from the sequence's initial state at each
    sequence's first chunk."""
    def body(S, inp):
        a, s, first, seq = inp
        return step(jnp.where(first, seq_state(init, seq, bax), S), (a, s))
    _, enter = lax.scan(body, jnp.zeros_like(one_row(init, bax)), tuple(xs) + (pk["first"], pk["seq"]))
    return enter


def finals(exits, cax: int, init, bax: int, pk):
    """Each sequence's final state: the state leaving its last chunk (exits: per aligned chunk along `cax`, batch
    axis of one), or its initial state when it is empty. Result: init's shape (the sequences along bax)."""
    f = jnp.take(jnp.moveaxis(exits, cax, 0), pk["last"], axis=0)  # [n, state dims with a batch of one]
    f = jnp.moveaxis(jnp.squeeze(f, axis=bax + 1), 0, bax)
    has = (pk["lens"] > 0).reshape((-1,) + (1,) * (init.ndim - bax - 1))
    return jnp.where(has, f.astype(init.dtype), init)


def scan_steps(step, carry, xs, T: int, baxes, pk):
    """A sequential form's lax.scan over the packed steps: `step(carry, xs_t) -> (carry, ys_t)` with the states
    in `carry` (batch axes `baxes`, the sequences' initial states on entry), xs and ys with time first. Each
    sequence starts from its initial state, each ends in its final state; ys come back packed."""
    Q1 = pk["n"] + T
    xs = tuple(jnp.take(x, pk["src"], axis=0) for x in xs)

    def body(c, inp):
        (S, fin), (x, first, valid, seq, last) = c, inp
        S = tuple(jnp.where(first, seq_state(i, seq, b), s) for s, i, b in zip(S, carry, baxes))
        new, ys = step(S, x)
        new = tuple(jnp.where(valid, a, s) for a, s in zip(new, S))
        fin = tuple(lax.dynamic_update_slice_in_dim(f, jnp.where(last & valid, a, seq_state(f, seq, b)), seq, b)
                    for f, a, b in zip(fin, new, baxes))
        return (new, fin), ys
    last = pk["pos_a"] == pk["lens"][pk["seq_a"]] - 1
    S0 = tuple(jnp.zeros_like(one_row(s, b)) for s, b in zip(carry, baxes))
    (_, fin), ys = lax.scan(body, (S0, tuple(carry)), (xs, pk["first"], pk["valid"], pk["seq"], last), length=Q1)
    return fin, tuple(jnp.take(y, pk["dst"], axis=0) for y in ys)


def _per_step_window(window, axis: int, bax: int, seq, idx):
    """window[seq[p], idx[p]] for every step p, laid along `axis` (the window's own window axis), batch of one."""
    w = jnp.moveaxis(window, (bax, axis), (0, 1))  # [n, W, rest]
    W = w.shape[1]
    g = w.reshape((-1,) + w.shape[2:])[seq * W + jnp.clip(idx, 0, W - 1)]  # [P, rest]
    g = g[:, None]  # [P, 1, rest]
    return jnp.moveaxis(g, (0, 1), (axis, bax))


def causal_conv(x, axis: int, window, w, bax: int, seq, pos):
    """The causal depthwise conv of every sequence on its own: y[t] = sum_j w[j] * xs[t - (K-1) + j], where xs is
    the sequence's steps preceded by its initial window. `seq` / `pos`: each step's sequence and position in it
    (steps of x along `axis`, batch axis `bax` of one); window: [.., num_seqs at bax, .., K-1 at axis, ..]."""
    K, P = w.shape[-1], x.shape[axis]
    W = K - 1
    y = None
    for j in range(K):
        lag = W - j
        if lag:
            pads = [(0, 0)] * x.ndim
            pads[axis] = (lag, 0)
            shifted = lax.slice_in_dim(jnp.pad(x, pads), 0, P, axis=axis)
            inside = (pos >= lag).reshape([P if a == axis else 1 for a in range(x.ndim)])
            from_win = _per_step_window(window.astype(x.dtype), axis, bax, seq, W + pos - lag)
            shifted = jnp.where(inside, shifted, from_win)
        else:
            shifted = x
        term = shifted * w[..., j]
        y = term if y is None else y + term
    return y


def conv_window(x, axis: int, window, bax: int, pk, aligned: bool):
    """Each sequence's last K-1 inputs (its initial window's tail first when it is shorter): the windows the next
    call continues from, the sequences along bax. x is packed (or on the aligned layout) along `axis`."""
    W = window.shape[axis]
    if W == 0:
        return window
    lens, n = pk["lens"], pk["n"]
    start = pk["cstart"] * pk["Q"] if aligned else pk["cu"][:-1]
    r = jnp.arange(W, dtype=jnp.int32)
    at = lens[:, None] - W + r[None, :]  # [n, W]: each window slot's position in its sequence
    xs = jnp.moveaxis(x, (bax, axis), (0, 1))[0]  # [P, rest]
    new = xs[(start[:, None] + jnp.maximum(at, 0)).reshape(-1)].reshape((n, W) + xs.shape[1:])
    old = jnp.moveaxis(window, (bax, axis), (0, 1))  # [n, W, rest]
    old = jnp.take_along_axis(old, jnp.clip(lens[:, None] + r[None, :], 0, W - 1).reshape(
        (n, W) + (1,) * (old.ndim - 2)), axis=1)
    keep = (at >= 0).reshape((n, W) + (1,) * (old.ndim - 2))
    return jnp.moveaxis(jnp.where(keep, new.astype(window.dtype), old), (0, 1), (bax, axis))
