"""conv(x, w, over=t): the causal depthwise conv and its window state against a plain float64 loop, in the chunked
and the sequential form; window naming and sharing; spec and shape errors."""
from __future__ import annotations

import numpy as np
import pytest

import ssmc
from reference import VARIANTS, ref_causal_conv, ref_retnet, rel_l2
from ssmc import ShapeError, SpecError
from test_errors import assert_at, where

TOL = 1e-5

# RetNet whose keys go through a causal conv first; kc is also an out, so the conv is checked on its own.
CONV_RETNET = """\
ssm conv_retnet {
  dims b, t, h, dk, dv, k
  scan t
  in q[b,t,h,dk], kr[b,t,h,dk], v[b,t,h,dv], gamma[h], w[h,dk,k]
  state S[b,h,dk,dv]
  out o[b,t,h,dv], kc[b,t,h,dk]

  kc = conv(kr, w, over=t)
  S = gamma*S + kc⊗v
  o = q·S
}
"""


def _inputs(rng, T, K, b=2, h=2, dk=4, dv=3):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {"q": f(b, T, h, dk), "kr": f(b, T, h, dk), "v": f(b, T, h, dv),
            "gamma": rng.uniform(0.7, 0.95, h).astype(np.float32), "w": (0.5 * f(h, dk, K)).astype(np.float32)}


CASES = [(37, 4, False), (37, 4, True), (2, 4, True), (1, 4, True), (5, 1, True), (6, 2, False)]


@pytest.mark.parametrize("chunk", [None, 1, 4], ids=["default", "sequential", "chunk4"])
@pytest.mark.parametrize("T,K,init", CASES, ids=[f"t{t}-k{k}-{'init' if i else 'zero'}" for t, k, i in CASES])
def test_conv_and_window_match_loop(rng, chunk, T, K, init):
    k = ssmc.compile(CONV_RETNET, chunk_size=chunk)
    inp = _inputs(rng, T, K)
    states = {}
    if init:
        states = {"S": rng.standard_normal((2, 2, 4, 3)).astype(np.float32),
                  "kr_win": rng.standard_normal((2, K - 1, 2, 4)).astype(np.float32)}
    o, kc, S, win = k(**inp, initial_states=states or None)
    ref_kc, ref_win = ref_causal_conv(inp["kr"], inp["w"], states.get("kr_win"))
    (ref_o,), (ref_S,) = ref_retnet({**inp, "k": ref_kc}, {"S": states.get("S")})
    assert win.shape == (2, K - 1, 2, 4) and win.dtype == np.float32
    for name, got, want in (("kc", kc, ref_kc), ("o", o, ref_o), ("S", S, ref_S), ("kr_win", win, ref_win)):
        assert rel_l2(got, want) < TOL, f"{name}: {rel_l2(got, want):.3g}"
    if T >= K - 1:  # the window is the last K-1 raw inputs
        np.testing.assert_array_equal(np.asarray(win), inp["kr"][:, T - (K - 1):])


def test_conv_keeps_the_chunked_form():
    """The window is state-free from the recurrence's point of view: Mamba2 with its conv still chunks."""
    for spec in (str(VARIANTS["mamba2_conv"].path), CONV_RETNET):
        k = ssmc.compile(spec)
        assert "chunk: chunk-parallel form" in k.ir, k.ir
    k = ssmc.compile(str(VARIANTS["mamba2_conv"].path))
    assert k.states == [("s", ("b", "h", "p", "n")), ("xr_win", ("b", "k-1", "h", "p")),
                        ("Br_win", ("b", "k-1", "g", "n")), ("Cr_win", ("b", "k-1", "g", "n"))]


def test_default_window_is_zero(rng):
    k = ssmc.compile(CONV_RETNET)
    inp = _inputs(rng, 9, 3)
    a = k(**inp)
    b = k(**inp, initial_states={"kr_win": np.zeros((2, 2, 2, 4), np.float32)})
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_window_sharing_and_naming(rng):
    """Two convs of one input with the same window dim share its window; a conv of an expression names its
    window after the statement's target."""
    spec = """\
ssm two {
  dims b, t, c, k
  scan t
  in x[b,t,c], w1[c,k], w2[c,k], a[b,t,c]
  state s[b,c]
  out y[b,t,c]
  u = conv(x, w1, over=t) + conv(x, w2, over=t)
  e = conv(2*x, w1, over=t)
  s = a*s + u + e
  y = s * u
}
"""
    k = ssmc.compile(spec)
    assert [n for n, _ in k.states] == ["s", "x_win", "e_win"]
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    x, w1, w2 = f(2, 6, 3), f(3, 4), f(3, 4)
    win = f(2, 3, 3)
    _, _, xw, ew = k(x=x, w1=w1, w2=w2, a=np.full((2, 6, 3), 0.5, np.float32),
                     initial_states={"x_win": win, "e_win": 2 * win})
    np.testing.assert_array_equal(np.asarray(xw), x[:, -3:])
    np.testing.assert_allclose(np.asarray(ew), 2 * x[:, -3:], rtol=1e-6)


def test_window_shape_errors(rng):
    k = ssmc.compile(CONV_RETNET)
    inp = _inputs(rng, 5, 4)
    with pytest.raises(ShapeError, match=r"holds k-1 = 3 steps .* but initial state 'kr_win' .* has 2"):
        k(**inp, initial_states={"kr_win": np.zeros((2, 2, 2, 4), np.float32)})
    with pytest.raises(ShapeError, match="initial state 'kr_win'"):
        k(**inp, initial_states={"kr_win": np.zeros((2, 3, 2, 5), np.float32)})


BASE = CONV_RETNET


def _edit(old, new):
    assert BASE.count(old) == 1
    return BASE.replace(old, new)


ERRORS = [
    # (edit, needle whose position the error points at, words in the message)
    (("conv(kr, w, over=t)", "conv(kr, w, over=h)"), "over=h", ("scan dim 't' only", "'h'")),
    (("conv(kr, w, over=t)", "conv(kr, w, over=zz)"), "over=zz", ("must name the scan dim",)),
    (("conv(kr, w, over=t)", "conv(kr, w)"), "conv(kr, w)", ("needs over=t",)),
    (("w[h,dk,k]", "w[h,dk]"), "w, over", ("exactly one window dim", "no dim besides")),
    (("w[h,dk,k]", "w[h,dv,k]"), "w, over", ("exactly one window dim", "2 dims the input lacks")),
    (("w[h,dk,k]", "w[t,dk,k]"), "w, over", ("must not vary along the scan dim",)),
    (("conv(kr, w, over=t)", "conv(gamma, w, over=t)"), "gamma, w", ("without the scan dim",)),
    (("conv(kr, w, over=t)", "conv(kr, w, over=t, width=4)"), "width=4", ("unexpected keyword",)),
    (("conv(kr, w, over=t)", "conv(kr, over=t)"), "conv(kr, over=t)", ("takes 2 positional",)),
    (("o = q·S\n", "o = q·S\n  z = conv(o, w2, over=t)\n"), "o, w2", ("reads a state",)),
    (("out o[b,t,h,dv]", "out kr_win[b,t,h,dv], o[b,t,h,dv]"), "conv(kr", ("'kr_win'", "already declared")),
]


@pytest.mark.parametrize("edit,needle,words", ERRORS, ids=[w[0] for _, _, w in ERRORS])
def test_conv_spec_errors(edit, needle, words):
    text = _edit(*edit)
    if "w2" in text:
        text = text.replace("w[h,dk,k]", "w[h,dk,k], w2[h,dv,k]")
    with pytest.raises(SpecError) as info:
        ssmc.check(text)
    line, col = where(text, needle, "kc = " if "kc = conv" in text else "")
    assert_at(info.value, text, line, col, *words)


def test_cli_check_and_run_a_conv_spec(capsys, tmp_path, monkeypatch):
    """`ssmc check` lists the windows as conv-window states; `ssmc run` sizes them from the weight."""
    from ssmc import cli

    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path))
    path = str(VARIANTS["mamba2_conv"].path)
    assert cli.main(["check", path]) == 0
    out = capsys.readouterr().out
    assert "xr_win[b,k-1,h,p] conv-window" in out and "schedule: chunked" in out
    assert cli.main(["run", path, "--dims", "b=1,t=20,h=2,p=4,n=4,g=1,k=3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "state xr_win  1x2x2x4" in out and "OK" in out, out
