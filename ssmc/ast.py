"""Syntax tree of a spec: plain frozen dataclasses, each carrying its source span."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span


@dataclass(frozen=True)
class Name:
    name: str
    span: Span


@dataclass(frozen=True)
class Num:
    value: float
    span: Span


@dataclass(frozen=True)
class Var:
    name: str
    span: Span


@dataclass(frozen=True)
class BinOp:
    op: str  # add sub mul div outer dot pow
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple
    kwargs: tuple  # ((name, Expr | tuple[Name, ...], span), ...)
    span: Span


Expr = Num | Var | BinOp | Neg | Call


@dataclass(frozen=True)
class ArrayDecl:
    kind: str  # in / state / out
    name: str
    dims: tuple  # tuple[Name, ...]
    span: Span


@dataclass(frozen=True)
class Assign:
    target: str
    dims: tuple | None  # declared shape of an intermediate, tuple[Name, ...]
    expr: Expr
    span: Span
    target_span: Span


@dataclass(frozen=True)
class Spec:
    name: str
    dims: tuple  # tuple[Name, ...]
    scan: Name | None
    groups: tuple  # ((Name g, Name h, Span), ...)
    arrays: tuple  # tuple[ArrayDecl, ...] in declaration order
    body: tuple  # tuple[Assign, ...]
    span: Span
    source: str = field(repr=False, compare=False, default="")
    filename: str = field(repr=False, compare=False, default="<spec>")

    def decls(self, kind: str) -> list[ArrayDecl]:
        return [a for a in self.arrays if a.kind == kind]
