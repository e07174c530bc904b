"""How a program maps onto a kernel grid: the analysis every kernel target (Triton, Pallas TPU) shares.

A kernel program (one grid point) owns one slice of the *grid dims* (batch, heads: dims no instruction sums over and
that every time-indexed input shares) and holds a *tile* over the remaining dims (the state dims: contracted K,
kept V) in registers / VMEM. It walks the scan dim either chunk by chunk (the chunk-parallel SSD form: the chunk
stages of the IR run back to back on each chunk, the state stays on chip between chunks) or step by step (the
sequential form: non-chunkable programs, elementwise decay). A group dim g (`group g -> h`) is never a tile or grid
dim: it is an index map, read at g = i_h // (h/g).

What cannot run inside one grid point (a norm over a group of heads, which spans several programs) runs after the
kernel as `post` instructions, on values the kernel writes out.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ssmc.errors import TargetError
from ssmc.ir import ELEMENTWISE_BINARY, ELEMENTWISE_UNARY, Instr, Program, make, union_dims
from ssmc.passes.chunk import chunk_dim
from ssmc.passes.chunk_ops import STAGE_OPS, decode

from .base import check_chunk_outs, chunk_outs


PRE_OPS = ("conv", "conv.window")


SEG = "~seg"               # the segment dim of the sequence-parallel kernels' grids and buffers (no spec dim has a ~)
SEG_CHUNKS = "~seg_chunks"  # chunks per segment: a runtime size of the segment kernels


@dataclass(frozen=True, kw_only=True)
class KernelPlan:
    """One kernel of a schedule: what one program (grid point) loads, computes per chunk / step, and stores."""
    p: Program
    form: str                                   # "chunked", "sequential" or "rows" (the post-kernel norm)
    scan: str
    Q: int | None                               # chunk length (chunked form)
    grid: tuple[str, ...]                       # one program per index of these dims
    tile: tuple[str, ...]                       # dims held whole (or in blocks, `split`) inside a program
    split: tuple[str, ...]                      # tile dims no in-kernel instruction sums over: blockable
    group_of: dict[str, str]                    # g -> h
    inputs: list[Instr]                         # input leaves the kernel loads
    states: list[Instr]                         # state leaves (initial states)
    hoisted: list[Instr]                        # state-free values without the scan dim: computed before the loop
    body: list[Instr]                           # per chunk / per step, in order
    post: list[Instr]                           # after the kernel, over the kernel's written values
    stores: list[tuple[str, str, str]]          # (kind, name, IR value) the kernel writes; kind: out | state (final)
    #                                             | tmp (read after the kernel) | segment | decay | negs (buffers)
    decl: dict[str, tuple[str, ...]] = field(default_factory=dict)  # array/state/buffer key -> its dims in memory
    pre: list[Instr] = field(default_factory=list)  # before the kernel (causal convs and their windows)
    group_tile: dict[str, str] = field(default_factory=dict)  # h -> g: the tile spans one group's heads (post kernel)
    role: str = "walk"        # walk (the whole sequence) | segment_states (a) | segment_outputs (c) | rows (post)
    state_from: str = "input"  # the walk's first state: input (initial states) | zeros | segment (S_in buffers)
    totals: tuple = ()        # segment_states: (cumsum or cumsign SSA name, key) summed over the segment's chunks

    def by(self) -> dict[str, Instr]:
        return self.p.by_name()

    def tdims(self, dims) -> tuple[str, ...]:
        """A value's axes inside a program: the scan dim (if it has it) then its tile dims."""
        dims = [self.group_of.get(d, d) for d in dims]
        return ((self.scan,) if self.scan in dims else ()) + tuple(d for d in self.tile if d in dims)

    @property
    def segmented(self) -> bool:
        return SEG in self.grid

    def leaves(self) -> list[Instr]:
        """What the kernel loads: inputs, then initial states (unless it starts from zeros)."""
        return self.inputs + ([] if self.state_from == "zeros" else self.states)


def _summed(i: Instr, by) -> set[str]:
    """Dims an instruction sums over."""
    if i.op == "contract":
        return union_dims(by, i.args) - set(i.dims)
    if i.op in ("reduce", "rmsnorm"):
        return set(i.attr("over"))
    if i.op == "chunk.output":
        a = decode(i)
        return (union_dims(by, a.q) | set(by[a.enter].dims)) - set(i.dims)
    if i.op == "chunk.across":
        return {d for d in by[i.args[1]].dims if d not in i.dims and not d.endswith("#")}  # the state's dims
    return set()


def _group_norms_without_heads(p: Program) -> Program:
    """`rmsnorm(e, over=[h, p], group=g)` and `over=[p]` mean the same (a group's heads are normalised together
    whatever the list says): the kernel plan takes the form without the head dim."""
    h_of = dict(p.groups)
    instrs = [i.with_attrs(over=tuple(d for d in i.attr("over") if d != h_of[i.attr("group")]))
              if i.op == "rmsnorm" and i.attr("group") else i for i in p.instrs]
    return p if all(a is b for a, b in zip(instrs, p.instrs)) else p.with_instrs(instrs)


def _check_chunk_outs(p: Program, target: str) -> None:
    """Outs and inputs indexed by chunk (dim t#) need the chunked form (base.check_chunk_outs). On the kernel
    targets an out indexed by chunk is the state entering each chunk (a chunk.pass value: the walk stores its
    on-chip state at each chunk's start, kernel_walk.chunk_stores) or a per-chunk value the walk computes (from an
    input indexed by chunk, loaded at each chunk's start, and the entering state): one entry per chunk, no scan dim."""
    check_chunk_outs(p, target)
    by = p.by_name()
    scan, cd = p.scan, chunk_dim(p.scan)
    for name in chunk_outs(p):
        v = by[by[f"out.{name}"].args[0]]
        if v.op != "chunk.pass" and (scan in v.dims or cd not in v.dims):
            raise TargetError(f"{target} target: out '{name}' is indexed by chunk but is {v.name} ({v.op}, dims "
                              f"{list(v.dims)}); the kernels store per chunk the state entering each chunk "
                              f"(chunk.pass) or a value with one entry per chunk (dim {cd}, no {scan}): use "
                              f"target='xla'")


def plan_kernel(p: Program, target: str) -> KernelPlan:
    _check_chunk_outs(p, target)
    p = _group_norms_without_heads(p)
    by = p.by_name()
    scan, cd = p.scan, chunk_dim(p.scan)
    group_of = dict(p.groups)
    h_of = {g: h for g, h in p.groups}
    users = p.users()
    chunked = any(i.op in STAGE_OPS for i in p.instrs)
    form = "chunked" if chunked else "sequential"
    Q = next((i.attr("chunk") for i in p.instrs if i.op == "chunk.cumsum"), None)

    def mapped(dims):
        return {h_of.get(d, d) for d in dims}

    # post-kernel: a norm over a group of heads spans programs; everything downstream of it follows
    post_names: set[str] = set()
    for i in p.instrs:
        if i.op in ("out", "final", "update"):
            continue
        if (i.op == "rmsnorm" and i.attr("group")) or any(a in post_names for a in i.args):
            post_names.add(i.name)
    summed: set[str] = set()
    for i in p.instrs:
        if i.name not in post_names:
            summed |= mapped(_summed(i, by))
    timed = [i for i in p.instrs if i.op in ("input",) + PRE_OPS[:1] and scan in i.dims]
    batch = set.intersection(*(mapped(i.dims) for i in timed)) - {scan} if timed else set()
    # only dims of values the kernel computes count (a conv's window dims live before the kernel)
    kdims = set().union(*(set(i.dims) for i in p.instrs if i.op not in PRE_OPS + ("window", "final")
                          and not (i.op == "input" and all(u.op in PRE_OPS for u in users.get(i.name, [])))))
    special = {scan, cd} | set(group_of) | (set(p.dims) - mapped(kdims))
    tile = tuple(d for d in p.dims if d not in special and (d in summed or d not in batch))
    grid = tuple(d for d in p.dims if d not in special and d not in tile)
    split = tuple(d for d in tile if d not in summed)
    for g, h in p.groups:
        if h in tile:
            raise TargetError(f"{target} target: `group {g} -> {h}` needs '{h}' to index kernel programs, but the "
                              f"program sums over '{h}' or keeps it whole; use target='xla'")
    # a causal conv needs the steps before each chunk (its window): it runs before the kernel, in XLA, and its
    # result enters the kernel like an input
    pre = [i for i in p.instrs if i.op in PRE_OPS]
    decl = {a.name: a.dims for a in p.inputs + p.states + p.outs}
    conv_in = []
    for i in pre:
        if any(by[a].op not in ("input", "window") for a in i.args):
            raise TargetError(f"{target} target: conv at {i.span} convolves a computed value; kernel targets run "
                              f"convs over `in` arrays before the kernel (use target='xla' for this spec)")
        if i.op == "conv":
            # keyed by its SSA name, which no `in` array's name can equal
            conv_in.append(make(i.name, "input", (), i.dims, i.span, array=i.name))
            decl[i.name] = i.dims
    read = {a for i in p.instrs if i.op not in PRE_OPS and i.name not in post_names for a in i.args}
    # a kept input (the only one along the scan dim, unread) still gives the kernel its length
    inputs = [i for i in p.instrs if i.op == "input" and (i.name in read or i.attr("keep"))] + conv_in
    states = [i for i in p.instrs if i.op == "state"]
    hoisted, body, post = [], [], []
    varies: dict[str, bool] = {}  # depends on the scan position or on a state
    for i in p.instrs:
        # (a value indexed by chunk, from an input indexed by chunk, is computed per chunk: in the body)
        varies[i.name] = (scan in i.dims or cd in i.dims or i.op in STAGE_OPS + ("state",)
                          or any(varies.get(a, False) for a in i.args))
        if i.op in ("input", "state", "window", "const", "out", "final", "update") + PRE_OPS:
            continue
        if i.name in post_names:
            post.append(i)
        elif not varies[i.name]:
            hoisted.append(i)
        else:
            body.append(i)
    used_post = {a for i in post for a in i.args}
    stores: list[tuple[str, str, str]] = []
    for o in p.outs:
        v = by[f"out.{o.name}"].args[0]
        if v not in post_names:
            stores.append(("out", o.name, v))
    for s in p.states:
        sink = by.get(f"final.{s.name}") or by[f"update.{s.name}"]
        if by[sink.args[0]].op not in PRE_OPS:  # a conv window's final value comes from the pre-kernel code
            stores.append(("state", s.name, sink.args[0]))
    for v in sorted(used_post - post_names, key=[i.name for i in p.instrs].index):
        if by[v].op not in ("const", "input"):  # inputs reach the post-kernel code directly
            stores.append(("tmp", v, v))
    return KernelPlan(p=p, form=form, scan=scan, Q=Q, grid=grid, tile=tile, split=split, group_of=group_of,
                      inputs=inputs, states=states, hoisted=hoisted, body=body, post=post, stores=stores, decl=decl,
                      pre=pre)



ELEMENTWISE_POST = set(ELEMENTWISE_UNARY) | set(ELEMENTWISE_BINARY) | {"clamp"}


def post_kernel_plan(k: KernelPlan) -> KernelPlan | None:
    """The post-kernel epilogue as a second kernel when it is a norm over a group of heads followed by elementwise
    work: one program per row (every dim but the group's heads and the normalised dims) and group, its tile the
    group's heads x the normalised dims. None when the epilogue has another shape (it then runs in XLA)."""
    if not k.post:
        return None
    norm, rest = k.post[0], k.post[1:]
    by = k.by()
    if norm.op != "rmsnorm" or not norm.attr("group") or any(i.op not in ELEMENTWISE_POST for i in rest):
        return None
    g = norm.attr("group")
    h = k.group_of[g]
    dims = norm.dims
    post_names = {i.name for i in k.post}
    leaves: dict[str, Instr] = {}
    for i in k.post:
        if not set(i.dims) <= set(dims):
            return None
        for a in i.args:
            src = by[a]
            if a in post_names or src.op == "const":
                continue
            if src.op == "expand" or g in src.dims:
                return None  # a group-indexed operand would need the group index inside the tile
            arr = src.attr("array") if src.op == "input" else a  # a stored value: keyed by its SSA name
            leaves[a] = make(a, "input", (), src.dims, src.span, array=arr)
    over = tuple(norm.attr("over"))
    rows = tuple(d for d in dims if d != h and d not in over)
    decl = dict(k.decl)
    for a, leaf in leaves.items():
        if by[a].op != "input":
            decl[leaf.attr("array")] = by[a].dims  # a value the main kernel wrote, in IR dims
    norm2 = norm.with_attrs(over=(h,) + over, group=None)
    outs = {by[f"out.{o.name}"].args[0]: o.name for o in k.p.outs}
    stores = [("out", outs[i.name], i.name) for i in k.post if i.name in outs]
    return KernelPlan(p=k.p, form="rows", scan="~", Q=None, grid=rows + (g,), tile=(h,) + over, split=(),
                      group_of={}, inputs=list(leaves.values()), states=[], hoisted=[norm2] + rest, body=[], post=[],
                      stores=stores, decl=decl, group_tile={h: g}, role="rows")


# ---- the schedule -----------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SegmentCarry:
    """One state's values between the segment kernels: the segment's own state (from zero) and total log-decay
    (+ count of negative factors, for signed decays) that kernel (a) writes, the incoming state S_in that the scan
    (b) gives kernel (c). Keys of LAYOUT arrays; dims in memory (a group-indexed state is kept per head)."""
    state: str
    dims: tuple[str, ...]             # the state per segment: (SEG,) + its per-head dims
    decay: str                        # key of the total log-decay buffer
    decay_dims: tuple[str, ...]       # (SEG,) + grid dims + the decay's tile dims
    negs: str | None                  # key of the negative-factor count (signed decays), else None
    local: str                        # key of the segment's state from zero
    incoming: str                     # key of S_in, kernel (c)'s first state


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """The kernels of a program, in order, with the buffers between them. Two ways through it:
    one walk:  walk (every (grid) program walks the whole sequence) -> post (a grouped norm over its outputs)
    segments:  segment_states (a) -> the scan across segments (b, in the launcher) -> segment_outputs (c) -> post
    The launcher picks one at call time (kernel_runtime.pick_segments); `segments` is None where the form has no
    segmented schedule, and `why` says why (it is printed in the source and the IR)."""
    walk: KernelPlan
    post: KernelPlan | None = None
    segment_states: KernelPlan | None = None
    segment_outputs: KernelPlan | None = None
    carries: tuple[SegmentCarry, ...] = ()
    why: str = ""

    def kernels(self) -> list[KernelPlan]:
        return [k for k in (self.walk, self.segment_states, self.segment_outputs, self.post) if k is not None]

    def buffers(self) -> list[tuple[str, tuple[str, ...], str, str]]:
        """The intermediate buffers between kernels: (key, dims, written by, read by)."""
        out = []
        for k in self.kernels():
            for kind, key, v in k.stores:
                if kind == "tmp" and self.post is not None:
                    out.append((key, k.by()[v].dims, k.role, "post"))
                elif kind in ("segment", "decay", "negs"):
                    out.append((key, k.decl[key], k.role, "segment scan"))
        for c in self.carries:
            out.append((c.incoming, c.dims, "segment scan", "segment_outputs"))
        return out

    def note(self) -> str:
        if self.segment_states is None:
            return f"schedule: one walk per program ({self.why})"
        return ("schedule: one walk per program, or sequence-parallel segments - (a) segment states from zero + "
                "total decays, (b) a scan across segments, (c) segment outputs from the incoming states; the segment "
                "count is chosen at call time from the length, the programs and the device's cores "
                "(kernel_runtime.pick_segments; compile(..., segments=N) forces it, 1 = one walk)")


def plan_schedule(p: Program, target: str) -> Schedule:
    walk = plan_kernel(p, target)
    post = post_kernel_plan(walk)
    seg = _segment_plans(walk)
    if isinstance(seg, str):
        return Schedule(walk=walk, post=post, why=seg)
    states, outputs, carries = seg
    return Schedule(walk=walk, post=post, segment_states=states, segment_outputs=outputs, carries=carries)


def _segment_plans(k: KernelPlan):
    """Kernels (a) and (c) of the sequence-parallel schedule, or why there are none. Diagonal decay classes only:
    a segment's effect on the state entering it is then one decay factor per state entry, exp(total log-decay)."""
    if k.form != "chunked":
        return ("sequential form: the state update is not a diagonal decay (or not chunkable), so segments would "
                "carry a transition matrix; not implemented")
    by = k.by()
    updates = {i.attr("state"): i for i in k.body if i.op == "chunk.states"}
    if set(updates) != {s.attr("state") for s in k.states}:
        return "a state is not updated by chunk stages"
    need: set[str] = set()
    todo = list(i.name for i in updates.values())
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo += by[n].args
    carries, totals, stores, decl = [], [], [], dict(k.decl)
    for s in k.states:
        S = s.attr("state")
        a = decode(updates[S])
        dims = (SEG,) + tuple(k.group_of.get(d, d) for d in k.decl[S])
        dd = tuple(x for x in k.tdims(by[a.L].dims) if x != k.scan)
        decay_dims = (SEG,) + k.grid + dd
        if not set(decay_dims) <= set(dims):
            return f"state {S}'s dims {list(k.decl[S])} lack a program dim of its decay"
        c = SegmentCarry(state=S, dims=dims, decay=f"{S}:decay", decay_dims=decay_dims,
                         negs=f"{S}:negs" if a.sigma else None, local=f"{S}:segment", incoming=f"{S}:in")
        carries.append(c)
        decl.update({c.local: dims, c.incoming: dims, c.decay: decay_dims})
        stores += [("segment", c.local, S), ("decay", c.decay, f"{a.L}:total")]
        totals += [a.L] if a.L not in totals else []
        if a.sigma:
            decl[c.negs] = decay_dims
            stores.append(("negs", c.negs, f"{a.sigma}:total"))
            totals += [a.sigma] if a.sigma not in totals else []
    grid = k.grid + (SEG,)
    states = replace(k, role="segment_states", state_from="zeros", grid=grid, decl=decl,
                     inputs=[i for i in k.inputs if i.name in need], hoisted=[i for i in k.hoisted if i.name in need],
                     body=[i for i in k.body if i.name in need], post=[], stores=stores, totals=tuple(totals))
    # kernel (c) starts from S_in: a leaf of its own (named %S.in, so the kernel's variable reads h_in, not h_prev)
    s_in = [make(f"%{c.state}.in", "state", (), c.dims, s.span, state=c.state, array=c.incoming)
            for s, c in zip(k.states, carries)]
    outputs = replace(k, role="segment_outputs", state_from="segment", grid=grid, decl=decl, states=s_in,
                      stores=[x for x in k.stores if x[0] != "state"])
    return states, outputs, tuple(carries)
