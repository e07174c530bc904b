"""What every kernel target's launcher computes the same way: dim sizes, blocks, strides, output buffers, the
grid, and the jax.numpy helpers of the post-kernel epilogue. Targets add their own `launch`."""
from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from ssmc.passes.chunk import chunk_dim

from .kernel_plan import SEG, SEG_CHUNKS
from .xla_runtime import causal_conv, conv_window, packing  # noqa: F401  (pre-kernel convs of generated launchers)

SEQS = "~seqs"  # a packed call's number of sequences among a launch's sizes (no spec dim has a ~)


def final_key(state: str) -> str:
    """A final state's key among a layout's arrays: no spec name has a ':', so it meets no array's name."""
    return f"{state}:final"


def runtime_dims(layout: dict) -> list[str]:
    """Dims a kernel takes as runtime arguments, not compile-time constants: the grid dims that index programs
    (batch, heads) and the scan dim (the sequence length), so a new length or batch reuses the compiled kernel.
    Tile dims stay constants: they fix the shapes of the tiles."""
    used = set(layout["dims"])
    dims = [d for d in layout["grid"] if d not in layout["tile"] and d in used]
    if layout["scan"] in used and layout["scan"] not in dims:
        dims.append(layout["scan"])
    if chunk_dim(layout["scan"]) in used:  # outs indexed by chunk: the number of chunks follows the length
        dims.append(chunk_dim(layout["scan"]))
    if SEG in layout["grid"]:  # the segment kernels: chunks per segment
        dims.append(SEG_CHUNKS)
    return dims


def runtime_strides(dims, runtime, group_tile: dict) -> list[str]:
    """The dims of a row-major array whose stride spans a runtime size (a later dim, or a group-tiled head dim
    whose group count is runtime): computed in the kernel from the sizes rather than compiled in."""
    spans = set(runtime) | {h for h, g in group_tile.items() if g in runtime}
    return [d for i, d in enumerate(dims) if spans & set(dims[i + 1:])]


def dim_sizes(layout: dict, arrays: dict) -> dict[str, int]:
    """Dim sizes from the arrays' shapes; the chunk-index dim t# (outs indexed by chunk) has ceil(T / Q)."""
    sizes: dict[str, int] = {}
    for name, x in arrays.items():
        for d, n in zip(layout["arrays"][name], x.shape):
            sizes.setdefault(d, int(n))
    cd = chunk_dim(layout["scan"])
    if cd in layout["dims"] and layout["scan"] in sizes and layout.get("Q"):
        sizes[cd] = -(-sizes[layout["scan"]] // layout["Q"])
    return sizes


def pow2_block(n: int, least: int = 16) -> int:
    """A tile block covering n (Triton blocks are powers of two; 16 is tl.dot's least)."""
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def row_major_strides(dims, sizes) -> dict[str, int]:
    out, acc = {}, 1
    for d in reversed(dims):
        out[d] = acc
        acc *= sizes[d]
    return out


def tile_sizes(layout: dict, sizes: dict) -> dict:
    """Sizes as the kernel sees them: a tile over one group's heads (the post kernel) has h/g of them."""
    out = dict(sizes)
    for h, g in layout.get("group_tile", {}).items():
        out[h] = sizes[h] // sizes[g]
    return out


def packed_sizes(layout: dict, sizes: dict, seqs: int) -> dict:
    """A walk kernel's sizes for a packed call of `seqs` sequences (0: an ordinary call): the sizes of the call
    (the inputs' batch of one) with SEQS, from which the grid, the states and their strides take the sequences."""
    return {**sizes, SEQS: seqs} if seqs else dict(sizes)


def array_sizes(layout: dict, sizes: dict, dims) -> dict:
    """The sizes of an array with `dims`: in a packed call, a state (no scan dim) has one entry per sequence along
    the batch dim, an array with the scan dim the call's batch of one."""
    b, seqs = layout.get("packed"), sizes.get(SEQS)
    if seqs and b in dims and layout["scan"] not in dims:
        return {**sizes, b: seqs}
    return sizes


def grid_sizes(layout: dict, sizes: dict) -> dict:
    """The sizes the grid runs over: in a packed call one program per sequence along the batch dim (the states'
    sizes), else the call's."""
    return array_sizes(layout, sizes, [layout.get("packed")])


def needs_64bit_offsets(layout: dict, sizes: dict) -> bool:
    """Whether some array the kernel reads or writes has 2^31 entries or more (Mamba2 h=80 p=64 at b=1 L=524288:
    2.7e9), so its element offsets need 64 bits. Measured on an H200: 64-bit offsets everywhere made the L=131072
    walk 8-13% slower, so kernels take them only where needed (I64)."""
    return any(math.prod(array_sizes(layout, sizes, dims).get(d, 1) for d in dims) >= 2 ** 31
               for dims in layout["arrays"].values())


def runtime_args(layout: dict, sizes: dict) -> list[int]:
    """The sizes a kernel takes at run time (batch, heads, length; see kernel_launch.runtime_dims), in order."""
    tiles = tile_sizes(layout, grid_sizes(layout, sizes))
    return [int(tiles[d]) for d in runtime_dims(layout)]


def constexprs(layout: dict, sizes: dict, blocks: dict, Q: int | None) -> dict:
    """The kernel's compile-time constants by the names the emitter gave them (LAYOUT["names"]): tile sizes,
    blocks, Q, and the strides spanning no runtime size (those the kernel computes from its runtime sizes)."""
    names = layout["names"]
    rt = runtime_dims(layout)
    meta = {names["N"][d]: n for d, n in tile_sizes(layout, sizes).items() if d in layout["dims"] and d not in rt}
    meta.update({names["BLOCK"][d]: blocks[d] for d in layout["tile"]})
    if layout["form"] == "chunked":
        meta["Q"] = Q
    for arr, dims in layout["arrays"].items():
        dyn = runtime_strides(dims, rt, layout.get("group_tile", {}))
        for d, s in row_major_strides(dims, array_sizes(layout, sizes, dims)).items():
            if d not in dyn:
                meta[names["stride"][arr][d]] = s
    return meta


def grid(layout: dict, sizes: dict, blocks: dict) -> tuple[int]:
    """One axis of programs: every grid index times every block of the split dims (triton_gpu.program_ids)."""
    g = math.prod(grid_sizes(layout, sizes)[d] for d in layout["grid"])
    return (g * math.prod(-(-sizes[d] // blocks[d]) for d in layout["split"]),)


def out_specs(layout: dict, sizes: dict, out_dtype) -> list[tuple[tuple[int, ...], object]]:
    """(shape, dtype) of every buffer the kernel writes: outs in their dtype (those in LAYOUT's fp32_outs in fp32),
    final states and intermediates fp32."""
    return [(tuple(array_sizes(layout, sizes, dims)[d] for d in dims), out_dtype_of(layout, name, kind, out_dtype))
            for name, kind, dims in layout["stores"]]


def out_dtype_of(layout: dict, name: str, kind: str, out_dtype):
    """A stored buffer's dtype: an out's is out_dtype unless LAYOUT keeps it in fp32; everything else fp32."""
    return out_dtype if kind == "out" and name not in layout.get("fp32_outs", ()) else jnp.float32


# ---- the sequence-parallel schedule -------------------------------------------------------------------------------
# When is it worth splitting the time axis into segments (kernel_plan.Schedule)? Every segment adds a walk of its
# chunks without outputs (kernel a) and a short scan, so only when the programs of the one walk leave the device's
# cores idle, and only where each segment still walks enough chunks to amortise that. Measured on an H200 (132 SMs;
# Mamba2 p=64 n=128, bf16, chunk 64; one walk -> best segmented, ms): b=1 h=80 L=65536 5.2 -> 3.0 (12 segments),
# L=131072 10.7 -> 5.5 (32); b=1 h=24 L=32768 2.8 -> 1.04 (8-16; 33 segments of 15 chunks: 1.36); b=2 h=40
# L=16384 1.62 -> 1.21 (10); b=2 h=80 (160 programs) L=16384: 1.71 one walk, no segment count faster. The
# constants, in one place:
SEG_BELOW = 1.0         # segment only while (batch x heads x blocks) programs are fewer than SEG_BELOW x the cores
                        # (the derived adjoint's state walk storing its states per chunk, b=1 h=80 L=65536, 160
                        # programs: one walk 1.64 ms, 7 segments 0.62 + 1.23 ms)
SEG_BELOW_WHOLE = 3.0   # the same for a walk with no split dim: each program holds its whole state tile, so fewer
                        # fit on an SM (H200, Mamba2's derived adjoint walk at b=4 h=80 L=8192, 320 programs: one
                        # walk 4.72 ms, 2/4/8 segments 3.86/3.77/3.87; its dq walk, split in two, 640 programs: one
                        # walk 1.79 ms, 2 segments 2.00)
SEG_TARGET = 8          # then aim at programs x segments = SEG_TARGET x the cores (several programs share an SM)
SEG_MIN_CHUNKS = 32     # every segment walks at least this many chunks
SEG_MAX = 64            # and no more segments than this (the scan across them runs serially)
DEFAULT_CORES = 132     # cores assumed where no device says (the interpreters): an H200's SMs


def pick_segments(n_chunks: int, programs: int, cores: int, below: float = SEG_BELOW) -> int:
    """The number of segments for a walk of `n_chunks` chunks by `programs` programs on `cores` cores: 1 when the
    programs already occupy the cores, else about SEG_TARGET x cores / programs, each of at least SEG_MIN_CHUNKS
    chunks. Mamba2 on an H200 (132 SMs, chunk 64, h=80): b=1 L=65536 -> 14, b=4 L=2048 -> 1."""
    if programs >= below * cores:
        return 1
    want = -(-SEG_TARGET * cores // max(1, programs))
    return max(1, min(want, n_chunks // SEG_MIN_CHUNKS, SEG_MAX))


def chunk_count(layout: dict, sizes: dict) -> int:
    """The number of chunks of a call (ceil(T / Q))."""
    return max(1, -(-sizes[layout["scan"]] // layout["Q"]))


def programs(layout: dict, sizes: dict, block: int = 64) -> int:
    """Programs of a call with the split dims in blocks of `block` (the heuristic's at most 64): one per grid index
    (the segment dim counted where `sizes` has it) and block."""
    return math.prod(sizes.get(d, 1) for d in layout["grid"]) * math.prod(-(-sizes[d] // block) for d in layout["split"])


def segments(layout: dict, sizes: dict, forced: int | None, cores: int) -> tuple[int, dict]:
    """(number of segments, sizes with the segment count and chunks per segment) of a call: `forced` (the
    compile option) or pick_segments. Segments cover whole chunks; the last may be shorter. 1: the one walk."""
    n_chunks = chunk_count(layout, sizes) if layout["Q"] else 1
    if forced is None:
        n = pick_segments(n_chunks, programs(layout, sizes), cores,
                          SEG_BELOW if layout["split"] else SEG_BELOW_WHOLE)
    else:
        n = forced
    n = max(1, min(int(n), n_chunks))
    per = -(-n_chunks // n)
    n = -(-n_chunks // per)
    return n, {**sizes, SEG: n, SEG_CHUNKS: per}


GIVEN = "~given"  # among a launch's sizes: the number of given states entering each chunk (`entering`)


def entering_segments(layout: dict, sizes: dict, chunks_per_program: int = 1) -> tuple[int, dict]:
    """(number of segments, sizes) of a call from given states entering each chunk: segments of
    `chunks_per_program` chunks (a target's launcher picks it), each chunk loading its own state."""
    n_chunks = chunk_count(layout, sizes)
    per = max(1, min(int(chunks_per_program), n_chunks))
    n = -(-n_chunks // per)
    return n, {**sizes, SEG: n, SEG_CHUNKS: per, GIVEN: n_chunks}


def given_states(sizes: dict) -> bool:
    """Whether segment outputs (c) load the state entering each chunk instead of walking from the segment's:
    states given per chunk (`entering`), or segments of one chunk."""
    return bool(sizes.get(GIVEN)) or sizes.get(SEG_CHUNKS) == 1


def entering_states(entering: dict, state: str, state_dims, dims, sizes):
    """The states entering each chunk from `entering` {state: [t#, *state_dims]}, as segment outputs (c) read
    them (`dims`: the chunk in the segment dim's place, then per head; a group-indexed state repeated per head).
    Kept in their dtype (the kernel widens them to fp32)."""
    from ssmc.errors import ShapeError
    if state not in entering:
        raise ShapeError(f"entering: no states entering each chunk for state '{state}' (given: {sorted(entering)})")
    x = jnp.asarray(entering[state])
    n = sizes.get(GIVEN, sizes[SEG])
    want = (n,) + tuple(sizes[d] for d in state_dims)
    if tuple(x.shape) != want:
        raise ShapeError(f"entering['{state}']: shape {tuple(x.shape)}, expected {want} (the call's {n} "
                         f"chunks, then the state's dims {list(state_dims)})")
    return _repeat_groups(x, (SEG,) + tuple(state_dims), dims, {**sizes, SEG: n})


def segment_scan(init, init_dims, local, decay, negs, dims, decay_dims, sizes, across=None, reverse=False,
                 flipped=False):
    """Step (b): each segment's incoming state and the final state, from the initial state `init` (declared dims
    `init_dims`), the segments' own states `local` (dims: the segment, then per head) and total log-decays `decay`
    (+ counts of negative factors `negs`, for signed decays). S_in(0) = init, S_in(j) = D(j-1) S_in(j-1) + S(j-1),
    D = (-1)^negs exp(decay); the final state is D(last) S_in(last) + S(last). In fp32.
    `across`: the mesh axis (or axes) the sequence is split over, inside a shard_map (ssmc.shard). Each device
    scans its own segments from a zero state, which gives its part's own state, and its segments' incoming states
    are linear in the state entering its part: S_in(j) = S_in^0(j) + P(j) S_part with P(j) = D(0)...D(j-1). So
    only one (total decay, state) pair per device is gathered, and a scan over those gives the state entering each
    part and the final state (every device runs it: they are a handful of states). `reverse`: a reverse-time
    program's walk, whose parts come in reverse device order (the last device's part first). `flipped`: its
    kernels walk it in place, and its segments' arrays (these and the incoming states) lie in forward-time order,
    the walk's first segment last (targets/kernel_launch.py LauncherWriter.reverse_scan)."""
    if flipped:
        flip = (lambda x: None if x is None else jnp.flip(x, 0))
        s_in, final = segment_scan(init, init_dims, flip(local), flip(decay), flip(negs), dims, decay_dims, sizes,
                                   across, reverse)
        return flip(s_in), final
    s0 = _per_head(jnp.asarray(init).astype(jnp.float32), init_dims, dims, sizes)
    local = local.astype(jnp.float32)
    logs = jnp.broadcast_to(align(decay.astype(jnp.float32), decay_dims, dims), local.shape)
    nn = None if negs is None else jnp.broadcast_to(align(negs.astype(jnp.float32), decay_dims, dims), local.shape)
    if across is None:
        s_in, final = _chain(s0, local, _signed(logs, nn))
        return s_in, _per_group(final, init_dims, dims, sizes)
    s_in0, own = _chain(jnp.zeros_like(s0), local, _signed(logs, nn))
    prefix = _signed(jnp.cumsum(logs, 0) - logs, None if nn is None else jnp.cumsum(nn, 0) - nn)
    total = _signed(jnp.sum(logs, 0), None if nn is None else jnp.sum(nn, 0))
    owns, totals = (lax.all_gather(x, across, axis=0) for x in (own, total))
    me = lax.axis_index(across)
    if reverse:  # walk order: the last device's part first
        owns, totals, me = jnp.flip(owns, 0), jnp.flip(totals, 0), owns.shape[0] - 1 - me
    entering, final = _chain(s0, owns, totals)
    s_part = lax.dynamic_index_in_dim(entering, me, axis=0, keepdims=False)
    return s_in0 + prefix * s_part[None], _per_group(final, init_dims, dims, sizes)


def _chain(s0, own, d):
    """S_in(0) = s0, S_in(j) = d(j-1) S_in(j-1) + own(j-1) over the leading axis: (every S_in, the state after all)."""
    def step(state, seg):
        o, dj = seg
        return dj * state + o, state
    final, s_in = lax.scan(step, s0, (own, d))
    return s_in, final


def _signed(logs, negs):
    """exp(logs), negated where the count of negative factors is odd."""
    d = jnp.exp(logs)
    return d if negs is None else d * (1.0 - 2.0 * jnp.mod(negs, 2.0))


def _per_head(s, init_dims, dims, sizes):
    """A group-indexed state (dims g where the segments have h) repeated per head between the segment kernels."""
    return _repeat_groups(s, init_dims, dims[1:], sizes)


def _repeat_groups(x, src, dst, sizes):
    """x over dims `src` repeated along each axis where `dst` (axis by axis) has a head dim for src's group dim."""
    for ax, (d0, d1) in enumerate(zip(src, dst)):
        if d0 != d1:
            x = jnp.repeat(x, sizes[d1] // sizes[d0], axis=ax)
    return x


def _per_group(s, init_dims, dims, sizes):
    """Back from per head to per group: the group's first head."""
    for ax, (d0, d1) in enumerate(zip(init_dims, dims[1:])):
        if d0 != d1:
            s = lax.slice_in_dim(s, 0, sizes[d1], sizes[d1] // sizes[d0], axis=ax)
    return s


# ---- post-kernel epilogue helpers (jax.numpy) --------------------------------------------------------------------
def align(x, src, to):
    """Array with named dims `src` -> broadcastable against dims `to` (transpose, then insert size-1 axes)."""
    x = jnp.asarray(x)
    if not src:
        return x
    order = [d for d in to if d in src]
    if list(src) != order:
        x = jnp.transpose(x, [list(src).index(d) for d in order])
    return x.reshape(tuple(x.shape[order.index(d)] if d in order else 1 for d in to))


def group_rmsnorm(x, dims, over, h, G: int, eps: float):
    """rmsnorm over `over` and over the heads of each group (head i in group i // (H/G)), in fp32."""
    x = x.astype(jnp.float32)
    ax = dims.index(h)
    H = x.shape[ax]
    xs = x.reshape(x.shape[:ax] + (G, H // G) + x.shape[ax + 1:])
    axes = tuple(sorted([ax + 1] + [dims.index(d) + (1 if dims.index(d) > ax else 0) for d in over]))
    ms = jnp.mean(jnp.square(xs), axis=axes, keepdims=True)
    return (xs * lax.rsqrt(ms + eps)).reshape(x.shape)


def to_declared(v, vdims, decl, dtype):
    v = align(v, vdims, decl)
    return v.astype(dtype)
