"""expand-groups: make `group g -> h` an index map instead of a repeat.

mode=split (XLA): the mapped dim h becomes two dims (g, h/g) - head i is (i // (h/g), i % (h/g)) - so a value
  indexed by g broadcasts against one indexed by (g, h/g) with no copy; `expand` instructions disappear and a
  grouped rmsnorm normalises over (h/g, over...). The program records the split so emitters reshape at the edges.
mode=index (kernels): keep `expand` as an explicit index map `h -> h // (h/g)` for the kernel's address math.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ssmc.ir import Program


def split_name(h: str) -> str:
    return f"{h}/g"


def split_order(dims, group_of_h: dict) -> tuple[str, ...]:
    """Canonical dim order after splitting each h into (g, h/g) at h's place (g moves there)."""
    out: list[str] = []
    for d in dims:
        parts = (group_of_h[d], split_name(d)) if d in group_of_h else (d,)
        out.extend(x for x in parts if x not in out)
    return tuple(out)


@dataclass(frozen=True)
class ExpandGroups:
    mode: str = "split"
    name = "expand-groups"

    def run(self, p: Program) -> Program:
        if not p.groups:
            return p
        if self.mode == "index":
            instrs = [i.with_attrs(map=f"{i.attr('to')} // ({i.attr('to')}/{i.attr('group')})")
                      if i.op == "expand" else i for i in p.instrs]
            return p.with_instrs(instrs, note="expand-groups: group reads stay index maps (no repeat)")
        if self.mode != "split":
            raise ValueError(f"expand-groups: unknown mode '{self.mode}' (split or index)")
        ren = {h: (g, split_name(h)) for g, h in p.groups}
        dims = split_order(p.dims, {h: g for g, h in p.groups})

        def newdims(ds):
            out = []
            for d in ds:
                out.extend(ren.get(d, (d,)))
            s = set(out)
            return tuple(d for d in dims if d in s)

        alias: dict[str, str] = {}
        instrs = []
        for i in p.instrs:
            args = tuple(alias.get(a, a) for a in i.args)
            if i.op == "expand":
                alias[i.name] = args[0]
                continue
            i = replace(i, args=args, dims=newdims(i.dims))
            if i.op == "rmsnorm" and i.attr("group"):
                g = i.attr("group")
                h = dict(p.groups)[g]
                over = newdims((split_name(h),) + tuple(i.attr("over")))
                i = i.with_attrs(over=tuple(d for d in over if d != g), group=None)
            if i.op == "reduce":
                i = i.with_attrs(over=newdims(i.attr("over")))
            instrs.append(i)
        splits = ", ".join(f"{h} -> ({g}, {split_name(h)})" for g, h in p.groups)
        return p.with_instrs(instrs, note=f"expand-groups: split {splits}; group-indexed values broadcast, no repeat",
                             dims=tuple(dims))
