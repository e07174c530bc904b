"""The IR: a dataflow graph of typed instructions over named dims.

A Program holds SSA instructions in a valid order (every operand defined before use). Each Instr is one small
frozen node: op, operands, named result dims, dtype, attributes and the source span it came from, so a pass can
point an error at the spec line. The graph view (networkx) is rebuilt on demand for verification, ordering and
DOT output; it is never used as a cache key - the printed text is.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import networkx as nx

from .errors import Span, SSMCError
from .ops import BINARY, UNARY

# op -> number of operands (None: variadic). Ops introduced by passes are registered by them via OP_ARITY too.
ELEMENTWISE_UNARY, ELEMENTWISE_BINARY = UNARY, BINARY  # ssmc/ops.py: the table of elementwise ops
OP_ARITY: dict[str, int | None] = {
    "input": 0, "const": 0, "state": 0,           # leaves: an `in` array, a literal, a state entering the step
    "window": 0,                                  # leaf: a conv window state entering the call (attrs state, k, dim)
    "conv": 3,                                    # causal conv over the scan dim: (x, w, window) (attrs over, k)
    "conv.window": 2,                             # the window after the call: last k-1 inputs of (window, x)
    **{op: 1 for op in ELEMENTWISE_UNARY},
    **{op: 2 for op in ELEMENTWISE_BINARY},
    "clamp": 3,
    "contract": None,                             # multiply all operands, sum dims absent from the result
    "reduce": 1,                                  # sum / mean over dims (attrs kind, over)
    "rmsnorm": 1,                                 # attrs over, group, eps
    "expand": 1,                                  # read a group-indexed value at the dim it maps to (g -> h)
    "split": 1, "merge": 1,                       # reshape h <-> (g, h/g): group expansion without a repeat
    "update": 1, "out": 1,                        # sinks: the state after this step, an out's value
}
SINKS = ("update", "out", "final")


@dataclass(frozen=True)
class Instr:
    name: str
    op: str
    args: tuple[str, ...] = ()
    dims: tuple[str, ...] = ()
    attrs: tuple = ()  # sorted ((key, value), ...): hashable, printable
    span: Span | None = field(default=None, compare=False)
    dtype: str = "f32"

    def attr(self, key, default=None):
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    def with_attrs(self, **kw) -> "Instr":
        d = dict(self.attrs)
        d.update(kw)
        return replace(self, attrs=tuple(sorted(d.items())))


def union_dims(by: dict, names) -> set[str]:
    """The union of the dims of the named values (`by`: name -> Instr)."""
    return set().union(*(set(by[n].dims) for n in names))


def make(name, op, args=(), dims=(), span=None, **attrs) -> Instr:
    return Instr(name, op, tuple(args), tuple(dims), tuple(sorted(attrs.items())), span)


@dataclass(frozen=True)
class Array:
    """A declared in/state/out array: its name and dims (as written in the spec)."""
    name: str
    dims: tuple[str, ...]
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Program:
    name: str
    dims: tuple[str, ...]                 # canonical dim order; every value's dims follow it
    scan: str
    groups: tuple[tuple[str, str], ...]   # ((g, h), ...)
    inputs: tuple[Array, ...]
    states: tuple[Array, ...]
    outs: tuple[Array, ...]
    instrs: tuple[Instr, ...]
    notes: tuple[str, ...] = ()           # decisions passes made and why (printed as comments)
    source: str = field(default="", compare=False, repr=False)
    filename: str = field(default="<spec>", compare=False, repr=False)
    reverse: bool = False                 # the scan walks from the last step to the first (the derived adjoint's)

    # ---- lookups -------------------------------------------------------------------------------------
    def by_name(self) -> dict[str, Instr]:
        return {i.name: i for i in self.instrs}

    def fp32_outs(self) -> tuple[str, ...]:
        """Outs kept in float32 whatever the call's out dtype (attr fp32 on the out: the derived backward's decay
        cotangents and readout terms, passes/adjoint.py); every target's emitter honours it."""
        return tuple(i.attr("out") for i in self.instrs if i.op == "out" and i.attr("fp32"))

    def users(self) -> dict[str, list[Instr]]:
        u: dict[str, list[Instr]] = {i.name: [] for i in self.instrs}
        for i in self.instrs:
            for a in i.args:
                u.setdefault(a, []).append(i)
        return u

    def graph(self) -> nx.DiGraph:
        """A fresh dataflow graph: nodes are value names (attr `instr`), edges operand -> user (attr `pos`)."""
        g = nx.DiGraph()
        for i in self.instrs:
            g.add_node(i.name, instr=i)
        for i in self.instrs:
            for pos, a in enumerate(i.args):
                g.add_edge(a, i.name, pos=pos)
        return g

    def with_instrs(self, instrs, note: str | None = None, **kw) -> "Program":
        notes = self.notes + ((note,) if note else ())
        return replace(self, instrs=tuple(instrs), notes=notes, **kw)

    def order(self, dims) -> tuple[str, ...]:
        """Sort a set of dims into the program's canonical order."""
        s = set(dims)
        unknown = s - set(self.dims)
        if unknown:
            raise SSMCError(f"internal: dims {sorted(unknown)} not in program dims {self.dims}")
        return tuple(d for d in self.dims if d in s)

    def text(self) -> str:
        return print_program(self)


def _fmt_attr(v) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(_fmt_attr(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def print_instr(i: Instr) -> str:
    lhs = f"{i.name} = " if i.op not in SINKS else ""
    args = ", ".join(i.args)
    attrs = " {" + ", ".join(f"{k}={_fmt_attr(v)}" for k, v in i.attrs) + "}" if i.attrs else ""
    at = f"  @{i.span}" if i.span else ""
    return f"{lhs}{i.op}{(' ' + args) if args else ''}{attrs} : [{','.join(i.dims)}] {i.dtype}{at}"


def print_program(p: Program) -> str:
    def arrs(kind, xs):
        return [f"  {kind} " + ", ".join(f"{a.name}[{','.join(a.dims)}]" for a in xs)] if xs else []

    lines = [f"ssm {p.name} {{", f"  dims {', '.join(p.dims)}", f"  scan {p.scan}" + (" reverse" if p.reverse else "")]
    lines += [f"  group {g} -> {h}" for g, h in p.groups]
    lines += arrs("in", p.inputs) + arrs("state", p.states) + arrs("out", p.outs)
    lines += [f"  # {n}" for n in p.notes]
    stage = None
    for i in p.instrs:
        s = i.attr("stage")
        if s != stage and s is not None:
            lines.append(f"  // stage {s}")
            stage = s
        lines.append("  " + print_instr(i))
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_dot(p: Program) -> str:
    """Graphviz DOT text of the dataflow graph (deterministic order)."""
    g = p.graph()
    out = [f'digraph "{p.name}" {{', "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
    for n in nx.lexicographical_topological_sort(g):
        i = g.nodes[n]["instr"]
        label = f"{i.name}\\n{i.op} [{','.join(i.dims)}]".replace('"', "'")
        shape = ', shape=ellipse' if i.op in ("input", "state", "window", "const") else (', shape=house' if i.op in SINKS else "")
        out.append(f'  "{n}" [label="{label}"{shape}];')
    for a, b, d in sorted(g.edges(data=True)):
        out.append(f'  "{a}" -> "{b}" [label="{d["pos"]}"];')
    out.append("}")
    return "\n".join(out) + "\n"


class VerifyError(SSMCError):
    pass


def verify(p: Program, pass_name: str = "") -> None:
    """Structural checks run after every pass: SSA, operands defined before use, arity, dims, acyclic, sinks."""
    where = f" after pass '{pass_name}'" if pass_name else ""
    seen: set[str] = set()
    known_dims = set(p.dims)
    for i in p.instrs:
        def fail(msg):
            raise VerifyError(f"IR verification failed{where}: {msg}\n  at: {print_instr(i)}")
        if i.name in seen:
            fail(f"value {i.name} defined twice")
        if i.op not in OP_ARITY:
            fail(f"unknown op '{i.op}'")
        n = OP_ARITY[i.op]
        if n is not None and len(i.args) != n:
            fail(f"op '{i.op}' takes {n} operands, got {len(i.args)}")
        for a in i.args:
            if a not in seen:
                fail(f"operand {a} used before it is defined")
        if not set(i.dims) <= known_dims:
            fail(f"dims {sorted(set(i.dims) - known_dims)} are not program dims")
        if tuple(i.dims) != p.order(i.dims):
            fail(f"dims {i.dims} are not in canonical order {p.order(i.dims)}")
        seen.add(i.name)
    # Acyclic by the check above: every operand is defined earlier in the list (no graph needed per pass).
    updated = [i.attr("state") for i in p.instrs if i.op in ("update", "final")]
    for s in p.states:
        if updated.count(s.name) != 1:
            raise VerifyError(f"IR verification failed{where}: state {s.name} has {updated.count(s.name)} "
                              f"update/final sinks, expected 1")


def dce(p: Program) -> Program:
    """Drop instructions no sink depends on."""
    live: set[str] = set()
    by = p.by_name()
    stack = [i.name for i in p.instrs if i.op in SINKS or i.attr("keep")]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(by[n].args)
    return p.with_instrs([i for i in p.instrs if i.name in live])


class Namer:
    """Fresh SSA names that don't collide with a program's existing ones."""

    def __init__(self, taken):
        self.taken = set(taken)
        self.n = 0

    def __call__(self, hint: str | None = None) -> str:
        if hint:
            base = f"%{hint}"
            name, k = base, 1
            while name in self.taken:
                k += 1
                name = f"{base}.{k}"
        else:
            while True:
                self.n += 1
                name = f"%{self.n}"
                if name not in self.taken:
                    break
        self.taken.add(name)
        return name
