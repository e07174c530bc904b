"""The target interface (targets/base.py): every target is a complete `Target`, every generated module describes its
entry in one typed MODULE_INFO record, and every entry takes and returns the arrays as declared - so the three
targets answer the same call the same way - and ssmc/api.py and ssmc/step.py do not import each other."""
from __future__ import annotations

import ast
import inspect
import pathlib
import re
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

import ssmc
from ssmc import SSMCError, TargetError
from ssmc import targets as targets_pkg
from ssmc.targets.base import ACROSS, BASE_OPTIONS, CU_SEQLENS, ENTERING, KERNEL_OPTIONS, ModuleInfo, Target

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGETS = ("xla", "triton", "tpu")

# Mamba2 with groups and every array in its own dim order: the entry must take and give these layouts
PERMUTED = """
ssm perm {
  dims b, t, h, p, n, g
  scan t
  group g -> h
  in x[t,b,p,h], dt[h,b,t], A[h], B[b,g,n,t], C[t,n,b,g], D[h]
  state s[n,h,b,p]
  out y[p,t,b,h]
  s = exp(dt*A)*s + dt*B⊗x
  y = C·s + D*x
}
"""
SIZES = dict(b=2, t=12, h=4, p=3, n=5, g=2)
DECL = {"x": "tbph", "dt": "hbt", "A": "h", "B": "bgnt", "C": "tnbg", "D": "h", "s": "nhbp", "y": "ptbh"}
STD = {"x": "bthp", "dt": "bth", "A": "h", "B": "btgn", "C": "btgn", "D": "h", "s": "bhpn", "y": "bthp"}


def _to(a, src: str, dst: str):
    return np.einsum(f"{src}->{dst}", a)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    z = {d: SIZES[d] for d in SIZES}
    std = {"x": rng.standard_normal((z["b"], z["t"], z["h"], z["p"])),
           "dt": rng.uniform(0.05, 0.5, (z["b"], z["t"], z["h"])),
           "A": -rng.uniform(0.5, 1.5, (z["h"],)),
           "B": rng.standard_normal((z["b"], z["t"], z["g"], z["n"])),
           "C": rng.standard_normal((z["b"], z["t"], z["g"], z["n"])),
           "D": rng.standard_normal((z["h"],))}
    s0 = rng.standard_normal((z["b"], z["h"], z["p"], z["n"]))
    return std, s0


def _reference(std, s0):
    """float64 loop in the standard layout: s = exp(dt*A)*s + dt*B⊗x, y = C·s + D*x, heads grouped h // (h/g)."""
    b, t, h, p = std["x"].shape
    grp = np.arange(h) // (h // std["B"].shape[2])
    s = s0.astype(np.float64).copy()
    y = np.zeros((b, t, h, p))
    for i in range(t):
        dt = std["dt"][:, i]                                   # [b,h]
        Bh, Ch = std["B"][:, i][:, grp], std["C"][:, i][:, grp]  # [b,h,n]
        s = (np.exp(dt * std["A"])[:, :, None, None] * s
             + (dt[:, :, None] * std["x"][:, i])[..., None] * Bh[:, :, None, :])
        y[:, i] = np.einsum("bhn,bhpn->bhp", Ch, s) + std["D"][:, None] * std["x"][:, i]
    return y, s


def _declared(std, s0):
    arrays = {n: _to(a, STD[n], DECL[n]) for n, a in std.items()}
    return arrays, _to(s0, STD["s"], DECL["s"])


def _kernel(target, **kw):
    return ssmc.compile(PERMUTED, target=target, interpret=target != "xla", **kw)


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- the interface ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_target_objects_are_complete_targets(target):
    tgt = targets_pkg.get_target(target)
    assert isinstance(tgt, Target) and tgt.name == target
    assert tgt.options == (KERNEL_OPTIONS if tgt.kernels else BASE_OPTIONS)
    assert isinstance(tgt.pipeline(None), str) and isinstance(tgt.pipeline(1), str)
    assert tgt.float64 == (target == "xla")


@pytest.mark.parametrize("target", TARGETS)
def test_generated_module_describes_its_entry(target):
    """The source alone (run in a fresh module) defines MODULE_INFO; it names the entry, whose signature is the
    declared params then the keyword options, and lists params and results in their declared dims."""
    k = _kernel(target)
    mod = types.ModuleType("m")
    exec(compile(k.source, "<test>", "exec"), mod.__dict__)
    info = mod.MODULE_INFO
    assert isinstance(info, ModuleInfo) and info.target == target
    # + across: a chunk-parallel spec's entry runs one part of a sequence split over devices (ssmc.shard);
    # + entering (kernel targets' segment schedule): the states entering each chunk given, every chunk at once;
    # + cu_seqlens: a spec with a batch dim takes packed sequences
    tgt = targets_pkg.get_target(target)
    assert info.options == tgt.options + (ACROSS,) + ((ENTERING,) if tgt.kernels else ()) + (CU_SEQLENS,)
    for legacy in ("PARAMS", "RETURNS", "ENTRY"):
        assert legacy not in mod.__dict__, legacy
    fn = getattr(mod, info.entry)
    sig = inspect.signature(fn)
    assert [p.py for p in info.params] == [n for n, q in sig.parameters.items() if q.kind == q.POSITIONAL_OR_KEYWORD]
    assert all(sig.parameters[o].kind == inspect.Parameter.KEYWORD_ONLY for o in info.options)
    assert {(p.kind, p.name): "".join(p.dims) for p in info.params} == {
        **{("input", n): DECL[n] for n in ("x", "dt", "A", "B", "C", "D")}, ("state", "s"): DECL["s"]}
    assert [(r.kind, r.name, "".join(r.dims)) for r in info.returns] == [("out", "y", DECL["y"]),
                                                                        ("state", "s", DECL["s"])]
    assert info.check(mod, target, k.inputs, k.states, k.outs) is fn


@pytest.mark.parametrize("target", TARGETS)
def test_entry_takes_and_returns_declared_arrays(target):
    """The generated function itself, called the one way every target shares (declared arrays, mixed dtypes,
    mm / out_dtype keywords), returns the declared layouts: y in out_dtype, the state in float32. Before, the XLA
    entry took arrays in the IR's layout (h split into (g, h/g)) and Kernel moved them."""
    k = _kernel(target)
    std, s0 = _inputs(1)
    arrays, s_decl = _declared(std, s0)
    by = {**arrays, "s": s_decl}
    call = [jnp.asarray(by[p.name], jnp.bfloat16 if p.name in ("x", "B", "C") else jnp.float32)
            for p in k._info.params]
    opts = {"interpret": True} if "interpret" in k._info.options else {}
    y, s = k._fn(*call, mm=jnp.float32, out_dtype=jnp.bfloat16, **opts)
    assert y.shape == tuple(SIZES[d] for d in DECL["y"]) and y.dtype == jnp.bfloat16
    assert s.shape == tuple(SIZES[d] for d in DECL["s"]) and s.dtype == jnp.float32
    rounded = {n: (np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)
                   if n in ("x", "B", "C") else a) for n, a in std.items()}
    ry, rs = _reference(rounded, s0)
    assert _err(y, _to(ry, STD["y"], DECL["y"])) < 1e-2
    assert _err(s, _to(rs, STD["s"], DECL["s"])) < 1e-4


@pytest.mark.parametrize("target", [t if t != "tpu" else pytest.param(t, marks=pytest.mark.slow) for t in TARGETS])
def test_three_targets_answer_the_same_call(target):
    """Kernel's call on permuted layouts: positional, keyword and apply agree, match the float64 loop and come back
    as declared; mixed precision (bf16 x, B, C next to fp32 dt, A, D) gives a bf16 y and an fp32 state."""
    k = _kernel(target)
    std, s0 = _inputs(2)
    arrays, s_decl = _declared(std, s0)
    ry, rs = _reference(std, s0)
    names = [n for n, _ in k.inputs]
    pos = k(*[arrays[n] for n in names], initial_state=s_decl)
    kw = k(**arrays, initial_state=s_decl)
    ap = k.apply(arrays, {"s": s_decl})
    for res in (pos, kw, ap):
        y, s = res
        assert y.shape == tuple(SIZES[d] for d in DECL["y"]) and y.dtype == jnp.float32
        assert s.shape == tuple(SIZES[d] for d in DECL["s"]) and s.dtype == jnp.float32
        assert _err(y, _to(ry, STD["y"], DECL["y"])) < 1e-4
        assert _err(s, _to(rs, STD["s"], DECL["s"])) < 1e-4
    np.testing.assert_array_equal(np.asarray(pos[0]), np.asarray(kw[0]))
    low = {n: jnp.asarray(a, jnp.bfloat16) if n in ("x", "B", "C") else jnp.asarray(a, jnp.float32)
           for n, a in arrays.items()}
    y, s = k(**low)
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert y.shape == tuple(SIZES[d] for d in DECL["y"]) and s.shape == tuple(SIZES[d] for d in DECL["s"])


def test_module_whose_record_lies_fails_at_load():
    """A module whose MODULE_INFO disagrees with its entry or the spec fails when the Kernel loads it (naming what
    differs), not inside a call; a module without the record too."""
    from ssmc.kernel import Kernel

    k = _kernel("xla")
    tgt = targets_pkg.get_target("xla")
    entry = {"source": k.source, "ir": k.ir, "passes": k.passes, "dot": k.dot}

    def load(source):
        return Kernel(k.program, tgt, k.pipeline, dict(entry, source=source), "<t>", False, 0.0)

    load(k.source)  # the real one loads
    wrong_dims = k.source.replace("Param('A', 'A', 'input', ('h',))", "Param('A', 'A', 'input', ('g',))")
    assert wrong_dims != k.source
    with pytest.raises(SSMCError, match=r"failed to load.*Param\('A'"):
        load(wrong_dims)
    wrong_entry = k.source.replace("entry='perm'", "entry='nope'")
    with pytest.raises(SSMCError, match="entry 'nope'"):
        load(wrong_entry)
    with pytest.raises(SSMCError, match="no MODULE_INFO"):
        load(k.source.replace("MODULE_INFO = ModuleInfo(", "OTHER = ModuleInfo("))


# ---- registration ------------------------------------------------------------------------------------------------
class _NoEmit(Target):
    name = "noemit"

    def pipeline(self, chunk_size):
        return "classify"


class _Nameless(_NoEmit):
    name = ""

    def emit(self, program, pipeline=""):
        return ""


class _BadFlag(_Nameless):
    name = "badflag"
    kernels = "yes"


class _NotATarget:
    name = "duck"
    kernels = False

    def pipeline(self, chunk_size):
        return ""

    def emit(self, program, pipeline=""):
        return ""


@pytest.mark.parametrize("cls,what", [(_NoEmit, "emit"), (_Nameless, "name"), (_BadFlag, "kernels"),
                                      (_NotATarget, "is not a ssmc.targets.base.Target")])
def test_incomplete_target_fails_at_registration(cls, what):
    with pytest.raises(TargetError, match=what):
        targets_pkg.instantiate(cls, "t")


def test_incomplete_target_fails_when_looked_up_not_when_called(monkeypatch):
    """A registered target class that misses a member fails in get_target - so compile names it before running
    anything - rather than with an AttributeError in the middle of a call."""
    fake = types.ModuleType(f"{targets_pkg.__name__}.fake_target")
    fake.FakeTarget = _NoEmit
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(targets_pkg.MODULES, "fake", ("fake_target", "FakeTarget"))
    monkeypatch.setitem(targets_pkg.ALIASES, "fake", "fake")
    with pytest.raises(TargetError, match="'fake'.*emit"):
        ssmc.compile(PERMUTED, target="fake", cache=False)


def test_disk_cache_key_follows_the_entry_contract(monkeypatch, tmp_path):
    """A kernel cached under one entry contract is not served under another (a module of the old calling convention
    would load and then take the arrays the wrong way)."""
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path))
    ssmc.clear_cache()
    k = ssmc.compile(PERMUTED)
    ssmc.clear_cache()
    assert ssmc.compile(PERMUTED).from_disk_cache
    ssmc.clear_cache()
    monkeypatch.setattr(targets_pkg, "ENTRY_CONTRACT", "older")
    assert not ssmc.compile(PERMUTED).from_disk_cache and k.source
    ssmc.clear_cache()


# ---- module structure ------------------------------------------------------------------------------------------
def _imports(path: pathlib.Path, package: str) -> set[str]:
    """Every module a file imports, at any depth (function-local imports too), relative ones resolved."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            for _ in range(max(0, node.level - 1)):
                base = base.rpartition(".")[0]
            mod = ".".join(x for x in (base, node.module or "") if x)
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return found


def test_api_and_step_do_not_import_each_other():
    api = _imports(ROOT / "ssmc" / "api.py", "ssmc")
    step = _imports(ROOT / "ssmc" / "step.py", "ssmc")
    kernel = _imports(ROOT / "ssmc" / "kernel.py", "ssmc")
    assert "ssmc.step" not in api, "ssmc/api.py imports ssmc.step"
    assert "ssmc.api" not in step and "ssmc.kernel" not in step, "ssmc/step.py imports ssmc.api / ssmc.kernel"
    assert "ssmc.api" not in kernel, "ssmc/kernel.py imports ssmc.api"


def test_no_duck_typing_of_targets_or_modules():
    """api.py and kernel.py read targets and generated modules through the typed interface: no hasattr/getattr of a
    target member or a module global by name."""
    members = {"LAYOUT", "ENTRY", "PARAMS", "RETURNS", "MODULE_INFO", "kernels", "declared_layout", "prepare",
               "float64", "options", "name"}
    for f in ("api.py", "kernel.py"):
        for node in ast.walk(ast.parse((ROOT / "ssmc" / f).read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
                arg = node.args[1] if len(node.args) > 1 else None
                assert not (isinstance(arg, ast.Constant) and arg.value in members), \
                    f"ssmc/{f}:{node.lineno}: {node.func.id}(..., {arg.value!r})"


@pytest.mark.parametrize("target", ["xla", "triton"])
def test_spec_names_meet_the_module_record(target):
    """Arrays named like the identifiers the module record and the entry's edges write (MODULE_INFO, ModuleInfo,
    Param, Result, ew, sizes) are renamed in the generated code and still compute the spec."""
    names = {"x": "MODULE_INFO", "dt": "ModuleInfo", "A": "Param", "B": "Result", "C": "ew", "D": "sizes"}
    text = re.sub(r"\b(x|dt|A|B|C|D)\b", lambda m: names[m.group(1)], PERMUTED)  # PERMUTED with those names
    assert "in MODULE_INFO[t,b,p,h], ModuleInfo[h,b,t], Param[h], Result[b,g,n,t], ew[t,n,b,g], sizes[h]" in text
    k = ssmc.compile(text, target=target, interpret=target != "xla")
    std, s0 = _inputs(3)
    arrays, s_decl = _declared(std, s0)
    y, s = k.apply({names[n]: a for n, a in arrays.items()}, {"s": s_decl})
    ry, rs = _reference(std, s0)
    assert _err(y, _to(ry, STD["y"], DECL["y"])) < 1e-4 and _err(s, _to(rs, STD["s"], DECL["s"])) < 1e-4


def test_memo_follows_the_autoschedule_setting(monkeypatch, tmp_path):
    """compile's in-process memo keeps kernels compiled with SSMC_AUTOSCHEDULE=0 (no measured schedule) apart from
    those compiled with it on: before, a kernel compiled earlier in the process with it off was returned without a
    schedule once it was turned on (tests/test_cpu_schedule.py failed after tests/test_matmul_precision.py)."""
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("SSMC_AUTOSCHEDULE", "0")
    off = ssmc.compile(PERMUTED)
    monkeypatch.setenv("SSMC_AUTOSCHEDULE", "1")
    on = ssmc.compile(PERMUTED)
    assert off._auto is None and on is not off and on._auto is not None


BROADCAST = """
ssm bcast {
  dims b, t, h, g
  scan t
  group g -> h
  in x[t,b], w[h], c[g]
  state s[b]
  out y[h,b,t]
  s = 0.5*s + x
  y = s
}
"""


def test_xla_entry_broadcasts_results_along_dims_only_unused_inputs_give():
    """An out constant along declared dims (here h, split into (g, h/g) by the group) whose sizes only inputs the
    computation dropped give: the XLA entry still takes those inputs and reads their shapes (a regression the
    move of the layout change into the generated function first had: StopIteration at emit)."""
    k = ssmc.compile(BROADCAST, cache=False)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 3)).astype(np.float32)
    s0 = rng.standard_normal((3,)).astype(np.float32)
    y, s = k(x, np.ones((4,), np.float32), np.ones((2,), np.float32), initial_state=s0)
    want = np.zeros((5, 3))
    st = s0.astype(np.float64)
    for i in range(5):
        st = 0.5 * st + x[i]
        want[i] = st
    assert y.shape == (4, 3, 5) and s.shape == (3,)
    np.testing.assert_allclose(np.asarray(y), np.broadcast_to(want.T, (4, 3, 5)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(s), st, rtol=1e-6, atol=1e-6)
