"""An indented source writer, and the name table every emitter draws its identifiers from."""
from __future__ import annotations

import ast
import builtins
import contextlib
import itertools
import keyword
import math
import string

from ssmc.errors import TargetError


class Writer:
    def __init__(self, indent: str = "    "):
        self.lines: list[str] = []
        self.level = 0
        self.indent = indent

    def __call__(self, text: str = "") -> None:
        for ln in text.split("\n"):
            self.lines.append(self.indent * self.level + ln if ln else "")

    @contextlib.contextmanager
    def block(self, header: str):
        self(header)
        self.level += 1
        try:
            yield
        finally:
            self.level -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def py_name(ssa: str) -> str:
    """An SSA value name (or any text) -> a readable identifier stem: %dt -> dt, %h.new -> h_new, %3 -> v3.
    Only a stem: `Names` decides the identifier (keywords and taken names get a suffix there)."""
    n = "".join(c if c.isalnum() or c == "_" else "_" for c in ssa.lstrip("%").replace("#", "c"))
    n = "".join(c if c.isascii() else "_" for c in n)
    if not n or n[0].isdigit():
        n = "v" + n
    return n


def py_const(v: float) -> str:
    """A float constant as Python source (an operand anywhere: negatives in parentheses, never a bare inf)."""
    v = float(v)
    if math.isnan(v):
        return "float('nan')"
    if math.isinf(v):
        return "float('inf')" if v > 0 else "(-float('inf'))"
    return repr(v) if v >= 0 or (v == 0 and math.copysign(1, v) > 0) else f"({v!r})"


# What Python itself binds in every module: keywords (soft ones too: `_` is the emitters' throwaway target),
# builtins. Dunder names are reserved by rule in `Names.free`.
PYTHON_NAMES = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins))


class Names:
    """The identifiers of one generated module, collision-free by construction.

    Every identifier the emitted code binds or reads comes from this table: first the reserved ones (Python's
    keywords and builtins, the module's imports and globals, and the fixed names an emitter writes literally,
    passed as `reserved`), then the spec's values (inputs and states first, then named statements, temporaries
    last), then every local an emitter derives (`local(owner, what)`, `dim(prefix, d)`, `temp(hint)`), each
    taking the first free spelling of its hint: hint, hint_, hint_2, hint_3, ... So a spec value named `mm`,
    `_`, `valid` or `h_L_chunk` and the emitter's own `mm`, `_`, `valid` or chunk decay of `h_L` never meet.
    A module of several functions (kernel, launcher) keeps its globals in the module table and gives each
    function its own `scope(instrs)`: a child table that holds the module's identifiers, maps the spec values
    that function uses and allocates its locals apart from its siblings' (the launcher's `y` is the out array,
    the kernel's `y` a tile of it).
    `verify(source)` checks the result: every identifier in the source is one the table handed out."""

    def __init__(self, instrs=(), reserved=()):
        self.taken: set[str] = set(PYTHON_NAMES) | set(reserved)
        self.table: dict = {}
        self.children: list[Names] = []
        self.premap(instrs)

    def premap(self, instrs):
        """Map values before any local is made up: the spec's names first (inputs and states, then named
        statements), temporaries (%3 -> v3) last."""
        values = [i for i in instrs if i.op not in ("out", "update", "final")]  # sinks have no variable
        for i in sorted(values, key=lambda i: (i.op not in ("input", "state"), i.name[1:].isdigit())):
            self(i.name)

    def scope(self, instrs=()) -> "Names":
        """A table for one function of the module: the module's identifiers, then `instrs`' values (more are
        mapped on first use), then locals of its own."""
        child = Names()
        child.taken, child.table = set(self.taken), dict(self.table)
        child.premap(instrs)
        self.children.append(child)
        return child

    def all_taken(self) -> set[str]:
        return self.taken.union(*(c.all_taken() for c in self.children))

    def reserve(self, *names: str) -> None:
        """Names the emitter writes literally. Only before any allocation: a reserved name must not be held."""
        held = [n for n in names if n in self.table.values()]
        if held:
            raise AssertionError(f"internal: reserving {held}, already handed out")
        self.taken.update(names)

    def free(self, name: str) -> bool:
        return name not in self.taken and not (name.startswith("__") and name.endswith("__"))

    def fresh(self, hint: str) -> str:
        """A new identifier from `hint` (not memoised)."""
        base = py_name(hint)
        for cand in itertools.chain((base, base + "_"), (f"{base}_{k}" for k in itertools.count(2))):
            if self.free(cand):
                self.taken.add(cand)
                return cand
        raise AssertionError("unreachable")  # pragma: no cover

    def get(self, key, hint: str) -> str:
        """The identifier of `key`, allocated from `hint` on first use."""
        name = self.table.get(key)
        if name is None:
            name = self.table[key] = self.fresh(hint)
        return name

    def __call__(self, ssa: str) -> str:
        """The identifier of an SSA value."""
        return self.get(ssa, py_name(ssa))

    def local(self, owner: str, what: str) -> str:
        """A local derived from an SSA value (or a state name): `local('%h.L', 'chunk')` -> h_L_chunk."""
        return self.get(("local", owner, what), f"{self(owner) if owner.startswith('%') else py_name(owner)}_{what}")

    def dim(self, prefix: str, d: str) -> str:
        """A name per dim: `dim('N', 'h')` -> N_h (sizes), o_h (offsets), i_h (program index), ..."""
        return self.get(("dim", prefix, d), f"{prefix}_{py_name(d)}")

    def key(self, key, hint: str) -> str:
        return self.get(("key", key), hint)

    temp = fresh  # a one-off temporary (c1, ms2, ...)

    def verify(self, source: str) -> None:
        """Every identifier the source binds or reads was handed out or reserved here (an emitter that pastes
        an identifier together by hand would be caught by the tests that compile renamed specs)."""
        stray, taken = set(), self.all_taken()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Name):
                n = node.id
            elif isinstance(node, ast.arg):
                n = node.arg
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                n = node.name
            elif isinstance(node, ast.alias):
                n = node.asname or node.name.split(".")[0]
            else:
                continue
            if n not in taken:
                stray.add(n)
        if stray:
            raise AssertionError(f"internal: generated identifiers {sorted(stray)} did not come from the name table")


class Letters(dict):
    """One einsum letter per dim (dim -> letter); a dim beyond the 52 letters raises a TargetError on use."""

    def __missing__(self, d):
        raise TargetError(f"xla target: a chunked program names each dim of its einsums by one letter; dim '{d}' "
                          f"is past the {len(self)} available (the program has more dims than letters); compile "
                          f"with chunk_size=1 (sequential form) or on a kernel target")


def dim_letters(dims) -> dict[str, str]:
    """One einsum letter per dim: its first letter when free, else the next free one; `s` stays free for the
    source position of in-chunk sums."""
    taken = {"s"}
    out = Letters()
    dims = [d for d in dims if "#" not in d] + [d for d in dims if "#" in d]  # the scan dim keeps its letter
    for d in dims:
        c = "c" if "#" in d else d[0]
        if c in taken or c not in string.ascii_letters:
            c = next((x for x in string.ascii_lowercase + string.ascii_uppercase if x not in taken), None)
            if c is None:
                break
        taken.add(c)
        out[d] = c
    return out
