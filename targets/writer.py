"""An indented source writer, and the naming helpers every emitter shares."""
from __future__ import annotations

import contextlib
import keyword
import string


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


# Names the generated code uses for itself; a spec value with one of these names gets a trailing underscore.
RESERVED = {"jax", "jnp", "lax", "np", "rt", "T", "Tp", "Q", "nc", "valid", "math", "tl", "triton", "pl", "pltpu",
            "HI", "PARAMS", "RETURNS", "S", "a", "s", "y_t", "inp", "xs", "carry", "step"}


def py_name(ssa: str) -> str:
    """SSA value name -> a readable Python identifier: %dt -> dt, %h.new -> h_new, %3 -> v3."""
    n = ssa.lstrip("%").replace(".", "_").replace("#", "c").replace("/", "_")
    if not n or n[0].isdigit():
        n = "v" + n
    if keyword.iskeyword(n) or n in RESERVED:
        n = n + "_"
    return n


class Names:
    """A unique Python identifier per SSA value: the spec's own names first (inputs, states, named statements),
    temporaries after, with a numeric suffix wherever two would collide (`%1` -> v1 vs an input named v1)."""

    def __init__(self, instrs):
        self.table: dict[str, str] = {}
        taken: set[str] = set()
        ordered = sorted(instrs, key=lambda i: (i.op not in ("input", "state"), i.name[1:].isdigit()))
        for i in ordered:
            base = py_name(i.name)
            name, k = base, 1
            while name in taken:
                k += 1
                name = f"{base}_{k}"
            taken.add(name)
            self.table[i.name] = name

    def __call__(self, ssa: str) -> str:
        return self.table.get(ssa) or py_name(ssa)


def dim_letters(dims) -> dict[str, str]:
    """One einsum letter per dim: its first letter when free, else the next free one; `s` stays free for the
    source position of in-chunk sums."""
    taken = {"s"}
    out = {}
    dims = [d for d in dims if "#" not in d] + [d for d in dims if "#" in d]  # the scan dim keeps its letter
    for d in dims:
        c = "c" if "#" in d else d[0]
        if c in taken or c not in string.ascii_letters:
            c = next(x for x in string.ascii_lowercase + string.ascii_uppercase if x not in taken)
        taken.add(c)
        out[d] = c
    return out
