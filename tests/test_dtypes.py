"""Precision follows the activations (issue 12, item 1): bf16/fp16 activations next to fp32 parameters (Mamba2's
A, D; GLA's fp32 log-gate) run their contractions at the activations' precision and return outs in their dtype,
on every target and in k.step; states stay fp32. float64 inputs (issue 10, item 7) compute in float64 on the XLA
target and are refused by the kernel targets."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssmc
from reference import VARIANTS, rel_l2

TARGETS = ["xla", "triton", "tpu"]
# the interpreters are slow: the core mixed-precision check runs on every target in the fast set, the rest are slow
SLOW_KERNELS = ["xla"] + [pytest.param(t, marks=pytest.mark.slow) for t in ("triton", "tpu")]
# Mamba2 as every checkpoint calls it: A, D fp32 parameters; x, dt, B, C bf16
MAMBA2_FP32 = {"A", "D"}
GLA_FP32 = {"g_raw"}  # fla takes the log-gate in fp32 next to bf16 q, k, v


def _kernel(name, target, **kw):
    opts = {"interpret": True} if target != "xla" else {}
    return ssmc.compile(str(VARIANTS[name].path), target=target, chunk_size=16, **opts, **kw)


def _mixed(v, rng, fp32_names, low=jnp.bfloat16, t=40):
    inputs = v.make_inputs(rng, {"t": t})
    mixed = {n: jnp.asarray(x) if n in fp32_names else jnp.asarray(x).astype(low) for n, x in inputs.items()}
    rounded = {n: np.asarray(x.astype(jnp.float32)) for n, x in mixed.items()}
    return mixed, rounded


class _Spy:
    """Records the keyword options (mm, out_dtype) Kernel hands to the generated function; restores it after."""

    def __init__(self, k):
        self.k, self.fn, self.calls = k, k._fn, []

    def __enter__(self):
        def fn(*a, **kw):
            self.calls.append(kw)
            return self.fn(*a, **kw)
        self.k._fn = fn
        self.k._jitted = jax.jit(self.k._run, static_argnums=(0,))  # a fresh trace through the spy
        return self

    def __exit__(self, *exc):
        self.k._fn = self.fn
        self.k._jitted = jax.jit(self.k._run, static_argnums=(0,))


def _dots(jaxpr):
    """Every dot_general in a (closed) jaxpr and the jaxprs nested in its equations (jit, scan, pallas_call)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for e in jaxpr.eqns:
        if e.primitive.name == "dot_general":
            yield e
        for p in e.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _dots(sub)


@pytest.mark.parametrize("target", TARGETS)
def test_mixed_mamba2_runs_at_bf16(rng, target):
    """A, D fp32 with x, dt, B, C bf16: bf16 matmul operands, bf16 y, fp32 final state, bf16-level errors against
    the float64 loop on the rounded inputs. Before: the kernel ran fp32 and returned y in float32."""
    v = VARIANTS["mamba2"]
    mixed, rounded = _mixed(v, rng, MAMBA2_FP32)
    k = _kernel("mamba2", target)
    with _Spy(k) as spy:
        y, h = k(**mixed)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    (opts,) = spy.calls
    assert jnp.dtype(opts["mm"]) == jnp.bfloat16, opts
    if target != "xla":
        assert jnp.dtype(opts["out_dtype"]) == jnp.bfloat16, opts
    (ry,), (rh,) = v.reference(rounded)
    assert rel_l2(np.asarray(y.astype(jnp.float32)), ry) < 2e-2
    assert rel_l2(np.asarray(h), rh) < 2e-2


def _mixed_mamba2_dots(rng, target):
    """Every contraction in the traced program of Mamba2 on `target` with bf16 activations, fp32 A and D."""
    mixed, _ = _mixed(VARIANTS["mamba2"], rng, MAMBA2_FP32)
    k = _kernel("mamba2", target)
    dots = list(_dots(jax.make_jaxpr(lambda kw: k(**kw))(mixed)))
    assert dots, "no contraction found"
    return dots


def _assert_bf16_operands_fp32_result(dots):
    for e in dots:
        assert [x.aval.dtype for x in e.invars] == [jnp.bfloat16] * 2, e
        assert e.outvars[0].aval.dtype == jnp.float32, e


def test_mixed_xla_dots_are_bf16(rng):
    """The XLA program's contractions take bf16 operands with fp32 accumulation."""
    _assert_bf16_operands_fp32_result(_mixed_mamba2_dots(rng, "xla"))


@pytest.mark.slow
def test_mixed_tpu_kernel_dots_are_bf16(rng):
    """Inside the Pallas kernel (interpreted here) the matmul operands are bf16, accumulation fp32."""
    dots = _mixed_mamba2_dots(rng, "tpu")
    # the in-kernel cumsum is an fp32 triangular matmul by design; every other dot runs on bf16 operands
    mm = [e for e in dots if e.invars[0].aval.dtype != jnp.float32 or e.invars[1].aval.dtype != jnp.float32]
    assert len(mm) >= 3, [str(e) for e in dots]
    _assert_bf16_operands_fp32_result(mm)


@pytest.mark.parametrize("target", SLOW_KERNELS)
def test_gla_bf16_qkv_fp32_gate(rng, target):
    """fla's convention: q, k, v bf16, the log-gate fp32 -> o bf16 (fla returns o in v's dtype)."""
    v = VARIANTS["gla"]
    mixed, rounded = _mixed(v, rng, GLA_FP32, t=24)
    k = _kernel("gla", target)
    with _Spy(k) as spy:
        o, S = k(**mixed)
    assert o.dtype == jnp.bfloat16 and S.dtype == jnp.float32
    assert jnp.dtype(spy.calls[0]["mm"]) == jnp.bfloat16
    (ro,), (rS,) = v.reference(rounded)
    assert rel_l2(np.asarray(o.astype(jnp.float32)), ro) < 3e-2
    assert rel_l2(np.asarray(S), rS) < 3e-2


@pytest.mark.parametrize("target", SLOW_KERNELS)
def test_step_follows_the_activations(rng, target):
    """k.step with one bf16 token and fp32 parameters returns a bf16 out and fp32 states."""
    v = VARIANTS["mamba2"]
    mixed, rounded = _mixed(v, rng, MAMBA2_FP32, t=3)
    k = _kernel("mamba2", target)
    state = None
    ys = []
    for s in range(3):
        tok = {n: (x[:, s] if n not in MAMBA2_FP32 else x) for n, x in mixed.items()}
        y, state = k.step(state, **tok)
        assert y.dtype == jnp.bfloat16 and state.dtype == jnp.float32
        ys.append(np.asarray(y.astype(jnp.float32)))
    (ry,), (rh,) = v.reference(rounded)
    assert rel_l2(np.stack(ys, 1), ry) < 2e-2
    assert rel_l2(np.asarray(state), rh) < 2e-2


@pytest.mark.parametrize("target", ["xla", pytest.param("triton", marks=pytest.mark.slow)])
def test_out_dtype_option(rng, target):
    """out_dtype chooses the outs' dtype; the matmuls still follow the activations (bf16)."""
    v = VARIANTS["mamba2"]
    mixed, rounded = _mixed(v, rng, MAMBA2_FP32)
    k = _kernel("mamba2", target, out_dtype=jnp.float32)
    with _Spy(k) as spy:
        y, h = k(**mixed)
    assert y.dtype == jnp.float32 and h.dtype == jnp.float32
    assert jnp.dtype(spy.calls[0]["mm"]) == jnp.bfloat16
    (ry,), _ = v.reference(rounded)
    assert rel_l2(np.asarray(y), ry) < 2e-2
    y2, _ = _kernel("mamba2", target, out_dtype="float16")(**mixed)
    assert y2.dtype == jnp.float16


def test_matmul_float32_keeps_full_precision_and_bf16_outs(rng):
    v = VARIANTS["mamba2"]
    mixed, rounded = _mixed(v, rng, MAMBA2_FP32)
    k = _kernel("mamba2", "xla", matmul="float32")
    with _Spy(k) as spy:
        y, h = k(**mixed)
    assert jnp.dtype(spy.calls[0]["mm"]) == jnp.float32
    assert y.dtype == jnp.bfloat16
    _, (rh,) = v.reference(rounded)
    assert rel_l2(np.asarray(h), rh) < 1e-5  # full-precision contractions: fp32-level state error


def test_fp16_activations_with_fp32_parameters(rng):
    v = VARIANTS["mamba2"]
    mixed, rounded = _mixed(v, rng, MAMBA2_FP32, low=jnp.float16)
    y, h = _kernel("mamba2", "xla")(**mixed)
    assert y.dtype == jnp.float16 and h.dtype == jnp.float32
    (ry,), _ = v.reference(rounded)
    assert rel_l2(np.asarray(y.astype(jnp.float32)), ry) < 1e-2


def test_bf16_next_to_fp16_is_an_error(rng):
    v = VARIANTS["mamba2"]
    mixed, _ = _mixed(v, rng, MAMBA2_FP32)
    mixed["C"] = mixed["C"].astype(jnp.float16)
    with pytest.raises(ssmc.ShapeError, match=r"input 'x' is bfloat16 but input 'C' is float16"):
        _kernel("mamba2", "xla")(**mixed)


def test_out_dtype_option_is_checked():
    for bad in ("int32", "nonsense", 3):
        with pytest.raises(ssmc.SSMCError, match="out_dtype"):
            _kernel("mamba2", "xla", out_dtype=bad)


# ---- float64 (issue 10, item 7) -----------------------------------------------------------------------------------
def _x64():
    """x64 on for a block (tests/conftest.py turns it off for the session)."""
    ctx = getattr(jax, "enable_x64", None)
    return ctx(True) if ctx is not None else jax.experimental.enable_x64()


def _call(k, v, inputs, init):
    kw = dict(inputs)
    if len(v.state_names) == 1:
        kw["initial_state"] = init[v.state_names[0]]
    else:
        kw["initial_states"] = init
    return k(**kw)


@pytest.mark.parametrize("chunk_size", [None, 1], ids=["chunked", "sequential"])
@pytest.mark.parametrize("name", ["mamba2_gated", "gla", "mamba1", "deltanet", "mamba2_conv"])
def test_float64_on_xla(rng, name, chunk_size):
    """float64 inputs compute in float64 on the XLA target: outs and states float64, errors at float64 rounding
    against the float64 loop. Before: computed and returned as float32 (errors ~1e-7)."""
    v = VARIANTS[name]
    inputs = {n: a.astype(np.float64) for n, a in v.make_inputs(rng, {"t": 40}).items()}
    init = {n: a.astype(np.float64) for n, a in v.make_initial_states(rng, {"t": 40}).items()}
    ref_outs, ref_states = v.reference(inputs, init)
    k = ssmc.compile(str(v.path), chunk_size=chunk_size)
    with _x64():
        res = _call(k, v, {n: jnp.asarray(a) for n, a in inputs.items()}, init)
    for got, want in zip(res, list(ref_outs) + list(ref_states)):
        assert got.dtype == jnp.float64
        assert rel_l2(np.asarray(got), want) < 1e-12


def test_float64_gradients_and_step(rng):
    """Gradient checks in float64 (what researchers use it for) and k.step in float64."""
    from jax.test_util import check_grads
    v = VARIANTS["mamba2"]
    inputs = {n: a.astype(np.float64) for n, a in v.make_inputs(rng, {"t": 9, "b": 1}).items()}
    k = ssmc.compile(str(v.path))
    with _x64():
        x = {n: jnp.asarray(a) for n, a in inputs.items()}

        def loss(xx, B):
            y, h = k(**{**x, "x": xx, "B": B})
            return jnp.sum(y * jnp.cos(y)) + jnp.sum(h ** 2)
        check_grads(loss, (x["x"], x["B"]), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)
        y0, h = k.step(None, **{n: (a[:, 0] if n not in ("A", "D") else a) for n, a in x.items()})
        assert y0.dtype == jnp.float64 and h.dtype == jnp.float64
    (ry,), _ = v.reference({n: a[:, :1] if n not in ("A", "D") else a for n, a in inputs.items()})
    assert rel_l2(np.asarray(y0), ry[:, 0]) < 1e-12


def test_float32_under_x64_stays_float32(rng):
    """With x64 on, float32 inputs (and float64 parameters next to float32 activations: the narrowest wins) still
    compute and return float32."""
    v = VARIANTS["mamba2"]
    inputs = v.make_inputs(rng, {"t": 40})
    k = ssmc.compile(str(v.path))
    with _x64():
        x = {n: jnp.asarray(a, jnp.float64 if n in MAMBA2_FP32 else jnp.float32) for n, a in inputs.items()}
        y, h = k(**x)
    assert y.dtype == jnp.float32 and h.dtype == jnp.float32
    (ry,), (rh,) = v.reference(inputs)
    assert rel_l2(np.asarray(y), ry) < 1e-5


@pytest.mark.parametrize("target", ["triton", "tpu"])
def test_float64_on_kernel_targets_is_a_target_error(rng, target):
    v = VARIANTS["mamba2"]
    inputs = {n: a.astype(np.float64) for n, a in v.make_inputs(rng, {"t": 8}).items()}
    k = _kernel("mamba2", target)
    with _x64(), pytest.raises(ssmc.TargetError, match=rf"input 'x' is float64.*target='xla'"):
        k(**{n: jnp.asarray(a) for n, a in inputs.items()})
