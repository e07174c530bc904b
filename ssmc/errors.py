"""Error types. Every ssmc error is a ValueError subclass so callers can catch one thing."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A place in the spec text: 1-based line/column of the start, and the end column on that line."""

    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.line}:{self.column}"


class SSMCError(ValueError):
    """Base class of all ssmc errors."""


class SpecError(SSMCError):
    """A problem in the spec text; the message carries line:column and a caret line."""

    def __init__(self, message: str, span: Span | None = None, source: str | None = None, filename: str = "<spec>"):
        self.span = span
        self.bare_message = message
        super().__init__(format_at(message, span, source, filename))


class ShapeError(SSMCError):
    """A problem with the arrays passed at call time (names, ranks, dim sizes, dtypes)."""


class TargetError(SSMCError):
    """A target that is unknown or not available on this machine."""


def format_at(message: str, span: Span | None, source: str | None, filename: str = "<spec>") -> str:
    """`file:line:col: message` followed by the source line and a caret under the span."""
    if span is None:
        return message
    head = f"{filename}:{span.line}:{span.column}: {message}"
    if not source:
        return head
    lines = source.splitlines()
    if not 1 <= span.line <= len(lines):
        return head
    text = lines[span.line - 1]
    width = span.end_column - span.column if span.end_line == span.line else len(text) - span.column + 1
    caret = " " * (span.column - 1) + "^" * max(1, width)
    return f"{head}\n  {text}\n  {caret}"
