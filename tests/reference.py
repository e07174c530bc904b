"""Independent float64 numpy references for the example specs in examples/*.ssm.

Every reference is written by hand from the spec's meaning, as an explicit sequential loop over the
scan dim t (one recurrence step per iteration); inside a step the work is vectorised over batch and
heads with numpy / einsum.  They share no code with the compiler.

    reference(inputs, initial_states=None) -> (outs: tuple, final_states: tuple)

outs are in the spec's `out` order, final states in its `state` order, all float64.

`make_inputs(name, rng, dims)` draws sensible float32 inputs (decays <= 1, never all zeros) and
`make_initial_states(name, rng, dims)` random float32 initial states.  `VARIANTS` is the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def central_differences(loss, arrays: dict, name: str, idx, eps: float = 1e-3) -> np.ndarray:
    """d loss() / d arrays[name].flat[i] for every i in idx, by central differences: `loss` takes no arguments and
    reads `arrays` (float64), whose entry is perturbed in place and restored."""
    out = []
    a = arrays[name]
    for i in idx:
        orig = a.flat[i]
        a.flat[i] = orig + eps
        lp = loss()
        a.flat[i] = orig - eps
        lm = loss()
        a.flat[i] = orig
        out.append((lp - lm) / (2 * eps))
    return np.array(out)


def full_gradient(loss, arrays: dict, eps: float = 1e-6) -> dict:
    """Every coordinate of every array's central difference (tiny problems only)."""
    return {k: central_differences(loss, arrays, k, range(a.size), eps).reshape(a.shape) for k, a in arrays.items()}


def reference_gradients(v, inputs: dict, init: dict, wo, ws, eps: float = 1e-6) -> dict:
    """The full gradient of loss = <outs, wo> + <final states, ws> of variant v's float64 loop by central
    differences, every coordinate: {input name: grad, "state:<name>": grad} (tests/test_adjoint.py and
    bench/backward.py's GPU check)."""
    arrays = {**{n: np.asarray(a, np.float64).copy() for n, a in inputs.items()},
              **{"state:" + n: np.asarray(a, np.float64).copy() for n, a in init.items()}}

    def loss():
        outs, states = v.reference({n: arrays[n] for n in inputs}, {n: arrays["state:" + n] for n in init})
        return sum(float(np.sum(o * w)) for o, w in zip(outs, wo)) + sum(float(np.sum(s * w))
                                                                         for s, w in zip(states, ws))
    return full_gradient(loss, arrays, eps)


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| in float64 (b is the reference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    den = np.linalg.norm(b.ravel())
    num = np.linalg.norm((a - b).ravel())
    if den == 0.0:
        return float(num)
    return float(num / den)


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def softplus(x):
    # log(1 + exp(x)), overflow-safe
    return np.logaddexp(0.0, x)


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def silu(x):
    return x * sigmoid(x)


def _expand_groups(a: np.ndarray, n_heads: int, axis: int) -> np.ndarray:
    """a has G groups along `axis`; head i uses group i // (H/G)."""
    n_groups = a.shape[axis]
    if n_heads % n_groups:
        raise ValueError(f"heads {n_heads} not a multiple of groups {n_groups}")
    return np.repeat(a, n_heads // n_groups, axis=axis)


def _init(initial_states, name, shape):
    if initial_states is not None and name in initial_states and initial_states[name] is not None:
        s = _f64(initial_states[name]).copy()
        if s.shape != tuple(shape):
            raise ValueError(f"initial state {name}: shape {s.shape}, expected {tuple(shape)}")
        return s
    return np.zeros(shape, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------

def ref_mamba2(inputs, initial_states=None):
    """h = exp(dt*A)*h + dt*B⊗x ;  y = C·h + D*x   (B, C shared by groups of heads)."""
    x, dt, A, B, C, D = (_f64(inputs[k]) for k in ("x", "dt", "A", "B", "C", "D"))
    nb, nt, nh, npp = x.shape
    nn = B.shape[-1]
    h = _init(initial_states, "h", (nb, nh, npp, nn))
    y = np.zeros((nb, nt, nh, npp))
    for t in range(nt):
        Bt = _expand_groups(B[:, t], nh, axis=1)          # b,h,n
        Ct = _expand_groups(C[:, t], nh, axis=1)          # b,h,n
        dtt = dt[:, t]                                    # b,h
        decay = np.exp(dtt * A[None, :])                  # b,h
        h = decay[:, :, None, None] * h + dtt[:, :, None, None] * x[:, t][:, :, :, None] * Bt[:, :, None, :]
        y[:, t] = np.einsum("bhn,bhpn->bhp", Ct, h) + D[None, :, None] * x[:, t]
    return (y,), (h,)


def ref_mamba2_gated(inputs, initial_states=None):
    """Mamba2 core with dt = softplus(dt_raw + dt_bias), A = -exp(A_log), z gate and grouped RMSNorm."""
    names = ("x", "dt_raw", "dt_bias", "A_log", "B", "C", "D", "z", "norm_w")
    x, dt_raw, dt_bias, A_log, B, C, D, z, norm_w = (_f64(inputs[k]) for k in names)
    nb, nt, nh, npp = x.shape
    ng, nn = B.shape[2], B.shape[3]
    s = _init(initial_states, "s", (nb, nh, npp, nn))
    y = np.zeros((nb, nt, nh, npp))
    A = -np.exp(A_log)                                    # h
    for t in range(nt):
        dtt = softplus(dt_raw[:, t] + dt_bias[None, :])   # b,h
        Bt = _expand_groups(B[:, t], nh, axis=1)
        Ct = _expand_groups(C[:, t], nh, axis=1)
        s = np.exp(dtt * A)[:, :, None, None] * s + dtt[:, :, None, None] * x[:, t][:, :, :, None] * Bt[:, :, None, :]
        yd = np.einsum("bhn,bhpn->bhp", Ct, s) + D[None, :, None] * x[:, t]
        e = yd * silu(z[:, t])                            # b,h,p
        eg = e.reshape(nb, ng, nh // ng, npp)             # consecutive heads form a group
        ms = np.mean(eg * eg, axis=(2, 3), keepdims=True)
        y[:, t] = (eg / np.sqrt(ms + 1e-5)).reshape(nb, nh, npp) * norm_w[None]
    return (y,), (s,)


def ref_causal_conv(x, w, window=None):
    """Causal depthwise conv along axis 1 of x[b, t, c...] with w[c..., K]: y[:, t] = sum_j w[..., j] *
    x[:, t - (K-1) + j], the K-1 steps before t = 0 taken from window[b, K-1, c...] (zeros if None).
    Returns (y, the last K-1 inputs of (window, x)), as a rolling buffer does it, one step at a time."""
    x, w = _f64(x), _f64(w)
    K = w.shape[-1]
    buf = np.zeros((x.shape[0], K - 1) + x.shape[2:]) if window is None else _f64(window).copy()
    y = np.zeros(x.shape)
    for t in range(x.shape[1]):
        buf = np.concatenate([buf, x[:, t:t + 1]], axis=1)   # oldest first, the current input last
        for j in range(K):
            y[:, t] += w[..., j] * buf[:, j]
        buf = buf[:, 1:]
    return y, buf


def ref_mamba2_conv(inputs, initial_states=None):
    """Mamba2 mixer core with its causal conv, as mamba_ssm computes it: one depthwise conv of width K over the
    concatenated raw channels xBC = [x (h*p) | B (g*n) | C (g*n)], kept as a rolling buffer of the last K-1 raw
    inputs, then bias + silu, split into x, B, C, and the mamba2_gated step.  Window states are [b, K-1, ...]."""
    xr, Br, Cr = (_f64(inputs[k]) for k in ("xr", "Br", "Cr"))
    nb, nt, nh, npp = xr.shape
    ng, nn = Br.shape[2], Br.shape[3]
    K = inputs["wx"].shape[-1]
    # one [channels, K] weight and [channels] bias over the concatenation, as in mamba's conv1d
    w = np.concatenate([_f64(inputs["wx"]).reshape(nh * npp, K), _f64(inputs["wB"]).reshape(ng * nn, K),
                        _f64(inputs["wC"]).reshape(ng * nn, K)])
    bias = np.concatenate([_f64(inputs[k]).ravel() for k in ("bx", "bB", "bC")])
    raw = np.concatenate([xr.reshape(nb, nt, -1), Br.reshape(nb, nt, -1), Cr.reshape(nb, nt, -1)], axis=2)
    win = np.concatenate([_init(initial_states, "xr_win", (nb, K - 1, nh, npp)).reshape(nb, K - 1, nh * npp),
                          _init(initial_states, "Br_win", (nb, K - 1, ng, nn)).reshape(nb, K - 1, ng * nn),
                          _init(initial_states, "Cr_win", (nb, K - 1, ng, nn)).reshape(nb, K - 1, ng * nn)], axis=2)
    conv = np.zeros_like(raw)
    for t in range(nt):
        buf = np.concatenate([win, raw[:, t:t + 1]], axis=1)   # b, K, channels: oldest first, current last
        conv[:, t] = silu(np.einsum("bkc,ck->bc", buf, w) + bias)
        win = buf[:, 1:]
    xs = [conv[:, :, :nh * npp].reshape(nb, nt, nh, npp)]
    xs.append(conv[:, :, nh * npp:nh * npp + ng * nn].reshape(nb, nt, ng, nn))
    xs.append(conv[:, :, nh * npp + ng * nn:].reshape(nb, nt, ng, nn))
    core = {k: inputs[k] for k in ("dt_raw", "dt_bias", "A_log", "D", "z", "norm_w")}
    core.update(x=xs[0], B=xs[1], C=xs[2])
    (y,), (s,) = ref_mamba2_gated(core, {"s": None if initial_states is None else initial_states.get("s")})
    cut = np.cumsum([0, nh * npp, ng * nn])
    wins = [win[:, :, cut[0]:cut[1]].reshape(nb, K - 1, nh, npp), win[:, :, cut[1]:cut[2]].reshape(nb, K - 1, ng, nn),
            win[:, :, cut[2]:].reshape(nb, K - 1, ng, nn)]
    return (y,), (s, *wins)


def ref_mamba1(inputs, initial_states=None):
    """dt = softplus(dt_raw + dt_bias); h = exp(-dt*exp(A_log))*h + (dt*x)⊗B; y = C·h + D*x."""
    x, dt_raw, dt_bias, A_log, B, C, D = (_f64(inputs[k]) for k in ("x", "dt_raw", "dt_bias", "A_log", "B", "C", "D"))
    nb, nt, nd = x.shape
    nn = A_log.shape[1]
    h = _init(initial_states, "h", (nb, nd, nn))
    y = np.zeros((nb, nt, nd))
    a = np.exp(A_log)                                     # d,n
    for t in range(nt):
        dtt = softplus(dt_raw[:, t] + dt_bias[None, :])   # b,d
        h = np.exp(-dtt[:, :, None] * a[None]) * h + (dtt * x[:, t])[:, :, None] * B[:, t][:, None, :]
        y[:, t] = np.einsum("bn,bdn->bd", C[:, t], h) + D[None, :] * x[:, t]
    return (y,), (h,)


def ref_gla(inputs, initial_states=None):
    """gk = logsigmoid(g_raw)/16; S = exp(gk)*S + k⊗v (decay along dk); o = q·S."""
    q, k, v, g_raw = (_f64(inputs[n]) for n in ("q", "k", "v", "g_raw"))
    nb, nt, nh, ndk = q.shape
    ndv = v.shape[-1]
    S = _init(initial_states, "S", (nb, nh, ndk, ndv))
    o = np.zeros((nb, nt, nh, ndv))
    for t in range(nt):
        gk = -softplus(-g_raw[:, t]) / 16.0               # b,h,dk
        S = np.exp(gk)[..., None] * S + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return (o,), (S,)


def ref_retnet(inputs, initial_states=None):
    """S = gamma*S + k⊗v; o = q·S."""
    q, k, v, gamma = (_f64(inputs[n]) for n in ("q", "k", "v", "gamma"))
    nb, nt, nh, ndk = q.shape
    ndv = v.shape[-1]
    S = _init(initial_states, "S", (nb, nh, ndk, ndv))
    o = np.zeros((nb, nt, nh, ndv))
    for t in range(nt):
        S = gamma[None, :, None, None] * S + np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return (o,), (S,)


def ref_linear_attention(inputs, initial_states=None):
    """Causal linear attention with softplus features and a normaliser state z; outs (o, den)."""
    q, k, v = (_f64(inputs[n]) for n in ("q", "k", "v"))
    nb, nt, nh, ndk = q.shape
    ndv = v.shape[-1]
    S = _init(initial_states, "S", (nb, nh, ndk, ndv))
    z = _init(initial_states, "z", (nb, nh, ndk))
    o = np.zeros((nb, nt, nh, ndv))
    den = np.zeros((nb, nt, nh))
    for t in range(nt):
        fq = softplus(q[:, t])
        fk = softplus(k[:, t])
        S = S + fk[..., None] * v[:, t][:, :, None, :]
        z = z + fk
        den[:, t] = np.sum(fq * z, axis=-1)
        num = np.einsum("bhk,bhkv->bhv", fq, S)
        o[:, t] = num / den[:, t][..., None]
    return (o, den), (S, z)


def ref_rwkv6(inputs, initial_states=None):
    """o = r·(S_{t-1} + u*k⊗v)  (read before the update);  S = exp(-exp(w))*S + k⊗v."""
    r, k, v, w, u = (_f64(inputs[n]) for n in ("r", "k", "v", "w", "u"))
    nb, nt, nh, ndk = r.shape
    ndv = v.shape[-1]
    S = _init(initial_states, "S", (nb, nh, ndk, ndv))
    o = np.zeros((nb, nt, nh, ndv))
    for t in range(nt):
        kv = np.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = np.einsum("bhk,bhkv->bhv", r[:, t], S + u[None, :, :, None] * kv)
        S = np.exp(-np.exp(w[:, t]))[..., None] * S + kv
    return (o,), (S,)


def ref_deltanet(inputs, initial_states=None):
    """kS = k·S_{t-1}; S = S + beta*k⊗(v - kS); o = q·S_t."""
    q, k, v, beta = (_f64(inputs[n]) for n in ("q", "k", "v", "beta"))
    nb, nt, nh, ndk = q.shape
    ndv = v.shape[-1]
    S = _init(initial_states, "S", (nb, nh, ndk, ndv))
    o = np.zeros((nb, nt, nh, ndv))
    for t in range(nt):
        kt = k[:, t]
        kS = np.einsum("bhk,bhkv->bhv", kt, S)
        S = S + (beta[:, t][..., None] * kt)[..., None] * (v[:, t] - kS)[:, :, None, :]
        o[:, t] = np.einsum("bhk,bhkv->bhv", q[:, t], S)
    return (o,), (S,)


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------

def _randn(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _unif(rng, lo, hi, *shape):
    return rng.uniform(lo, hi, size=shape).astype(np.float32)


def _in_mamba2(rng, d):
    b, t, h, p, n, g = d["b"], d["t"], d["h"], d["p"], d["n"], d["g"]
    return {
        "x": _randn(rng, b, t, h, p),
        "dt": (0.5 * softplus(rng.standard_normal((b, t, h)))).astype(np.float32) + np.float32(0.01),
        "A": -_unif(rng, 0.5, 2.0, h),
        "B": _randn(rng, b, t, g, n),
        "C": _randn(rng, b, t, g, n),
        "D": _randn(rng, h),
    }


def _in_mamba2_gated(rng, d):
    b, t, h, p, n, g = d["b"], d["t"], d["h"], d["p"], d["n"], d["g"]
    return {
        "x": _randn(rng, b, t, h, p),
        "dt_raw": _randn(rng, b, t, h),
        "dt_bias": _unif(rng, -2.0, 0.0, h),
        "A_log": np.log(_unif(rng, 0.5, 2.0, h)).astype(np.float32),
        "B": _randn(rng, b, t, g, n),
        "C": _randn(rng, b, t, g, n),
        "D": _randn(rng, h),
        "z": _randn(rng, b, t, h, p),
        "norm_w": (1.0 + _randn(rng, h, p, scale=0.1)).astype(np.float32),
    }


def _in_mamba2_conv(rng, d):
    b, t, h, p, n, g, k = d["b"], d["t"], d["h"], d["p"], d["n"], d["g"], d["k"]
    gated = _in_mamba2_gated(rng, d)
    out = {"xr": _randn(rng, b, t, h, p), "Br": _randn(rng, b, t, g, n), "Cr": _randn(rng, b, t, g, n),
           "wx": _randn(rng, h, p, k, scale=0.5), "bx": _randn(rng, h, p, scale=0.1),
           "wB": _randn(rng, g, n, k, scale=0.5), "bB": _randn(rng, g, n, scale=0.1),
           "wC": _randn(rng, g, n, k, scale=0.5), "bC": _randn(rng, g, n, scale=0.1)}
    out.update({key: gated[key] for key in ("dt_raw", "dt_bias", "A_log", "D", "z", "norm_w")})
    return out


def _in_mamba1(rng, d):
    b, t, dd, n = d["b"], d["t"], d["d"], d["n"]
    return {
        "x": _randn(rng, b, t, dd),
        "dt_raw": _randn(rng, b, t, dd),
        "dt_bias": _unif(rng, -2.5, -0.5, dd),
        "A_log": np.log(_unif(rng, 0.5, 4.0, dd, n)).astype(np.float32),
        "B": _randn(rng, b, t, n),
        "C": _randn(rng, b, t, n),
        "D": _randn(rng, dd),
    }


def _qkv(rng, d, qname="q"):
    b, t, h, dk, dv = d["b"], d["t"], d["h"], d["dk"], d["dv"]
    return {
        qname: _randn(rng, b, t, h, dk),
        "k": _randn(rng, b, t, h, dk),
        "v": _randn(rng, b, t, h, dv),
    }


def _in_gla(rng, d):
    out = _qkv(rng, d)
    out["g_raw"] = _randn(rng, d["b"], d["t"], d["h"], d["dk"], scale=2.0)
    return out


def _in_retnet(rng, d):
    out = _qkv(rng, d)
    out["gamma"] = _unif(rng, 0.8, 0.99, d["h"])
    return out


def _in_linear_attention(rng, d):
    return _qkv(rng, d)


def _in_rwkv6(rng, d):
    out = _qkv(rng, d, qname="r")
    out["w"] = _randn(rng, d["b"], d["t"], d["h"], d["dk"], scale=0.7)   # decay exp(-exp(w)) in (0, 1)
    out["u"] = _randn(rng, d["h"], d["dk"], scale=0.5)
    return {k: out[k] for k in ("r", "k", "v", "w", "u")}


def _in_deltanet(rng, d):
    out = _qkv(rng, d)
    k = out["k"].astype(np.float64)
    out["k"] = (k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32)
    out["beta"] = _unif(rng, 0.05, 0.95, d["b"], d["t"], d["h"])
    return out


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------

def _kv_state(d):
    return {"S": (d["b"], d["h"], d["dk"], d["dv"])}


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    state_names: tuple[str, ...]
    _make_inputs: Callable = field(repr=False)
    reference: Callable = field(repr=False)
    small_dims: dict = field(default_factory=dict)
    _state_shapes: Callable = field(default=None, repr=False)
    groups: tuple[tuple[str, str], ...] = ()           # (group dim, head dim) pairs

    @property
    def spec_text(self) -> str:
        return self.path.read_text(encoding="utf-8")

    def dims(self, **overrides) -> dict:
        d = dict(self.small_dims)
        d.update(overrides)
        return d

    def state_shapes(self, dims: dict | None = None) -> dict:
        return self._state_shapes(self.dims(**(dims or {})))

    def make_inputs(self, rng, dims: dict | None = None) -> dict:
        d = self.dims(**(dims or {}))
        for gd, hd in self.groups:
            if d[hd] % d[gd]:
                raise ValueError(f"{self.name}: {hd}={d[hd]} is not a multiple of {gd}={d[gd]}")
        out = self._make_inputs(rng, d)
        assert tuple(out) == self.in_names, (tuple(out), self.in_names)
        return out

    def make_initial_states(self, rng, dims: dict | None = None) -> dict:
        shapes = self.state_shapes(dims)
        out = {}
        for name in self.state_names:
            if self.name == "linear_attention" and name == "z":
                # the normaliser state must stay positive, or den = fq·z can come close to 0
                out[name] = _unif(rng, 0.5, 1.5, *shapes[name])
            else:
                out[name] = _randn(rng, *shapes[name], scale=0.5)
        return out


_KV_DIMS = {"b": 2, "t": 37, "h": 3, "dk": 8, "dv": 6}

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("mamba2", EXAMPLES / "mamba2.ssm", ("x", "dt", "A", "B", "C", "D"), ("y",), ("h",),
                _in_mamba2, ref_mamba2, {"b": 2, "t": 37, "h": 4, "p": 8, "n": 8, "g": 2},
                lambda d: {"h": (d["b"], d["h"], d["p"], d["n"])}, groups=(("g", "h"),)),
        Variant("mamba2_gated", EXAMPLES / "mamba2_gated.ssm",
                ("x", "dt_raw", "dt_bias", "A_log", "B", "C", "D", "z", "norm_w"), ("y",), ("s",),
                _in_mamba2_gated, ref_mamba2_gated, {"b": 2, "t": 37, "h": 4, "p": 8, "n": 8, "g": 2},
                lambda d: {"s": (d["b"], d["h"], d["p"], d["n"])}, groups=(("g", "h"),)),
        Variant("mamba2_conv", EXAMPLES / "mamba2_conv.ssm",
                ("xr", "Br", "Cr", "wx", "bx", "wB", "bB", "wC", "bC",
                 "dt_raw", "dt_bias", "A_log", "D", "z", "norm_w"),
                ("y",), ("s", "xr_win", "Br_win", "Cr_win"), _in_mamba2_conv, ref_mamba2_conv,
                {"b": 2, "t": 37, "h": 4, "p": 8, "n": 8, "g": 2, "k": 4},
                lambda d: {"s": (d["b"], d["h"], d["p"], d["n"]), "xr_win": (d["b"], d["k"] - 1, d["h"], d["p"]),
                           "Br_win": (d["b"], d["k"] - 1, d["g"], d["n"]),
                           "Cr_win": (d["b"], d["k"] - 1, d["g"], d["n"])}, groups=(("g", "h"),)),
        Variant("mamba1", EXAMPLES / "mamba1.ssm", ("x", "dt_raw", "dt_bias", "A_log", "B", "C", "D"), ("y",), ("h",),
                _in_mamba1, ref_mamba1, {"b": 2, "t": 37, "d": 8, "n": 6},
                lambda d: {"h": (d["b"], d["d"], d["n"])}),
        Variant("gla", EXAMPLES / "gla.ssm", ("q", "k", "v", "g_raw"), ("o",), ("S",),
                _in_gla, ref_gla, dict(_KV_DIMS), _kv_state),
        Variant("retnet", EXAMPLES / "retnet.ssm", ("q", "k", "v", "gamma"), ("o",), ("S",),
                _in_retnet, ref_retnet, dict(_KV_DIMS), _kv_state),
        Variant("linear_attention", EXAMPLES / "linear_attention.ssm", ("q", "k", "v"), ("o", "den"), ("S", "z"),
                _in_linear_attention, ref_linear_attention, dict(_KV_DIMS),
                lambda d: {"S": (d["b"], d["h"], d["dk"], d["dv"]), "z": (d["b"], d["h"], d["dk"])}),
        Variant("rwkv6", EXAMPLES / "rwkv6.ssm", ("r", "k", "v", "w", "u"), ("o",), ("S",),
                _in_rwkv6, ref_rwkv6, dict(_KV_DIMS), _kv_state),
        Variant("deltanet", EXAMPLES / "deltanet.ssm", ("q", "k", "v", "beta"), ("o",), ("S",),
                _in_deltanet, ref_deltanet, dict(_KV_DIMS), _kv_state),
    ]
}


def make_inputs(name: str, rng, dims: dict | None = None) -> dict[str, np.ndarray]:
    """Random float32 inputs for variant `name`; `dims` overrides the variant's small_dims."""
    return VARIANTS[name].make_inputs(rng, dims)


def make_initial_states(name: str, rng, dims: dict | None = None) -> dict[str, np.ndarray]:
    return VARIANTS[name].make_initial_states(rng, dims)


def reference(name: str, inputs: dict, initial_states: dict | None = None):
    return VARIANTS[name].reference(inputs, initial_states)
