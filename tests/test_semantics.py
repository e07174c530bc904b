"""Meaning of the spec (issue 10, item 6): `·` contracts dims its operands share. A dim `·` would sum that only one
operand has changes the meaning silently (a transition A[h,dk,dk2] against S computes rowsum(A)*S; an out that
lacks a state dim sums it), so it is a SpecError at that operand with a hint; an explicit sum(...) still works."""
from __future__ import annotations

import pathlib
import re
import warnings

import numpy as np
import pytest

import ssmc
from ssmc import SpecError
from reference import rel_l2

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


def _error_at(body, needle, after, *words):
    """The spec HEAD + body is a SpecError at `needle` (the first after `after`) whose message holds `words`."""
    text = HEAD + body
    _assert_at(_error(text), text, needle, after, *words)


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
    _error_at("""  state S[b,h,dk,dv]
  out o[b,t,h,dv]
  S = A·S + k⊗v
  o = q·S
}""", "A·S", "S = ", "'dk2'", "only 'A' [h,dk,dk2]", "'S' [b,h,dk,dv]",
              "sum(A, over=[dk2])", "shape of 'S' [b,h,dk,dv]")


def test_out_that_lacks_a_state_dim():
    """out o[b,t,h,dk] = q·S sums dv, which only S has."""
    _error_at("""  state S[b,h,dk,dv]
  out o[b,t,h,dk]
  S = S + k⊗v
  o = q·S
}""", "S\n}", "o = q·", "'dv'", "only 'S' [b,h,dk,dv]", "not 'q' [b,t,h,dk]",
              "sum(S, over=[dv])", "shape of 'o' [b,t,h,dk]")


def test_dot_call_and_an_expression_operand():
    """dot(q, 2*S) with the same slip points at the expression operand."""
    _error_at("""  state S[b,h,dk,dv]
  out o[b,t,h,dk]
  S = S + k⊗v
  o = dot(q, 2*S)
}""", "2*S", "o = dot", "'dv'", "the operand [b,t,h,dk,dv]", "sum(..., over=[dv])")


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


# ---- fusion and diagnostics (issue 10, item 9) ----------------------------------------------------------------------
HGRN2 = """ssm hgrn2 {
  dims b, t, h, dk, dv
  scan t
  in q[b,t,h,dk], f_raw[b,t,h,dk], v[b,t,h,dv], beta[b,t,h]
  state S[b,h,dk,dv]
  out o[b,t,h,dv]
  f = sigmoid(f_raw)
  S = f*S + UPDATE
  o = q·S
}"""
UPDATES = {"one_minus": "(1 - f)⊗v", "sigmoid": "sigmoid(-f_raw)⊗v", "nested": "((1 - f)*(beta + 1))⊗(2*v)"}


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _hgrn2_loop(x, form):
    f = _sig(x["f_raw"])
    u = {"one_minus": lambda t: np.einsum("bhk,bhv->bhkv", 1 - f[:, t], x["v"][:, t]),
         "sigmoid": lambda t: np.einsum("bhk,bhv->bhkv", _sig(-x["f_raw"][:, t]), x["v"][:, t]),
         "nested": lambda t: np.einsum("bhk,bh,bhv->bhkv", 1 - f[:, t], x["beta"][:, t] + 1, 2 * x["v"][:, t])}[form]
    b, T, h, dk = x["q"].shape
    S = np.zeros((b, h, dk, x["v"].shape[-1]))
    o = np.zeros((b, T, h, x["v"].shape[-1]))
    for t in range(T):
        S = f[:, t][..., None] * S + u(t)
        o[:, t] = np.einsum("bhk,bhkv->bhv", x["q"][:, t], S)
    return o, S


def _materialised(ir: str, dims) -> list[str]:
    """IR lines whose value has all of `dims` (a per-step outer product would have t, dk and dv)."""
    out = []
    for line in ir.splitlines():
        m = re.search(r": \[([^\]]*)\] \w+\s+@", line)
        if m and set(dims) <= set(m.group(1).split(",")):
            out.append(line.strip())
    return out


@pytest.mark.parametrize("target", ["xla", pytest.param("triton", marks=pytest.mark.slow),
                                    pytest.param("tpu", marks=pytest.mark.slow)])
@pytest.mark.parametrize("form", sorted(UPDATES))
def test_update_factors_stay_out_of_the_outer_product(rng, form, target):
    """(1 - f)⊗v, written any way, enters the chunk stages as its factors: no [b,t,h,dk,dv] value in the IR
    (before: the whole outer product was one materialised factor, 218 ms against 29 ms on the H100 issue's size)."""
    text = HGRN2.replace("UPDATE", UPDATES[form])
    opts = {"interpret": True} if target != "xla" else {}
    k = ssmc.compile(text, target=target, **opts)
    assert "# chunk: chunk-parallel form" in k.ir
    assert not _materialised(k.ir, ("t", "dk", "dv")), _materialised(k.ir, ("t", "dk", "dv"))
    b, T, h, dk, dv = 2, 37, 2, 8, 4
    x = dict(q=rng.standard_normal((b, T, h, dk)), f_raw=rng.standard_normal((b, T, h, dk)) + 2,
             v=rng.standard_normal((b, T, h, dv)), beta=rng.standard_normal((b, T, h)))
    o, S = k(**{n: a.astype(np.float32) for n, a in x.items()})
    ro, rS = _hgrn2_loop(x, form)
    assert rel_l2(np.asarray(o), ro) < 1e-4 and rel_l2(np.asarray(S), rS) < 1e-4


HGRN = """ssm hgrn {
  dims b, t, d
  scan t
  in x[b,t,d], f_raw[b,t,d]
  state hs[b,d]
  out y[b,t,d]
  f = sigmoid(f_raw)
  hs = f*hs + (1 - f)*x
  y = hs
}"""


def test_chunk_size_for_a_spec_without_a_chunked_form_warns(rng):
    """HGRN's readout is the whole state: no chunked form. A chunk_size is then ignored, with a UserWarning and a
    note in the IR (not an error: code that passes one chunk_size to every spec keeps working)."""
    with pytest.warns(UserWarning, match=r"chunk_size=32 is ignored for 'hgrn'.*sequential scan.*reads the whole"):
        k = ssmc.compile(HGRN, chunk_size=32)
    assert "# chunk: sequential scan, not chunkable (chunk_size 32 ignored):" in k.ir
    b, T, d = 2, 9, 5
    x = dict(x=rng.standard_normal((b, T, d)), f_raw=rng.standard_normal((b, T, d)))
    y, hs = k(**{n: a.astype(np.float32) for n, a in x.items()})
    h = np.zeros((b, d))
    for t in range(T):
        f = _sig(x["f_raw"][:, t])
        h = f * h + (1 - f) * x["x"][:, t]
        assert rel_l2(np.asarray(y[:, t]), h) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without a chunk_size, with chunk_size=1, or when it is used
        ssmc.compile(HGRN)
        ssmc.compile(HGRN, chunk_size=1)
        ssmc.compile(HGRN2.replace("UPDATE", UPDATES["sigmoid"]), chunk_size=8)


GSA = """ssm gsa {
  dims b, t, h, dk, m, dv
  scan t
  in q[b,t,h,dk], k[b,t,h,dk], v[b,t,h,dv], f[b,t,h,m]
  state K[b,h,dk,m], V[b,h,m,dv]
  out o[b,t,h,dv]
  a = sigmoid(f)
  K = a*K + k⊗(1 - a)
  V = a*V + (1 - a)⊗v
  s[b,t,h,m] = q·K
  e = exp(s)
  p = e / sum(e, over=[m])
  o = p·V
}"""


def test_gsa_second_state_reason_and_class(rng):
    """Gated slot attention: V's query p = softmax(q·K) comes from K's readout. V is key-wise (contracted over the
    slots m), and the reason names the cross-state query, not 'reads the whole state'."""
    k = ssmc.compile(GSA)
    assert "# classify: state V is key-wise (decay dims [b,t,h,m], contracted [m], kept [dv])" in k.ir, k.ir
    assert "reads the whole state" not in k.ir
    line, col = _at(GSA, "p·V")
    assert (f"state 'V' is contracted over [m] at {line}:{col} with a query computed from state K") in k.ir, k.ir
    b, T, h, dk, m, dv = 2, 7, 2, 4, 3, 5
    x = dict(q=rng.standard_normal((b, T, h, dk)), k=rng.standard_normal((b, T, h, dk)),
             v=rng.standard_normal((b, T, h, dv)), f=rng.standard_normal((b, T, h, m)))
    o, K, V = k(**{n: a.astype(np.float32) for n, a in x.items()})
    Kr, Vr = np.zeros((b, h, dk, m)), np.zeros((b, h, m, dv))
    for t in range(T):
        a = _sig(x["f"][:, t])
        Kr = a[:, :, None, :] * Kr + np.einsum("bhk,bhm->bhkm", x["k"][:, t], 1 - a)
        Vr = a[..., None] * Vr + np.einsum("bhm,bhv->bhmv", 1 - a, x["v"][:, t])
        s = np.einsum("bhk,bhkm->bhm", x["q"][:, t], Kr)
        p = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
        assert rel_l2(np.asarray(o[:, t]), np.einsum("bhm,bhmv->bhv", p, Vr)) < 1e-5
    assert rel_l2(np.asarray(K), Kr) < 1e-5 and rel_l2(np.asarray(V), Vr) < 1e-5
