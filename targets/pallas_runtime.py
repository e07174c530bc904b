"""Launching generated Pallas TPU kernels from JAX.

The launcher lays every array out for the kernel: the dims that index programs (the plan's grid dims; a group dim
g takes the place of its head dim h) first, then the scan dim, then the tile dims, so a program's block is the
trailing (time, tile...) part, whole except along time. TPU blocks need their last two dims to be multiples of
(8, 128) or whole, so a block with one trailing dim gets a unit dim (a time column [t, 1], a row [1, d]); the scan
dim is padded (edge values, as Triton's clamped loads) to a multiple of the time block, and the padded steps are
masked in the kernel and cut off here. Arrays indexed only by grid dims (per-head scalars: A, D, dt_bias) go to
SMEM whole, flattened, in fp32.

Grid: one "parallel" axis per grid dim, then the time blocks (chunks, or blocks of steps in the sequential form)
as the last, "arbitrary" axis; the state stays in VMEM scratch across it. The index_map of a group-indexed input
reads group i_h // (H/G). interpret=True runs the same pallas_call in Pallas' TPU interpreter on CPU.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ssmc.passes.chunk import chunk_dim

from . import kernel_runtime as kr
from .kernel_plan import SEG, SEG_CHUNKS
from .kernel_runtime import align, group_rmsnorm, to_declared  # noqa: F401  (used by generated launchers)

dim_sizes = kr.dim_sizes


def __getattr__(name):  # the launcher helpers every kernel target shares (pre-/post-kernel code)
    return getattr(kr, name)

def device_cores(interpret: bool) -> int:
    """TensorCores of the TPU that a kernel's "parallel" grid axes spread over (1 where no TPU says)."""
    if not interpret and jax.default_backend() == "tpu":
        return int(getattr(jax.devices()[0], "num_cores", 1) or 1)
    return 1


def segments(layout, sizes, forced, interpret):
    """How many segments this call's walk is split into (see kernel_runtime.pick_segments)."""
    return kr.segments(layout, sizes, forced, device_cores(interpret))


def entering_segments(layout, sizes, interpret):
    """Given states entering each chunk: a segment per chunk (its state is the segment's incoming one)."""
    return kr.entering_segments(layout, sizes, 1)


SEQ_BLOCK = 128  # time steps per grid step of the sequential form (a multiple of 16: bf16 sublane tiles)


# ---- the kernel-side layout of an array (shared with the emitter) ------------------------------------------------
def kernel_layout(grid, tile, scan, groups: dict, dims) -> tuple[list, list, str]:
    """(outer dims, inner dims, kind) of an array with declared `dims` inside the kernel's call.
    outer: grid dims (or the group dim standing for its head dim), in grid order, then the chunk-index dim t# of an
    out or input indexed by chunk (its block index is the time block's), squeezed out of the block;
    inner: the scan dim then tile dims (the block); kind: how the inner part is shaped in memory:
    "full" (rank >= 2 as is), "tcol" ([t, 1]), "row" ([1, d]), "scalar" (no inner dims)."""
    h_to_g = {h: g for g, h in groups.items()}
    outer = []
    for d in grid:
        if d in dims:
            outer.append(d)
        elif d in h_to_g and h_to_g[d] in dims:
            outer.append(h_to_g[d])
    if chunk_dim(scan) in dims:
        outer.append(chunk_dim(scan))
    inner = ([scan] if scan in dims else []) + [d for d in tile if d in dims]
    if len(inner) >= 2:
        kind = "full"
    elif inner == [scan]:
        kind = "tcol"
    elif inner:
        kind = "row"
    else:
        kind = "scalar"
    return outer, inner, kind


def _layout_of(layout, name):
    return kernel_layout(layout["grid"], layout["tile"], layout["scan"], layout["groups"], layout["arrays"][name])


def time_block(layout: dict, T: int) -> int:
    if layout["form"] == "chunked":
        return layout["Q"]
    return min(SEQ_BLOCK, -(-T // 16) * 16)


def split_block(n: int) -> int:
    """Block of a blockable tile dim (its own "parallel" grid axis): whole up to 512, else the largest of 512, 256,
    128 that divides it (a lane-dim block must be a multiple of 128 or whole)."""
    if n <= 512:
        return n
    return next((b for b in (512, 256, 128) if n % b == 0), n)


def _inner_shape(inner, kind, ext: dict):
    """The inner (block or array) shape from each inner dim's extent, with the unit dims of its kind."""
    shp = [ext[d] for d in inner]
    if kind == "tcol":
        return shp + [1]
    if kind == "row":
        return [1] + shp
    if kind == "scalar":
        return [1, 1]
    return shp


def _to_kernel(x, dims, outer, inner, kind, sizes, scan, Tp):
    """Declared array -> the kernel's layout [outer..., inner (+ unit dims)], scan dim padded to Tp."""
    order = [dims.index(d) for d in outer + inner]
    x = jnp.transpose(x, order) if order != list(range(len(dims))) else x
    if scan in inner and Tp != sizes[scan]:
        ax = len(outer)
        pad = [(0, 0)] * x.ndim
        pad[ax] = (0, Tp - sizes[scan])
        x = jnp.pad(x, pad, mode="edge")
    if kind == "scalar":  # SMEM: flat, 32-bit
        return x.reshape(-1).astype(jnp.float32) if x.ndim else x.reshape(1).astype(jnp.float32)
    if kind == "scalar_vmem":
        return x[..., None, None]
    if kind == "tcol":
        return x[..., None]
    if kind == "row":
        return x[..., None, :]
    return x


def _from_kernel(y, dims, outer, inner, sizes, scan, Tp, groups):
    """Kernel-layout output -> declared dims (unit dims dropped, padding cut; a group dim's value written per head
    is taken from the group's first head; an out indexed by chunk cut to its chunks, from those of the padded
    length Tp)."""
    for ax, d in enumerate(outer):
        if d in groups:
            y = lax.slice_in_dim(y, 0, sizes[groups[d]], sizes[groups[d]] // sizes[d], axis=ax)
    cd = chunk_dim(scan)
    ext = {**sizes, cd: y.shape[outer.index(cd)]} if cd in outer else sizes
    y = y.reshape(tuple(ext[d] for d in outer) + tuple(Tp if d == scan else sizes[d] for d in inner))
    if cd in outer and ext[cd] != sizes[cd]:
        y = lax.slice_in_dim(y, 0, sizes[cd], axis=outer.index(cd))
    if scan in inner and Tp != sizes[scan]:
        y = lax.slice_in_dim(y, 0, sizes[scan], axis=len(outer))
    cur = outer + inner
    order = [cur.index(d) for d in dims]
    return jnp.transpose(y, order) if order != list(range(len(dims))) else y


def _index_map(layout, sizes, outer, inner, kind, whole=None):
    # the segment kernels walk chunk c of segment j: time block j * (chunks per segment) + c
    seg = layout["grid"].index(SEG) if SEG in layout["grid"] else None
    per = sizes.get(SEG_CHUNKS, 1)

    grid, groups, scan, split = layout["grid"], layout["groups"], layout["scan"], layout["split"]
    picks = []
    for d in outer:
        if d == chunk_dim(scan):  # an out / input indexed by chunk: the time block's chunk (segments: global)
            picks.append(None)
        elif d in groups:  # a group dim: head i reads group i // (H/G)
            h = groups[d]
            picks.append((grid.index(h), sizes[h] // sizes[d]))
        else:
            picks.append((grid.index(d), 1))
    # inner positions: the time block index, a split dim's block index, or 0
    src = {}
    off = 1 if kind == "row" else 0
    for k, d in enumerate(inner):
        if d == scan:
            src[k + off] = -1
        elif d in split:
            src[k + off] = len(grid) + split.index(d)
    n_inner = 2 if kind in ("tcol", "row", "scalar") else len(inner)

    def index_map(*ids):
        # lax.div, not //: a signed floor division lowers through sign, which Mosaic lowers only with a TPU attached
        time = ids[-1] if seg is None else ids[seg] * per + ids[-1]
        out = [time if pick is None else 0 if d == whole else (lax.div(ids[pick[0]], pick[1]) if pick[1] != 1
                                                               else ids[pick[0]]) for d, pick in zip(outer, picks)]
        out += [(time if src[k] == -1 else ids[src[k]]) if k in src else 0 for k in range(n_inner)]
        return tuple(out)
    return index_map


def _compiler_params(n_parallel):
    sem = ("parallel",) * n_parallel + ("arbitrary",)
    return pltpu.CompilerParams(dimension_semantics=sem)


def launch(kernel, layout, arrays, sizes, *, mm, out_dtype, interpret=False, cu_seqlens=None):
    """The kernel over `arrays`. A walk kernel with layout["packed"] takes a table of its time blocks last among
    its inputs (SMEM int32 [3, blocks]: valid steps, first block of a sequence, the sequence) and PACKED: with
    cu_seqlens the sequences are laid out block-aligned (targets/packed.py), the walk restarts from a sequence's
    initial state at its first block and writes its final state at each of its blocks (the last write stays);
    the states keep all sequences in one block along the batch dim."""
    scan = layout["scan"]
    T = sizes[scan]
    tb = time_block(layout, T)
    nT = max(1, -(-T // tb))
    pk, seqs = None, 0
    if layout.get("packed") and cu_seqlens is not None:
        from .packed import packing, to_aligned
        pk = packing(cu_seqlens, T, tb)
        nT = pk["NC"]
        arrays = {n: (to_aligned(jnp.asarray(x), layout["arrays"][n].index(scan), pk) if scan in layout["arrays"][n]
                      else x) for n, x in arrays.items()}
        seqs = int(pk["n"])
        sizes = {**sizes, scan: nT * tb}
    if SEG in layout["grid"]:  # each program walks one segment's chunks; the last segment's may run past the end
        nT = sizes[SEG_CHUNKS]
        Tp = sizes[SEG] * nT * tb
    else:
        Tp = nT * tb
    blocks = {d: split_block(sizes[d]) if d in layout["split"] else sizes[d] for d in layout["tile"]}
    grid = (tuple(sizes[d] for d in layout["grid"]) + tuple(sizes[d] // blocks[d] for d in layout["split"])
            + (nT,))
    blk = {**blocks, scan: tb}          # extents of a block
    full = {**sizes, scan: Tp}          # extents of the kernel-layout arrays
    ins, in_specs = [], []
    b = layout.get("packed")
    for name in layout["inputs"]:
        dims = layout["arrays"][name]
        outer, inner, kind = _layout_of(layout, name)
        # initial states stay in VMEM blocks, like the scratch; so do inputs indexed by chunk (a block per chunk)
        by_chunk = chunk_dim(scan) in dims
        smem = kind == "scalar" and name not in layout["state_inputs"] and not by_chunk
        every = pk is not None and name in layout["state_inputs"] and b in outer  # all sequences' states, one block
        x = jnp.asarray(arrays[name])
        if by_chunk:  # an input indexed by chunk: one entry per time block of the padded length (zeros past the end)
            ax = dims.index(chunk_dim(scan))
            x = jnp.pad(x, [(0, Tp // tb - x.shape[ax]) if a == ax else (0, 0) for a in range(x.ndim)])
        ins.append(_to_kernel(x, dims, outer, inner, kind if smem or kind != "scalar"
                              else "scalar_vmem", _state_sizes(sizes, b, seqs) if every else sizes, scan, Tp))
        if smem:
            in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
        else:
            block = [seqs if every and d == b else None for d in outer] + _inner_shape(inner, kind, blk)
            in_specs.append(pl.BlockSpec(tuple(block), _index_map(layout, sizes, outer, inner, kind,
                                                                  whole=b if every else None)))
    if layout.get("packed"):  # the table of time blocks (a one-block placeholder for an ordinary call)
        table = np.zeros((3, 1), np.int32)  # a constant: no XLA op
        if pk is not None:
            # every block writes its sequence's final state: the blocks past the last used one (no steps) belong
            # to the last sequence with steps, whose state they hold, not to a trailing empty sequence
            last_used = pk["seq"][jnp.max(jnp.where(pk["used"], jnp.arange(nT), 0))]
            seq = jnp.where(pk["used"], pk["seq"], last_used)
            table = jnp.stack([jnp.sum(pk["valid"].reshape(nT, tb), axis=1), pk["first"], seq]).astype(jnp.int32)
        ins.append(table.reshape(-1))
        in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    out_shapes, out_specs, outs_meta, scratch = [], [], [], []
    for name, kind_, dims in layout["stores"]:
        outer, inner, kind = _layout_of(layout, name)
        # a group-indexed result (a GQA state S[b,g,..]) of programs over heads: every head of the group computes
        # it, so it is written per head (a block is never revisited) and the group's first head kept below
        per_head = [layout["groups"].get(d, d) for d in outer]
        dtype = kr.out_dtype_of(layout, name, kind_, out_dtype)
        every = pk is not None and kind_ == "state" and b in outer  # every sequence's final state, one block
        osz = _state_sizes(sizes, b, seqs) if every else sizes
        # an out indexed by chunk: one entry per time block of the padded length (cut to the chunks below)
        ext = {**osz, chunk_dim(scan): Tp // tb}
        shape = tuple(ext[d] for d in per_head) + tuple(_inner_shape(inner, kind, full))
        out_shapes.append(jax.ShapeDtypeStruct(shape, dtype))
        block = [seqs if every and d == b else None for d in outer] + _inner_shape(inner, kind, blk)
        out_specs.append(pl.BlockSpec(tuple(block), _index_map(layout, sizes, per_head, inner, kind,
                                                               whole=b if every else None)))
        outs_meta.append((dims, outer, inner, osz))
    for dims in layout["carried"]:  # the running states: VMEM scratch, resident across the time axis
        outer, inner, kind = kernel_layout(layout["grid"], layout["tile"], scan, layout["groups"], dims)
        scratch.append(pltpu.VMEM(tuple(_inner_shape(inner, kind, blk)), jnp.float32))
    if layout["form"] == "sequential":  # fp32 staging of each time block: timed inputs, then timed stores
        for name in layout["inputs"]:
            outer, inner, kind = _layout_of(layout, name)
            if scan in inner:
                scratch.append(pltpu.VMEM(tuple(_inner_shape(inner, kind, blk)), jnp.float32))
        for name, kind_, dims in layout["stores"]:
            outer, inner, kind = _layout_of(layout, name)
            if kind_ != "state" and scan in inner:
                scratch.append(pltpu.VMEM(tuple(_inner_shape(inner, kind, blk)), jnp.float32))
    meta = {layout["names"]["N"][d]: sizes[d] for d in layout["names"]["N"]}  # by the names the kernel gave them
    meta.update({layout["names"]["BLOCK"][d]: blocks[d] for d in layout["tile"]})
    meta["Q" if layout["form"] == "chunked" else "TB"] = tb
    mm = jnp.dtype(mm)
    meta["MM"] = mm
    meta["PREC"] = lax.Precision.HIGHEST if mm == jnp.float32 else lax.Precision.DEFAULT
    if layout.get("packed"):
        meta["PACKED"] = pk is not None
    call = pl.pallas_call(
        functools.partial(kernel, **meta),
        grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shapes, scratch_shapes=scratch,
        compiler_params=_compiler_params(len(grid) - 1),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=getattr(kernel, "__name__", "ssmc_kernel"))
    res = _vmappable(call)(*ins)
    res = [_from_kernel(y, dims, outer, inner, osz, scan, Tp, layout["groups"])
           for y, (dims, outer, inner, osz) in zip(res, outs_meta)]
    if pk is not None:  # timed results back from the block-aligned layout
        from .packed import from_aligned
        res = [from_aligned(y, dims.index(scan), pk) if scan in dims else y
               for y, (dims, *_) in zip(res, outs_meta)]
    return res


def _state_sizes(sizes: dict, b: str, seqs: int) -> dict:
    return {**sizes, b: seqs}


def _vmappable(call):
    """`call` under jax.vmap runs once per mapped index (lax.map). Pallas' own batching rule adds a grid axis that
    neither its TPU interpreter (no dimension semantics for it) nor Mosaic (SMEM operands, blocked along it)
    accepts; a loop over the kernel launches is what a vmap of a whole-problem kernel costs anyway."""
    fn = jax.custom_batching.custom_vmap(call)

    @fn.def_vmap
    def rule(axis_size, in_batched, *args):
        def one(mapped):
            it = iter(mapped)
            return fn(*[next(it) if b else a for a, b in zip(args, in_batched)])
        out = lax.map(one, [a for a, b in zip(args, in_batched) if b])
        return out, type(out)(True for _ in out)
    return fn


# ---- in-kernel helpers (traced inside the kernel; each lowers with Mosaic) ----------------------------------------
def tril(n: int, strict: bool = False):
    """[n, n] boolean: row >= column (row > column when strict), from 2-D iotas."""
    row, col = lax.broadcasted_iota(jnp.int32, (n, n), 0), lax.broadcasted_iota(jnp.int32, (n, n), 1)
    return row > col if strict else row >= col


def cumsum0(x):
    """Inclusive cumulative sum along axis 0 as a lower-triangular matmul (no cumsum lowering on TPU), fp32. A NaN
    at step s reaches rows >= s only (in the matmul, 0 * NaN would reach every row): NaNs enter as 0 and their
    running count marks the rows they reach."""
    n = x.shape[0]
    if x.ndim == 1:
        return jnp.sum(jnp.where(tril(n), x[None, :], 0.0), axis=1)
    flat = x.reshape(n, math.prod(x.shape[1:])) if x.ndim > 2 else x
    nan = flat != flat

    def tri(v):
        return lax.dot_general(tril(n).astype(jnp.float32), v, (((1,), (0,)), ((), ())),
                               precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    out = jnp.where(tri(jnp.where(nan, 1.0, 0.0)) > 0, jnp.nan, tri(jnp.where(nan, 0.0, flat)))
    return out.reshape(x.shape) if x.ndim > 2 else out
