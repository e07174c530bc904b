"""Names and shapes of specs that are legal but unusual (issue 11 item 3): every spec compiles and computes what a
float64 numpy loop computes, or gets a located SpecError.

* spec names that the generated code uses for itself (`mm`, `out_dtype`, `interpret`, `_`, `S_final`, `S_L_chunk`,
  `S_enter_step`, `jnp`, `self`, Python keywords ...), on every target;
* inputs named like the call's own options (`initial_state`, `initial_states`, `self`, step's `state`);
* a state update that does not read the state, a state read only by itself, linear attention with `z = z * fk`;
* more dims than einsum letters, a 500-term sum, 1000 unary minuses, calls nested 1000 deep;
* an overflowing literal (a located SpecError) and a .ssm file saved with a UTF-8 byte order mark;
* generated renamings of every example (dims, values and the ssm's own name, including names derived from the
  generated code's own identifiers) against the float64 references of tests/reference.py.

Interpreter targets (triton, tpu) run few, small cases here; the wide sweeps are marked slow.
"""
from __future__ import annotations

import keyword
import re
import zlib

import numpy as np
import pytest

import ssmc
from reference import VARIANTS, rel_l2
from ssmc import ShapeError, SpecError

TARGETS = ["xla", "triton", "tpu"]
TOL = 1e-4


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path / "ssmc-cache"))


def compile_for(text, target, chunk_size=None):
    return ssmc.compile(text, target=target, chunk_size=chunk_size, interpret=target != "xla", cache=False)


def close(got, want, tol=TOL, what=""):
    got = np.asarray(got, np.float64)
    assert got.shape == np.shape(want), f"{what}: shape {got.shape} != {np.shape(want)}"
    err = rel_l2(got, want)
    assert err < tol, f"{what}: rel L2 error {err:.3g}"


# ---- names the generated code uses for itself --------------------------------------------------------------------
# A chunkable spec (scalar decay per head; the readout contracts p): every stage of the chunked form runs, so the
# names it makes up (S_L, S_L_chunk, S_enter, S_enter_step, S_final, y_..._D, ...) are all in play.
SSD = """
ssm m {
  dims b, t, h, p
  scan t
  in x[b,t,h,p], dt[b,t,h], A[h], C[b,t,h,p], NAME[b,t,h]
  state S[b,h,p]
  out y[b,t,h]
  S = exp(dt*A)*S + dt*x
  y[b,t,h] = C·S + NAME
}
"""


def ssd_inputs(rng, b=2, t=21, h=3, p=4):
    return {"x": rng.standard_normal((b, t, h, p)).astype(np.float32),
            "dt": rng.uniform(0.05, 0.5, (b, t, h)).astype(np.float32),
            "A": -rng.uniform(0.5, 1.5, h).astype(np.float32),
            "C": rng.standard_normal((b, t, h, p)).astype(np.float32),
            "NAME": rng.standard_normal((b, t, h)).astype(np.float32)}


def ssd_reference(x, dt, A, C, NAME, S0):
    x, dt, A, C, NAME = (np.asarray(a, np.float64) for a in (x, dt, A, C, NAME))
    S = np.asarray(S0, np.float64).copy()
    ys = []
    for t in range(x.shape[1]):
        S = np.exp(dt[:, t] * A)[:, :, None] * S + dt[:, t, :, None] * x[:, t]
        ys.append(np.einsum("bhp,bhp->bh", C[:, t], S) + NAME[:, t])
    return np.stack(ys, 1), S


# names of the generated code: the call's options, the kernels' own locals and globals, the chunked form's
# derived names of state S and out y, Python's soft keyword `_`, keywords and builtins, module names
GENERATED = ["mm", "out_dtype", "interpret", "S_final", "_", "S_L_chunk", "S_enter_step", "S_enter", "S_L",
             "S_chunks_w", "y_S_new_D", "y_S_new_in", "valid", "T", "Q", "Tp", "nc", "carry", "xs", "step", "jnp",
             "jax", "lax", "rt", "tl", "triton", "pl", "self", "initial_state", "initial_states", "S_prev_ptr",
             "y_ptr", "N_b", "BLOCK_p", "x_stride_b", "o_p", "i_h", "pid", "c", "tt", "ttc", "o_t", "i_chunk", "TRIL",
             "state_S_prev", "S_upd_w", "S_scr", "MM", "PREC", "ENTRY", "PARAMS", "LAYOUT", "arrays", "sizes",
             "lambda", "None", "print", "__name__", "m", "m_chunked", "v1"]
KERNEL_CASES = ["mm", "out_dtype", "interpret", "S_final", "_"]  # the interpreter is slow: the rest are slow tests


def _run_ssd(name, target, chunk_size, rng):
    text = SSD.replace("NAME", name)
    k = compile_for(text, target, chunk_size)
    inp = ssd_inputs(rng)
    S0 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    got = k.apply({**{n: inp[n] for n in ("x", "dt", "A", "C")}, name: inp["NAME"]}, S0)
    y, S = ssd_reference(**inp, S0=S0)
    close(got[0], y, what=f"{name} on {target}: y")
    close(got[1], S, what=f"{name} on {target}: final S")


def _run_ssd_many(names, target, chunk_size, rng):
    """SSD with one extra input per name, all added to the readout: one kernel checks several names at once (the
    slow sweeps; each name still has its own generated identifiers, and their mix is a legal spec as well)."""
    text = SSD.replace("NAME[b,t,h]", ", ".join(f"{n}[b,t,h]" for n in names)).replace("+ NAME", "+ " + " + ".join(names))
    k = compile_for(text, target, chunk_size)
    inp = ssd_inputs(rng, t=11 if target != "xla" else 21)
    extra = {n: rng.standard_normal(inp["NAME"].shape).astype(np.float32) for n in names}
    S0 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    got = k.apply({**{n: inp[n] for n in ("x", "dt", "A", "C")}, **extra}, S0)
    y, S = ssd_reference(**dict(inp, NAME=sum(e.astype(np.float64) for e in extra.values())), S0=S0)
    close(got[0], y, what=f"{names} on {target}: y")
    close(got[1], S, what=f"{names} on {target}: final S")


def _groups(names, n):
    return [names[i:i + n] for i in range(0, len(names), n)]


@pytest.mark.parametrize("name", GENERATED)
def test_generated_names_xla(name, rng):
    _run_ssd(name, "xla", 16, rng)


@pytest.mark.slow
@pytest.mark.parametrize("names", _groups(GENERATED, 8), ids=lambda g: f"{g[0]}..{g[-1]}")
def test_generated_names_xla_sequential(names, rng):
    _run_ssd_many(names, "xla", 1, rng)


@pytest.mark.parametrize("target", ["triton", "tpu"])
@pytest.mark.parametrize("name", KERNEL_CASES)
def test_generated_names_kernels(name, target, rng):
    _run_ssd(name, target, 8, rng)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["triton", "tpu"])
@pytest.mark.parametrize("names", _groups([n for n in GENERATED if n not in KERNEL_CASES], 8),
                         ids=lambda g: f"{g[0]}..{g[-1]}")
def test_generated_names_kernels_all(names, target, rng):
    _run_ssd_many(names, target, 8, rng)


def test_ssm_named_like_a_module():
    """The ssm's own name becomes the generated function's: `jnp` must not shadow the module."""
    rng = np.random.default_rng(0)
    for target in TARGETS:
        _run_ssd_named(target, rng)


def _run_ssd_named(target, rng):
    k = compile_for(SSD.replace("ssm m", "ssm jnp").replace("NAME", "e"), target, 8)
    inp = ssd_inputs(rng)
    S0 = np.zeros((2, 3, 4), np.float32)
    got = k(inp["x"], inp["dt"], inp["A"], inp["C"], inp["NAME"])
    close(got[0], ssd_reference(**inp, S0=S0)[0], what=target)


def test_keyword_inputs_named_like_call_options(rng):
    """Inputs named like the call's options are passed by keyword; the options then go through k.apply."""
    text = apply_renaming(SSD, {"x": "self", "dt": "initial_state", "NAME": "initial_states"})
    assert "in self[b,t,h,p], initial_state[b,t,h], A[h], C[b,t,h,p], initial_states[b,t,h]" in text
    k = compile_for(text, "xla", 8)
    inp = ssd_inputs(rng)
    S0 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    y0, S_zero = ssd_reference(**inp, S0=np.zeros_like(S0))
    got = k(self=inp["x"], initial_state=inp["dt"], A=inp["A"], C=inp["C"], initial_states=inp["NAME"])
    close(got[0], y0, what="keywords")
    close(got[1], S_zero, what="keywords")
    y1, S1 = ssd_reference(**inp, S0=S0)
    got = k.apply({"self": inp["x"], "initial_state": inp["dt"], "A": inp["A"], "C": inp["C"],
                   "initial_states": inp["NAME"]}, {"S": S0})
    close(got[0], y1, what="apply")
    got = k.apply([inp["x"], inp["dt"], inp["A"], inp["C"], inp["NAME"]], S0)
    close(got[1], S1, what="apply positional")
    # the options work as before where no input has their name
    k2 = compile_for(SSD.replace("NAME", "e"), "xla", 8)
    got = k2(**{n: inp[n] for n in ("x", "dt", "A", "C")}, e=inp["NAME"], initial_state=S0)
    close(got[0], y1, what="option")
    got = k2(inp["x"], inp["dt"], inp["A"], inp["C"], inp["NAME"], initial_states={"S": S0})
    close(got[1], S1, what="option")
    with pytest.raises(ShapeError, match="unknown input 'S'"):
        k2(**{n: inp[n] for n in ("x", "dt", "A", "C")}, e=inp["NAME"], S=S0)


def test_step_with_an_input_named_state(rng):
    """k.step's own `state` option yields to an input named `state` (legal: the grammar reads it as a name
    there); the states then come first, positionally."""
    k = compile_for(SSD.replace("NAME", "state"), "xla", 8)
    inp = ssd_inputs(rng, t=1)
    S0 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    y, S = ssd_reference(**inp, S0=S0)
    got = k.step(S0, inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["C"][:, 0], state=inp["NAME"][:, 0])
    close(got[0], y[:, 0], what="step")
    close(got[1], S, what="step")
    k2 = compile_for(SSD.replace("NAME", "e"), "xla", 8)
    got = k2.step(inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["C"][:, 0], inp["NAME"][:, 0], state=S0)
    close(got[1], S, what="step state=")


# ---- shapes of recurrence that crashed the generator -------------------------------------------------------------
NO_READ = """
ssm m {
  dims b, t
  scan t
  in k[b,t]
  state S[b]
  out y[b,t]
  S = 2*k
  y = S + k
}
"""

SELF_ONLY = """
ssm m {
  dims b, t
  scan t
  in x[b,t]
  state S[b]
  out o[b,t]
  S = 0.5*S
  o = S
}
"""


@pytest.mark.parametrize("target", TARGETS)
def test_update_that_does_not_read_the_state(target, rng):
    k = compile_for(NO_READ, target)
    x = rng.standard_normal((2, 9)).astype(np.float32)
    y, S = k(x, initial_state=rng.standard_normal(2).astype(np.float32))
    close(y, 3.0 * x.astype(np.float64), what="y")
    close(S, 2.0 * x[:, -1].astype(np.float64), what="final S")


@pytest.mark.parametrize("target", TARGETS)
def test_state_that_only_decays(target, rng):
    k = compile_for(SELF_ONLY, target)
    x = rng.standard_normal((2, 7)).astype(np.float32)
    S0 = rng.standard_normal(2).astype(np.float32)
    o, S = k(x, initial_state=S0)
    want = S0.astype(np.float64)[:, None] * 0.5 ** np.arange(1, 8)[None, :]
    close(o, want, what="o")
    close(S, want[:, -1], what="final S")


SLOW_ON_KERNELS = [pytest.param("triton", marks=pytest.mark.slow), pytest.param("tpu", marks=pytest.mark.slow)]


@pytest.mark.parametrize("chunk", [None, 16, 1])
@pytest.mark.parametrize("target", ["xla"] + SLOW_ON_KERNELS)
def test_linear_attention_with_a_multiplicative_normaliser(target, chunk, rng):
    if target != "xla" and chunk == 1:
        pytest.skip("the kernel targets' sequential form is covered by chunk=None on deltanet-like specs")
    v = VARIANTS["linear_attention"]
    text = v.spec_text.replace("z = z + fk", "z = z * fk")
    k = compile_for(text, target, chunk)
    dims = {"t": 21} if target == "xla" else {"t": 9, "dk": 4, "dv": 3}
    inp = v.make_inputs(rng, dims)
    init = v.make_initial_states(rng, dims)
    q, kk, vv = (inp[n].astype(np.float64) for n in ("q", "k", "v"))
    S, z = init["S"].astype(np.float64), init["z"].astype(np.float64)
    softplus = lambda a: np.logaddexp(0.0, a)  # noqa: E731
    os_, dens = [], []
    for t in range(q.shape[1]):
        fq, fk = softplus(q[:, t]), softplus(kk[:, t])
        S = S + np.einsum("bhk,bhv->bhkv", fk, vv[:, t])
        z = z * fk
        den = np.einsum("bhk,bhk->bh", fq, z)
        os_.append(np.einsum("bhk,bhkv->bhv", fq, S) / den[..., None])
        dens.append(den)
    got = k.apply(inp, init)
    close(got[1], np.stack(dens, 1), what="den")
    close(got[0], np.stack(os_, 1), what="o")
    close(got[2], S, what="S")
    close(got[3], z, what="z")


# ---- sizes: dims, terms, depth -----------------------------------------------------------------------------------
def many_dims(n):
    dims = [f"d{i}" for i in range(n)]
    ins = ", ".join(f"a{i}[{d}]" for i, d in enumerate(dims))
    sums = " + ".join(f"sum(a{i}, over=[{d}])" for i, d in enumerate(dims))
    return f"ssm m {{\n  dims b, t, {', '.join(dims)}\n  scan t\n  in x[b,t], {ins}\n  state S[b]\n  out y[b,t]\n" \
           f"  S = 0.5*S + x + {sums}\n  y = S\n}}\n"


@pytest.mark.parametrize("target", ["xla"] + SLOW_ON_KERNELS)
def test_more_dims_than_einsum_letters(target, rng):
    n = 60
    k = compile_for(many_dims(n), target)
    x = rng.standard_normal((2, 5)).astype(np.float32)
    a = [rng.standard_normal(2).astype(np.float32) for _ in range(n)]
    y, S = k(x, *a)
    c = sum(float(np.sum(ai, dtype=np.float64)) for ai in a)
    s, ys = np.zeros(2), []
    for t in range(5):
        s = 0.5 * s + x[:, t] + c
        ys.append(s)
    close(y, np.stack(ys, 1), what="y")


DEEP = "ssm m {{\n  dims b, t\n  scan t\n  in x[b,t]\n  state S[b]\n  out y[b,t]\n  S = 0.5*S + x\n  y = S + {}\n}}\n"


@pytest.mark.parametrize("target", ["xla"] + SLOW_ON_KERNELS)
@pytest.mark.parametrize("kind", ["sum500", "neg1000", "calls1000", "product300"])
def test_deep_expressions(kind, target, rng):
    if target != "xla" and kind != "sum500":
        pytest.skip("one deep case per interpreter target (they only take longer)")
    expr, f = {"sum500": (" + ".join(["x"] * 500), lambda x: 500 * x),
               "neg1000": ("-" * 1000 + "x", lambda x: x),
               "calls1000": ("abs(" * 1000 + "x" + ")" * 1000, np.abs),
               "product300": ("*".join(["(x*0.0 + 1.001)"] * 300), lambda x: 1.001 ** 300 + 0 * x)}[kind]
    k = compile_for(DEEP.format(expr), target)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    y, _ = k(x)
    s, ys = np.zeros(2), []
    for t in range(6):
        s = 0.5 * s + x[:, t]
        ys.append(s)
    close(y, np.stack(ys, 1) + f(x.astype(np.float64)), what=kind)


# ---- literals and files ------------------------------------------------------------------------------------------
def test_overflowing_literal_is_a_located_spec_error():
    text = DEEP.format("1e999 * x")
    with pytest.raises(SpecError) as info:
        ssmc.check(text)
    line = text.splitlines().index("  y = S + 1e999 * x") + 1
    assert (info.value.span.line, info.value.span.column) == (line, 11), str(info.value)
    assert "out of range" in info.value.bare_message


def test_large_finite_literal_compiles(rng):
    k = compile_for(DEEP.format("1e300 * 0.0 + x"), "xla")
    x = rng.standard_normal((2, 4)).astype(np.float32)
    assert np.all(np.isfinite(np.asarray(k(x)[0])))


def test_spec_file_with_a_byte_order_mark(tmp_path, rng):
    path = tmp_path / "bom.ssm"
    path.write_bytes(b"\xef\xbb\xbf" + DEEP.format("x").encode("utf-8"))
    for spec in (path, str(path), "\ufeff" + DEEP.format("x")):
        k = ssmc.compile(spec, cache=False)
        x = rng.standard_normal((2, 4)).astype(np.float32)
        s, ys = np.zeros(2), []
        for t in range(4):
            s = 0.5 * s + x[:, t]
            ys.append(s)
        close(k(x)[0], np.stack(ys, 1) + x, what=str(spec)[:20])


def test_name_table_catches_a_stray_identifier():
    """Names.verify is the construction's check: an identifier pasted together outside the table is an error."""
    from ssmc.targets.writer import Names
    names = Names((), ("jnp",))
    a = names.fresh("x")
    names.verify(f"{a} = jnp.zeros(3)\n")
    with pytest.raises(AssertionError, match="x_w"):
        names.verify(f"{a}_w = jnp.zeros(3)\n")
    assert names.fresh("x") == "x_" and names.fresh("x") == "x_2" and names.fresh("lambda") == "lambda_"
    dunder = names.fresh("__name__")
    assert dunder.isidentifier() and not (dunder.startswith("__") and dunder.endswith("__"))


# ---- renamings of every example ------------------------------------------------------------------------------------
GRAMMAR_WORDS = {"ssm", "dims", "scan", "group", "in", "state", "out"}
NASTY = ["mm", "_", "out_dtype", "interpret", "jnp", "jax", "lax", "tl", "pl", "rt", "self", "valid", "T", "Q",
         "nc", "carry", "xs", "step", "initial_state", "initial_states", "lambda", "None", "def", "print", "len",
         "PARAMS", "ENTRY", "LAYOUT", "arrays", "sizes", "MM", "PREC", "pid", "c", "tt", "o_t", "i_chunk", "TRIL",
         "c1", "v1", "v4", "ms1", "exp", "over", "eps", "h_L_chunk", "S_enter_step", "x_final", "s_upd_w"]
# what the generated code appends to a value's name, and puts before a dim's
SUFFIXES = ["_L", "_L_chunk", "_L_last", "_enter", "_enter_step", "_chunks", "_chunks_w", "_final", "_prev",
            "_new", "_ptr", "_ref", "_blk", "_scr", "_upd_w", "_ell", "_neg", "_D", "_in", "_st", "_E", "_Lx",
            "_kept", "_step", "_W", "_scores"]
PREFIXES = ["N_", "BLOCK_", "o_", "i_", "j_", "state_", "pid_"]
WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")


def spec_names(text: str) -> tuple[list[str], list[str]]:
    """(dims, values) of a spec: declared dims; arrays and statement targets."""
    spec = ssmc.frontend.parse(text)
    return [d.name for d in spec.dims], [a.name for a in spec.arrays] + [s.target for s in spec.body]


def renaming(text: str, rng) -> dict[str, str]:
    """An injective map of the spec's names (dims, values, the ssm's) to legal identifiers: names the generated code
    uses for itself, names derived from the other new names the way the generated code derives its locals, and
    plain random ones."""
    dims, values = spec_names(text)
    spec_name = ssmc.frontend.parse(text).name
    olds = list(dict.fromkeys(values + dims + [spec_name]))
    words = set(WORD.findall(re.sub(r"#[^\n]*", "", text))) - set(olds)  # builtins, keyword arguments, keywords
    taken = set(words) | GRAMMAR_WORDS
    out: dict[str, str] = {}
    pool = list(NASTY)
    rng.shuffle(pool)
    for old in olds:
        choice = rng.integers(3)
        new = None
        if choice == 0 and out:  # derived from a name already given, like the generated code derives its own
            base = list(out.values())[rng.integers(len(out))]
            new = (PREFIXES[rng.integers(len(PREFIXES))] + base if rng.integers(2)
                   else base + SUFFIXES[rng.integers(len(SUFFIXES))])
        elif choice == 1 and pool:
            new = pool.pop()
        if new is None or new in taken or not new.isidentifier() or keyword.iskeyword(new) and new in GRAMMAR_WORDS:
            new = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"), 1)) + \
                  "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz_0123456789"), int(rng.integers(0, 6))))
            while new in taken:
                new += "_"
        taken.add(new)
        out[old] = new
    return out


def apply_renaming(text: str, mapping: dict[str, str]) -> str:
    text = re.sub(r"#[^\n]*", "", text)
    return WORD.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)


def check_renamed(name: str, target: str, seed: int, chunk_size=None, dims=None):
    v = VARIANTS[name]
    rng = np.random.default_rng(seed)
    mapping = renaming(v.spec_text, rng)
    text = apply_renaming(v.spec_text, mapping)
    k = compile_for(text, target, chunk_size)
    inputs = v.make_inputs(rng, dims)
    init = v.make_initial_states(rng, dims)
    ref_outs, ref_states = v.reference(inputs, init)
    # a conv window state is named after its input: <x>_win
    state_name = {n: mapping[n] if n in mapping else mapping[n.removesuffix("_win")] + "_win" for n in init}
    assert [n for n, _ in k.states] == [state_name[n] for n in v.state_names]
    res = k.apply({mapping[n]: x for n, x in inputs.items()}, {state_name[n]: x for n, x in init.items()})
    assert [n for n, _ in k.inputs] == [mapping[n] for n in v.in_names]
    got = list(res)
    want = list(ref_outs) + list(ref_states)
    labels = list(v.out_names) + list(v.state_names)
    for g, w, lbl in zip(got, want, labels):
        close(g, w, what=f"{name} renamed {mapping} on {target} (chunk {chunk_size}): {lbl}")


@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_renamed_examples_xla(name, chunk):
    check_renamed(name, "xla", seed=zlib.crc32(name.encode()) % 1000 + (chunk or 0), chunk_size=chunk)


@pytest.mark.parametrize("target,name", [("triton", "mamba2"), ("tpu", "mamba2"),
                                         pytest.param("triton", "deltanet", marks=pytest.mark.slow),
                                         pytest.param("tpu", "rwkv6", marks=pytest.mark.slow)])
def test_renamed_examples_kernels(target, name):
    small = {"mamba2": {"t": 9, "p": 4, "n": 4}, "deltanet": {"t": 9, "dk": 4, "dv": 4},
             "rwkv6": {"t": 9, "dk": 4, "dv": 4}}[name]
    check_renamed(name, target, seed=7, chunk_size=8, dims=small)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("chunk", [None, 16, 1])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_renamed_examples_xla_sweep(name, chunk, seed):
    check_renamed(name, "xla", seed=1000 + seed, chunk_size=chunk)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["triton", "tpu"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_renamed_examples_kernels_sweep(name, target):
    small = {"t": 9}
    for d, n in (("p", 4), ("n", 4), ("dk", 4), ("dv", 4), ("d", 4)):
        if d in VARIANTS[name].small_dims:
            small[d] = n
    check_renamed(name, target, seed=2000, chunk_size=8, dims=small)


def test_renaming_is_injective_and_legal():
    rng = np.random.default_rng(0)
    for v in VARIANTS.values():
        for _ in range(5):
            m = renaming(v.spec_text, rng)
            assert len(set(m.values())) == len(m)
            ssmc.check(apply_renaming(v.spec_text, m))
