"""Error reporting: spec errors point at the offending token (line:col + caret), call-time ShapeErrors name the
arrays and sizes involved, unavailable targets raise TargetError. Bad specs are edits of examples/mamba2.ssm."""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

import ssmc
from ssmc import ShapeError, SpecError, SSMCError, TargetError

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
MAMBA2 = (EXAMPLES / "mamba2.ssm").read_text()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path / "ssmc-cache"))


def edit(old: str, new: str, text: str = MAMBA2) -> str:
    assert text.count(old) == 1, f"{old!r} must occur exactly once"
    return text.replace(old, new)


def where(text: str, needle: str, after: str = "") -> tuple[int, int]:
    """1-based (line, column) of the first `needle` at or after the first occurrence of `after`."""
    start = text.index(after) if after else 0
    i = text.index(needle, start)
    line = text.count("\n", 0, i) + 1
    col = i - (text.rfind("\n", 0, i) + 1) + 1
    return line, col


def spec_error(text: str, filename: str | None = None) -> SpecError:
    with pytest.raises(SpecError) as info:
        ssmc.check(text)
    return info.value


def assert_at(err: SpecError, text: str, line: int, col: int, *words: str):
    """The error is at line:col, the message starts `<spec>:line:col:`, shows that source line and a caret under
    the column, and mentions every word."""
    assert err.span is not None, str(err)
    assert (err.span.line, err.span.column) == (line, col), f"span {err.span} != {line}:{col}\n{err}"
    msg = str(err)
    lines = msg.splitlines()
    assert lines[0].startswith(f"<spec>:{line}:{col}: "), msg
    assert len(lines) >= 3, f"no source/caret lines:\n{msg}"
    src_line = text.splitlines()[line - 1]
    assert lines[1] == "  " + src_line, msg
    caret = lines[2]
    assert re.fullmatch(r" *\^+", caret), msg
    assert caret.index("^") == 2 + col - 1, f"caret not under column {col}:\n{msg}"
    for w in words:
        assert w in err.bare_message, f"{w!r} not in: {err.bare_message}"


# ---- spec errors ---------------------------------------------------------------------------------------

def test_syntax_error_missing_operand():
    text = edit("y = C·h + D*x", "y = C·h + * x")
    err = spec_error(text)
    line, col = where(text, "* x")
    assert_at(err, text, line, col, "syntax error", "unexpected '*'", "expected", "a name")
    assert line == 11


def test_syntax_error_dims_without_commas():
    text = edit("dims b, t, h, p, n, g", "dims b t, h, p, n, g")
    err = spec_error(text)
    line, col = where(text, "t,", after="dims b")
    assert_at(err, text, line, col, "unexpected 't'", "expected", "','")


def test_syntax_error_unclosed_bracket_at_end_of_line():
    text = edit("state h[b,h,p,n]", "state h[b,h,p,n")
    err = spec_error(text)
    line, _ = where(text, "state h")
    end_col = len(text.splitlines()[line - 1]) + 1
    assert_at(err, text, line, end_col, "unexpected end of line", "expected", "']'")


def test_error_names_the_file(tmp_path):
    p = tmp_path / "bad.ssm"
    p.write_text(edit("y = C·h + D*x", "y = C·h + * x"))
    with pytest.raises(SpecError) as info:
        ssmc.check(str(p))
    assert str(info.value).startswith(f"{p}:11:")


def test_undeclared_name():
    text = edit("y = C·h + D*x", "y = C·h + E*x")
    err = spec_error(text)
    assert_at(err, text, *where(text, "E*x"), "undeclared name 'E'")


def test_dim_in_array_decl_not_declared():
    text = edit("in x[b,t,h,p]", "in x[b,t,h,q]")
    err = spec_error(text)
    assert_at(err, text, *where(text, "q]"), "dim 'q'", "array 'x'", "not declared")


def test_statement_shape_mismatch_leaves_dim():
    text = edit("y = C·h + D*x", "y = C·h + B")
    err = spec_error(text)
    assert_at(err, text, *where(text, "C·h + B"), "'y'", "n would remain")


def test_state_never_assigned():
    text = edit("state h[b,h,p,n]", "state h[b,h,p,n], s2[b,h,p,n]")
    err = spec_error(text)
    assert_at(err, text, *where(text, "s2["), "state 's2' is never assigned")


def test_out_never_assigned():
    text = edit("out y[b,t,h,p]", "out y[b,t,h,p], y2[b,t,h,p]")
    err = spec_error(text)
    assert_at(err, text, *where(text, "y2["), "out 'y2' is never assigned")


def test_assignment_to_input():
    text = edit("  y = C·h + D*x\n", "  y = C·h + D*x\n  D = A*2\n")
    err = spec_error(text)
    assert_at(err, text, *where(text, "D = A"), "cannot assign to 'D'", "`in`")


def test_no_scan_dim():
    text = edit("  scan t                    # the recurrence runs along t\n", "")
    err = spec_error(text)
    assert_at(err, text, *where(text, "ssm mamba2"), "no scan dim", "scan t")


def test_no_input_has_the_scan_dim():
    text = edit("x[b,t,h,p], dt[b,t,h], A[h], B[b,t,g,n], C[b,t,g,n]", "x[b,h,p], dt[b,h], A[h], B[b,g,n], C[b,g,n]")
    err = spec_error(text)
    assert_at(err, text, *where(text, "t", after="scan "), "no `in` array has the scan dim 't'")


def test_group_with_undeclared_dim():
    text = edit("group g -> h", "group g -> k")
    err = spec_error(text)
    assert_at(err, text, *where(text, "k", after="group g ->"), "dim 'k'", "group", "not declared")


def test_group_with_undeclared_group_dim():
    text = edit("group g -> h", "group q -> h")
    err = spec_error(text)
    assert_at(err, text, *where(text, "q -> h"), "dim 'q'", "not declared")


def test_intermediate_contraction_without_shape():
    text = edit("  y = C·h + D*x\n", "  w = C·h\n  y = w + D*x\n")
    err = spec_error(text)
    assert_at(err, text, *where(text, "w = C·h"), "'w' uses ·", "declare its shape")


def test_unknown_function():
    text = edit("exp(dt*A)*h", "expo(dt*A)*h")
    err = spec_error(text)
    assert_at(err, text, *where(text, "expo("), "unknown function 'expo'", "exp")


def test_spec_errors_are_value_errors():
    assert issubclass(SpecError, SSMCError) and issubclass(SSMCError, ValueError)
    with pytest.raises(ValueError):
        ssmc.check(edit("exp(dt*A)*h", "expo(dt*A)*h"))


# ---- call-time shape errors ------------------------------------------------------------------------------

SIZES = dict(b=1, t=4, h=2, p=2, n=3, g=1)
SHAPES = {"x": "b t h p", "dt": "b t h", "A": "h", "B": "b t g n", "C": "b t g n", "D": "h"}


def mamba2_inputs(**override):
    sizes = {**SIZES, **override}
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal([sizes[d] for d in v.split()]).astype(np.float32) for k, v in SHAPES.items()}


@pytest.fixture
def mamba2():
    return ssmc.compile(str(EXAMPLES / "mamba2.ssm"))


def shape_error(kernel, /, **kw) -> str:
    with pytest.raises(ShapeError) as info:
        kernel(**kw)
    return str(info.value)


def test_valid_call_baseline(mamba2):
    y, h = mamba2(**mamba2_inputs())
    assert y.shape == (1, 4, 2, 2) and h.shape == (1, 2, 2, 3)


def test_wrong_rank(mamba2):
    xs = mamba2_inputs()
    xs["x"] = xs["x"][..., 0]
    msg = shape_error(mamba2, **xs)
    assert "'x'" in msg and "rank 3" in msg and "rank 4" in msg and "x[b,t,h,p]" in msg


def test_inconsistent_dim_sizes(mamba2):
    xs = mamba2_inputs()
    xs["dt"] = np.ones((1, 5, 2), np.float32)
    msg = shape_error(mamba2, **xs)
    assert "dim 't'" in msg
    assert "'x'" in msg and "'dt'" in msg, msg
    assert re.search(r"\b4\b", msg) and re.search(r"\b5\b", msg), msg


def test_missing_input(mamba2):
    xs = mamba2_inputs()
    del xs["D"]
    msg = shape_error(mamba2, **xs)
    assert "missing input" in msg and "D" in msg


def test_unknown_input(mamba2):
    msg = shape_error(mamba2, **mamba2_inputs(), E=np.ones(2, np.float32))
    assert "unknown input 'E'" in msg


def test_integer_dtype(mamba2):
    xs = mamba2_inputs()
    xs["A"] = np.array([1, 2], np.int32)
    msg = shape_error(mamba2, **xs)
    assert "'A'" in msg and "int32" in msg


def test_heads_not_multiple_of_groups(mamba2):
    xs = mamba2_inputs(h=3, g=2)
    msg = shape_error(mamba2, **xs)
    assert "group g -> h" in msg and "(3)" in msg and "(2)" in msg


def test_wrong_initial_state_shape(mamba2):
    msg = shape_error(mamba2, **mamba2_inputs(), initial_state=np.zeros((1, 2, 2, 4), np.float32))
    assert "initial state 'h'" in msg and "dim 'n'" in msg and "3" in msg and "4" in msg


def test_initial_state_on_two_state_spec():
    k = ssmc.compile(str(EXAMPLES / "linear_attention.ssm"))
    rng = np.random.default_rng(0)
    xs = {n: rng.standard_normal((1, 4, 2, 3)).astype(np.float32) for n in ("q", "k", "v")}
    k(**xs)  # the inputs themselves are fine
    msg = shape_error(k, **xs, initial_state=np.zeros((1, 2, 3, 3), np.float32))
    assert "2 states" in msg and "initial_states" in msg


# ---- targets ----------------------------------------------------------------------------------------------

def test_interpret_is_for_kernel_targets():
    with pytest.raises(SSMCError) as info:
        ssmc.compile(MAMBA2, target="xla", interpret=True)
    assert "interpret=True applies to the kernel targets" in str(info.value)


def test_unknown_target():
    with pytest.raises(TargetError) as info:
        ssmc.compile(MAMBA2, target="cuda9")
    assert "unknown target 'cuda9'" in str(info.value)
