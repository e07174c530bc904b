"""Small array helpers the generated XLA code calls (kept here so the generated code stays short)."""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from . import packed
from .packed import aligned_length, finals, packing, scan_steps, valid_steps  # noqa: F401  (generated code)


# ---- the entry's edges: arrays as declared <-> the IR's layout ----------------------------------------------------
# Dims are comma-joined names; expand-groups splits a grouped dim h into (g, h/g): `split` maps h -> g.

def elementwise_dtype(mm):
    """The dtype elementwise math and states compute in for matmul operand dtype mm: float64 with float64 inputs,
    else float32 (bf16/fp16 activations only enter the matmuls at their precision)."""
    return jnp.float64 if jnp.dtype(mm) == jnp.float64 else jnp.float32


def _split(dims: str, split: dict) -> list[str]:
    out = []
    for d in dims.split(",") if dims else []:
        out += [split[d], f"{d}/g"] if d in split else [d]
    return out


def to_ir(x, declared: str, ir: str, dtype, split: dict | None = None, sizes: dict | None = None):
    """An array as declared -> dtype, each split dim h reshaped into (g, h/g) (g's size from `sizes`), axes in the
    IR's order `ir`. XLA fuses the cast and the transpose into the first pass that reads the array."""
    split = split or {}
    x = jnp.asarray(x).astype(dtype)
    if split:
        shape = []
        for d, n in zip(declared.split(","), x.shape):
            shape += [sizes[split[d]], n // sizes[split[d]]] if d in split else [n]
        x = x.reshape(shape)
    cur, want = _split(declared, split), ir.split(",") if ir else []
    perm = [cur.index(d) for d in want]
    return x if perm == list(range(len(perm))) else jnp.transpose(x, perm)


def from_ir(v, dims: str, declared: str, dtype, split: dict | None = None, full: str | None = None,
            sizes: dict | None = None):
    """A result with IR dims `dims` -> its declared layout, in dtype: broadcast along the dims of `full` (the
    declared dims split, in the IR's order; sizes from `sizes`) it is constant along, axes in declared order, split
    dims merged."""
    split = split or {}
    have = dims.split(",") if dims else []
    full_ = have if full is None else (full.split(",") if full else [])
    v = jnp.asarray(v).astype(dtype)
    if have != full_:
        def size(d):  # a dim v has keeps its size; h/g (when h is split) is size(h) // size(g)
            if d in have:
                return v.shape[have.index(d)]
            h = d[:-2] if d.endswith("/g") and d[:-2] in split else None
            return sizes[h] // sizes[split[h]] if h else sizes[d]
        idx = tuple(slice(None) if d in have else None for d in full_)
        v = jnp.broadcast_to(v[idx], tuple(size(d) for d in full_))
    want = _split(declared, split)
    perm = [full_.index(d) for d in want]
    if perm != list(range(len(perm))):
        v = jnp.transpose(v, perm)
    if split:
        shape, k = [], 0
        for d in declared.split(","):
            shape.append(v.shape[k] * v.shape[k + 1] if d in split else v.shape[k])
            k += 2 if d in split else 1
        v = v.reshape(shape)
    return v


def pad_time(x, axis: int, Tp: int, pk=None):
    """Pad the scan axis to Tp by repeating the last step (finite values; the padded steps are masked); packed
    sequences (`pk`, targets/packed.py) are moved to the chunk-aligned layout instead."""
    if pk is not None:
        return packed.to_aligned(x, axis, pk)
    T = x.shape[axis]
    if T == Tp:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, Tp - T)
    return jnp.pad(x, pads, mode="edge")


def chunk(x, axis: int, Q: int):
    """[..., Tp, ...] -> [..., Tp // Q, Q, ...]."""
    return x.reshape(x.shape[:axis] + (x.shape[axis] // Q, Q) + x.shape[axis + 1:])


def unchunk(x, axis: int):
    """[..., nc, Q, ...] -> [..., nc * Q, ...] (axis is the chunk-index axis)."""
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def last(x, axis: int):
    """The last position along `axis`, kept as a length-1 axis."""
    n = x.shape[axis]
    return lax.slice_in_dim(x, n - 1, n, axis=axis)


def causal(Q: int, strict: bool, trailing: int):
    """[Q, Q, 1...] mask of target t >= source s (t > s when strict)."""
    t = jnp.arange(Q)[:, None]
    s = jnp.arange(Q)[None, :]
    m = (t > s) if strict else (t >= s)
    return m.reshape((Q, Q) + (1,) * trailing)


def cumsign(sgn, axis: int):
    """Sign of the running product of the decays along `axis` from the parity of the count of negative ones. Not a
    cumulative product of sign(a): sign(0) = 0 would zero every later step, while a zero decay is a reset carried by
    its log-decay (floored), after which the fresh updates count in full."""
    neg = jnp.cumsum(jnp.where(sgn < 0, 1.0, 0.0), axis=axis)
    return 1.0 - 2.0 * jnp.mod(neg, 2.0)


def steps(x, axis: int, Q: int):
    """[..., Tp, ...] -> [Q, ..., nc, ...]: the position inside the chunk leads, for a scan over a chunk's steps."""
    return jnp.moveaxis(chunk(x, axis, Q), axis + 1, 0)


def unsteps(y, axis: int):
    """Inverse of steps for a scan's stacked outputs: [Q, ..., nc, ...] -> [..., nc * Q, ...]."""
    return unchunk(jnp.moveaxis(y, 0, axis + 1), axis)


def zeros_per_chunk(x, axis: int, nc: int):
    """Zeros shaped like x with a new chunk axis of length nc inserted at `axis`."""
    return jnp.zeros(x.shape[:axis] + (nc,) + x.shape[axis:], x.dtype)


def crop(x, axis: int, T: int, pk=None):
    """The first T steps along `axis`; packed sequences (`pk`) moved back from the chunk-aligned layout."""
    if pk is not None:
        return packed.from_aligned(x, axis, pk)
    return x if x.shape[axis] == T else lax.slice_in_dim(x, 0, T, axis=axis)


def causal_conv(x, axis: int, window, w, pk=None, bax=None):
    """Causal depthwise conv along `axis`: y[t] = sum_j w[..., j] * xp[t + j] over xp = (window, x) joined
    along `axis`, i.e. the K-1 steps before x come from the window. w is aligned to x (size 1 along `axis`)
    with the K taps on a trailing axis; K is static, so this is K shifted multiply-adds XLA fuses into one pass.
    Packed sequences (`pk`; the sequences along `bax` of the window): each sequence reads its own window, on the
    packed steps or (x longer than the packed length) the chunk-aligned ones."""
    if pk is not None:
        aligned = x.shape[axis] == pk["seq_a"].shape[0]
        seq, pos = (pk["seq_a"], pk["pos_a"]) if aligned else (pk["seq_p"], pk["pos_p"])
        return packed.causal_conv(x, axis, window, w, bax, seq, pos)
    K, T = w.shape[-1], x.shape[axis]
    xp = jnp.concatenate([window.astype(x.dtype), x], axis=axis)
    y = None
    for j in range(K):
        term = lax.slice_in_dim(xp, j, j + T, axis=axis) * w[..., j]
        y = term if y is None else y + term
    return y


def conv_window(x, axis: int, window, T=None, pk=None, bax=None):
    """The last K-1 steps of (window, x[:T]) along `axis`: the window the next call continues from (the old
    window's tail when T < K-1). T defaults to x's length (it is less when x is padded to whole chunks)."""
    if pk is not None:  # packed sequences: each sequence's own window (the sequences along bax)
        return packed.conv_window(x, axis, window, bax, pk, x.shape[axis] == pk["seq_a"].shape[0])
    W = window.shape[axis]
    T = x.shape[axis] if T is None else T
    xp = jnp.concatenate([window.astype(x.dtype), x], axis=axis)
    return lax.slice_in_dim(xp, T, T + W, axis=axis)


def einsum(eq: str, *ops, mm=jnp.float32):
    """A contraction accumulated in float32. With mm=float32 every pass is full precision (no TF32 on GPUs);
    with the inputs' bfloat16/float16 the operands enter the matmul units at that precision, as the hand-written
    kernels do, and the result is float32. mm=float64 (float64 inputs): full precision in float64."""
    if jnp.dtype(mm) in (jnp.float32, jnp.float64):
        return jnp.einsum(eq, *ops, precision=lax.Precision.HIGHEST)
    if len(ops) == 1:  # a sum, not a matmul: its fp32 terms are not rounded to mm (the kernels' tl.sum neither)
        return jnp.einsum(eq, ops[0].astype(jnp.promote_types(ops[0].dtype, jnp.float32)))
    return jnp.einsum(eq, *(o.astype(mm) for o in ops), preferred_element_type=jnp.float32)


def align(x, letters: str, out: str):
    """x (einsum letters `letters`) transposed and reshaped to broadcast against letters `out`."""
    x = jnp.asarray(x)  # constants of the spec come as Python floats
    order = [c for c in out if c in letters]
    if set(letters) - set(order):
        raise ValueError(f"rt.align: letters {letters} not all in {out}")
    x = jnp.transpose(x, [letters.index(c) for c in order]) if list(letters) != order else x
    return x.reshape(tuple(x.shape[order.index(c)] if c in order else 1 for c in out))


def mul(out: str, *operands):
    """Elementwise product of (array, einsum letters) operands, each aligned to the letters `out` (a letter an
    operand lacks broadcasts); XLA fuses the product into one pass."""
    res = None
    for x, letters in operands:
        x = align(x, letters, out)
        res = x if res is None else res * x
    return res


def causal_select(x, out: str, cts: str, strict: bool, valid):
    """x (letters `out`, holding chunk index c, target t and source s: the letters `cts`) where s <= t (s < t when
    strict) and s is inside the sequence, else 0: a select, not a product, so a NaN or inf at a later step never
    reaches an earlier row."""
    Q = x.shape[out.index(cts[1])]
    m = causal(Q, strict, 0)[None] & (valid.reshape(-1, Q) > 0)[:, None, :]
    return jnp.where(align(m, cts, out), x, 0.0)


# ---- sub-chunks of key-wise / value-wise chunks ---------------------------------------------------------------
# A chunk of Q steps is split into n = Q // C sub-chunks. For a target t in sub-chunk i and a source s in an
# earlier sub-chunk, exp(L_t - L_s) = exp(L_t - r_i) * exp(r_i - L_s) with the reference r_i = L at the last step
# before sub-chunk i (the end of sub-chunk i - 1): both exponents are <= 0 when |a| <= 1, so the two factors go
# into the operands of one matmul without overflow. The rounding of r_i cancels between the two factors.

def _exponent(x, bounded: bool):
    return jnp.minimum(x, 0.0) if bounded else x


def sub_ref(L, ax: int, C: int):
    """L [..., Q, ...] (in-chunk position at axis ax) -> [..., n, ...]: L at the last step before each sub-chunk
    of C steps (0 before the first; sub-chunk 0 has no earlier sources, so its reference is never used)."""
    Q = L.shape[ax]
    ends = lax.slice_in_dim(L, C - 1, Q, stride=C, axis=ax)
    zero = jnp.zeros_like(lax.slice_in_dim(ends, 0, 1, axis=ax))
    return jnp.concatenate([zero, lax.slice_in_dim(ends, 0, Q // C - 1, axis=ax)], axis=ax)


def sub_target(Lt, ref, ax: int, C: int, bounded: bool, sig=None):
    """exp(Lt_t - r_i) for t in sub-chunk i: [..., n, C, ...] (i at ax, the position in the sub-chunk at ax+1),
    times the decay's cumulative sign at t when it may be negative."""
    e = jnp.exp(_exponent(chunk(Lt, ax, C) - jnp.expand_dims(ref, ax + 1), bounded))
    return e if sig is None else e * chunk(sig, ax, C)


def sub_source(L, ref, ax: int, C: int, bounded: bool, sig=None):
    """exp(r_i - L_s) for every source s before sub-chunk i, 0 for the others (masked before exp, so a growing
    decay never makes inf * 0): [..., n, Q, ...] (target sub-chunk i at ax, source position s at ax+1)."""
    Q = L.shape[ax]
    n = Q // C
    diff = jnp.expand_dims(ref, ax + 1) - jnp.expand_dims(L, ax)
    m = (jnp.arange(Q)[None, :] < (jnp.arange(n) * C)[:, None]).reshape((n, Q) + (1,) * (L.ndim - ax - 1))
    e = jnp.exp(_exponent(jnp.where(m, diff, -jnp.inf), bounded))
    return e if sig is None else e * jnp.expand_dims(sig, ax)


def sub_diag(Lt, L, ax: int, C: int, strict: bool, bounded: bool, sig=None, sig_s=None):
    """exp(Lt_t - L_s) for t and s in the same sub-chunk, s <= t (s < t when strict), else 0 (masked before exp):
    [..., n, C, C, ...] (sub-chunk at ax, t at ax+1, s at ax+2): the diagonal blocks, computed directly; times the
    signs sig (target's) and sig_s (source's) of a signed decay."""
    a, b = chunk(Lt, ax, C), chunk(L, ax, C)
    diff = jnp.expand_dims(a, ax + 2) - jnp.expand_dims(b, ax + 1)
    e = jnp.exp(_exponent(jnp.where(causal(C, strict, L.ndim - ax - 1), diff, -jnp.inf), bounded))
    if sig is None:
        return e
    sa, sb = chunk(sig, ax, C), chunk(sig_s, ax, C)
    return e * jnp.expand_dims(sa, ax + 2) * jnp.expand_dims(sb, ax + 1)


def _block_mask(n: int, ndim: int, i_ax: int, j_ax: int):
    shape = [1] * ndim
    shape[i_ax] = shape[j_ax] = n
    eye = jnp.eye(n, dtype=bool)
    return eye.reshape(shape)


def add_diag(A, diag, i_ax: int, s_ax: int):
    """A [..., n (i), ..., Q (s), ...] plus the diagonal blocks diag [..., n, ..., C, ...] (the source's position in
    sub-chunk i at s_ax > i_ax): diag lands where s lies in sub-chunk i (a select, so a non-finite entry of one
    block never reaches another)."""
    C = diag.shape[s_ax]
    A5 = chunk(A, s_ax, C)  # s -> (j, y)
    m = _block_mask(A.shape[i_ax], A5.ndim, i_ax, s_ax)
    return unchunk(A5 + jnp.where(m, jnp.expand_dims(diag, s_ax), 0.0), s_ax)


def diag_blocks(A, i_ax: int, s_ax: int, C: int):
    """The diagonal blocks of A [..., n (i), ..., Q (s), ...]: [..., n, ..., C, ...] (s in sub-chunk i)."""
    A5 = chunk(A, s_ax, C)
    m = _block_mask(A.shape[i_ax], A5.ndim, i_ax, s_ax)
    return jnp.sum(jnp.where(m, A5, 0.0), axis=s_ax)


def mul_sum(out: str, letters: str, *operands):
    """Σ over the letters not in `out` of the elementwise product of (array, letters) operands (the small diagonal
    blocks of the sub-chunk forms). As one einsum: written as a product then jnp.sum, XLA:CPU (jaxlib 0.10.2)
    crashed the process (segfault) compiling the fused multiply-reduce of three broadcast operands at some shapes
    (a value-wise decay's diagonal blocks at batch 2: tests/test_decays.py::test_valuewise_diagonal_blocks_compile)."""
    arrays, subs, scale = [], [], None
    for x, lt in operands:
        x = jnp.asarray(x)
        if not lt:  # a constant factor
            scale = x if scale is None else scale * x
            continue
        arrays.append(x)
        subs.append(lt)
    res = jnp.einsum(f"{','.join(subs)}->{''.join(c for c in letters if c in out)}", *arrays,
                     precision=lax.Precision.HIGHEST)
    res = align(res, "".join(c for c in letters if c in out), out)
    return res if scale is None else res * scale


def entering(step, init, xs, across):
    """The state entering this part of the sequence: `init` itself, or, with the sequence split over the mesh axis
    `across` (inside a shard_map, ssmc.shard), the state the parts before this device's leave. `step(S, (a, s))`
    is the state passing's step (S -> a * S + s) and `xs` its per-chunk (decays, states from zero): this part's own
    state from zero and its total decay (the product of its chunks') are gathered from every device, and the chain
    S_in(j) = D(j-1) * S_in(j-1) + S(j-1) runs from `init` over the parts before this one."""
    if across is None:
        return init
    own, _ = lax.scan(step, jnp.zeros_like(init), xs)
    total = jnp.prod(xs[0], axis=0)
    owns, totals = (lax.all_gather(x, across, axis=0) for x in (own, total))
    me = lax.axis_index(across)

    def chain(S, part):
        j, a, s = part
        return jnp.where(j < me, step(S, (a, s))[0], S), None
    S, _ = lax.scan(chain, init, (jnp.arange(owns.shape[0]), totals, owns))
    return S


def one_row(x, bax: int, pk):
    """x itself, or for packed sequences (`pk`) its batch axis cut to one entry (the chunks hold one)."""
    return x if pk is None else packed.one_row(x, bax)


def pass_states(step, init, xs, across, bax: int, pk):
    """The state entering each chunk (chunk axis first): the state passing's lax.scan from `init` (or from the state
    entering this device's part, see `entering`), or, for packed sequences, restarting at each sequence's first chunk
    from its own initial state (targets/packed.py)."""
    if pk is None:
        return lax.scan(step, entering(step, init, xs, across), xs)[1]
    if across is not None:
        raise ValueError("packed sequences (cu_seqlens) cannot also be split across devices")
    return packed.pass_states(step, init, xs, bax, pk)
