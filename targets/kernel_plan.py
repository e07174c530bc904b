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

from dataclasses import dataclass, field

from ssmc.errors import TargetError
from ssmc.ir import ELEMENTWISE_BINARY, ELEMENTWISE_UNARY, Instr, Program, make, union_dims
from ssmc.passes.chunk import chunk_dim
from ssmc.passes.chunk_ops import STAGE_OPS, decode


PRE_OPS = ("conv", "conv.window")


@dataclass
class KernelPlan:
    p: Program
    form: str                                   # "chunked" or "sequential"
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
    stores: list[tuple[str, str, tuple]]        # (kind: out|state|tmp, name, IR value) the kernel writes
    decl: dict[str, tuple[str, ...]] = field(default_factory=dict)  # array/state name -> declared dims
    pre: list[Instr] = field(default_factory=list)  # before the kernel (causal convs and their windows)
    group_tile: dict[str, str] = field(default_factory=dict)  # h -> g: the tile spans one group's heads (post kernel)

    def by(self) -> dict[str, Instr]:
        return self.p.by_name()

    def tdims(self, dims) -> tuple[str, ...]:
        """A value's axes inside a program: the scan dim (if it has it) then its tile dims."""
        dims = [self.group_of.get(d, d) for d in dims]
        return ((self.scan,) if self.scan in dims else ()) + tuple(d for d in self.tile if d in dims)


def _summed(i: Instr, by) -> set[str]:
    """Dims an instruction sums over."""
    if i.op == "contract":
        return union_dims(by, i.args) - set(i.dims)
    if i.op in ("reduce", "rmsnorm"):
        return set(i.attr("over"))
    if i.op == "chunk.output":
        a = decode(i)
        return (union_dims(by, a.q) | set(by[a.enter].dims)) - set(i.dims)
    return set()


def _group_norms_without_heads(p: Program) -> Program:
    """`rmsnorm(e, over=[h, p], group=g)` and `over=[p]` mean the same (a group's heads are normalised together
    whatever the list says): the kernel plan takes the form without the head dim."""
    h_of = dict(p.groups)
    instrs = [i.with_attrs(over=tuple(d for d in i.attr("over") if d != h_of[i.attr("group")]))
              if i.op == "rmsnorm" and i.attr("group") else i for i in p.instrs]
    return p if all(a is b for a, b in zip(instrs, p.instrs)) else p.with_instrs(instrs)


def plan_kernel(p: Program, target: str) -> KernelPlan:
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
        varies[i.name] = (scan in i.dims or i.op in STAGE_OPS + ("state",)
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
    return KernelPlan(p, form, scan, Q, grid, tile, split, group_of, inputs, states, hoisted, body, post, stores,
                      decl, pre)



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
    return KernelPlan(k.p, "rows", "~", None, rows + (g,), (h,) + over, (), {}, list(leaves.values()), [],
                      [norm2] + rest, [], [], stores, decl, [], {h: g})
