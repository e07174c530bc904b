"""Meaning of the spec (issue 10, item 6): `·` contracts dims its operands share. A dim `·` would sum that only one
operand has changes the meaning silently (a transition A[h,dk,dk2] against S computes rowsum(A)*S; an out that
lacks a state dim sums it), so it is a SpecError at that operand with a hint; an explicit sum(...) still works."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

import ssmc
from ssmc import SpecError

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

HEAD = """ssm s {
  dims b, t, h, dk, dk2, dv
  scan t
  in q[b,t,h,dk], k[b,t,h,dk], v[b,t,h,dv], A[h,dk,dk2]
"""


def _at(text, needle, after=""):
    i = text.index(needle, text.index(after) if after else 0)
    return text.count("\n", 0, i) + 1, i - (text.rfind("\n", 0, i) + 1) + 1


def _error(text) -> SpecError:
    with pytest.raises(SpecError) as info:
        ssmc.check(text)
    return info.value


def _assert_at(err, text, needle, after, *words):
    line, col = _at(text, needle, after)
    assert (err.span.line, err.span.column) == (line, col), str(err)
    lines = str(err).splitlines()
    assert lines[0].startswith(f"<spec>:{line}:{col}: "), str(err)
    assert lines[1].strip() == text.splitlines()[line - 1].strip()
    assert lines[2].index("^") - 2 == col - 1, str(err)  # the caret under the operand
    for w in words:
        assert w in lines[0], (w, str(err))


def test_transition_matrix_with_a_dim_the_state_lacks():
    """S = A·S with A[h,dk,dk2]: dk2 is only A's, so `·` would sum A's rows (rowsum(A)*S) silently."""
    text = HEAD + """  state S[b,h,dk,dv]
  out o[b,t,h,dv]
  S = A·S + k⊗v
  o = q·S
}"""
    err = _error(text)
    _assert_at(err, text, "A·S", "S = ", "'dk2'", "only 'A' [h,dk,dk2]", "'S' [b,h,dk,dv]",
               "sum(A, over=[dk2])", "shape of 'S' [b,h,dk,dv]")


def test_out_that_lacks_a_state_dim():
    """out o[b,t,h,dk] = q·S sums dv, which only S has."""
    text = HEAD + """  state S[b,h,dk,dv]
  out o[b,t,h,dk]
  S = S + k⊗v
  o = q·S
}"""
    err = _error(text)
    _assert_at(err, text, "S\n}", "o = q·", "'dv'", "only 'S' [b,h,dk,dv]", "not 'q' [b,t,h,dk]",
               "sum(S, over=[dv])", "shape of 'o' [b,t,h,dk]")


def test_dot_call_and_an_expression_operand():
    """dot(q, 2*S) with the same slip points at the expression operand."""
    text = HEAD + """  state S[b,h,dk,dv]
  out o[b,t,h,dk]
  S = S + k⊗v
  o = dot(q, 2*S)
}"""
    err = _error(text)
    _assert_at(err, text, "2*S", "o = dot", "'dv'", "the operand [b,t,h,dk,dv]", "sum(..., over=[dv])")


def test_explicit_sum_is_the_way_to_say_it():
    """The meaning the slip had, written on purpose, compiles and computes rowsum(A)*S."""
    text = HEAD + """  state S[b,h,dk,dv]
  out o[b,t,h,dv]
  S = sum(A, over=[dk2])*S + k⊗v
  o = q·S
}"""
    rng = np.random.default_rng(0)
    b, t, h, dk, dk2, dv = 2, 5, 2, 3, 4, 3
    x = dict(q=rng.standard_normal((b, t, h, dk)), k=rng.standard_normal((b, t, h, dk)),
             v=rng.standard_normal((b, t, h, dv)), A=rng.uniform(0, 0.25, (h, dk, dk2)))
    o, S = ssmc.compile(text)(**{n: a.astype(np.float32) for n, a in x.items()})
    a = x["A"].sum(-1)
    Sr = np.zeros((b, h, dk, dv))
    orf = np.zeros((b, t, h, dv))
    for s in range(t):
        Sr = a[None, :, :, None] * Sr + np.einsum("bhk,bhv->bhkv", x["k"][:, s], x["v"][:, s])
        orf[:, s] = np.einsum("bhk,bhkv->bhv", x["q"][:, s], Sr)
    np.testing.assert_allclose(np.asarray(S), Sr, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(o), orf, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.ssm")), ids=lambda p: p.stem)
def test_examples_still_check(path):
    ssmc.check(path)
