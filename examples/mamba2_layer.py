"""A complete Mamba2 mixer layer in JAX whose conv + SSM + gated-norm core is one ssmc spec (mamba2_conv.ssm).

    u -> in_proj -> z | xBC | dt
         xBC -> causal depthwise conv (width d_conv) + bias -> silu -> x | B | C        \
         y = SSM(x, dt softplus + bias, A = -exp(A_log), B, C) + D*x                    } the ssmc spec
         y = grouped RMSNorm(y * silu(z)) * norm_w                                     /
      -> out_proj

The layout follows mamba_ssm's Mamba2 (in_proj splits into z, xBC, dt; the conv runs over the concatenated
x/B/C channels; the norm is grouped by ngroups). The spec writes that one depthwise conv as one conv per channel
group - the same thing, since a depthwise conv treats every channel on its own - so the in_proj output and the
conv weight are only reshaped here, never copied per head.

Serving: `mixer(params, u, cfg, state)` with u [batch, time, d_model] runs the kernel call (a prefill, or the whole
sequence) from `state`; with u [batch, d_model] it runs one decode step through `Kernel.step`. Both return
(out, new_state), and new_state (the SSM state and the three conv windows) is what `ssmc.StateCache` stores.

    python examples/mamba2_layer.py      # checks prefill + token-by-token decode == the full forward
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ssmc

SPEC = Path(__file__).resolve().with_name("mamba2_conv.ssm")


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    d_model: int = 64
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    headdim: int = 16
    ngroups: int = 1

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def sizes(self) -> dict:
        """Dim sizes of the spec, for ssmc.StateCache.create."""
        return {"h": self.nheads, "p": self.headdim, "n": self.d_state, "g": self.ngroups, "k": self.d_conv}


def core():
    """The compiled conv + SSM + norm core (ssmc caches it: compiled once per process)."""
    return ssmc.compile(SPEC)


def init_params(cfg: Mamba2Config, key) -> dict:
    """Random weights initialised as mamba_ssm does (dt in [1e-3, 1e-1] log-uniform, A in [1, 16], D = 1)."""
    ks = jax.random.split(key, 6)
    d_in_proj = 2 * cfg.d_inner + 2 * cfg.ngroups * cfg.d_state + cfg.nheads
    dt = jnp.exp(jax.random.uniform(ks[0], (cfg.nheads,)) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    bound = 1 / math.sqrt(cfg.d_conv)
    return {
        "in_proj": jax.random.normal(ks[1], (cfg.d_model, d_in_proj)) / math.sqrt(cfg.d_model),
        "conv_w": jax.random.uniform(ks[2], (cfg.conv_dim, cfg.d_conv), minval=-bound, maxval=bound),
        "conv_b": jax.random.uniform(ks[3], (cfg.conv_dim,), minval=-bound, maxval=bound),
        "dt_bias": dt + jnp.log(-jnp.expm1(-dt)),  # softplus^-1(dt)
        "A_log": jnp.log(jax.random.uniform(ks[4], (cfg.nheads,), minval=1.0, maxval=16.0)),
        "D": jnp.ones((cfg.nheads,)),
        "norm_w": jnp.ones((cfg.d_inner,)),
        "out_proj": jax.random.normal(ks[5], (cfg.d_inner, cfg.d_model)) / math.sqrt(cfg.d_inner),
    }


def core_inputs(params: dict, zxbcdt, cfg: Mamba2Config) -> dict:
    """Split in_proj's output [b, t, d_in_proj] and the conv parameters into the spec's inputs (reshapes)."""
    b, t = zxbcdt.shape[:2]
    h, p, g, n, K = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state, cfg.d_conv
    cuts = np.cumsum([cfg.d_inner, cfg.d_inner, g * n, g * n])  # z | x | B | C | dt
    z, xr, Br, Cr, dt = jnp.split(zxbcdt, cuts, axis=-1)
    w, bias = params["conv_w"], params["conv_b"]
    wx, wB, wC = jnp.split(w, cuts[1:3] - cfg.d_inner, axis=0)
    bx, bB, bC = jnp.split(bias, cuts[1:3] - cfg.d_inner)
    return {"xr": xr.reshape(b, t, h, p), "Br": Br.reshape(b, t, g, n), "Cr": Cr.reshape(b, t, g, n),
            "wx": wx.reshape(h, p, K), "bx": bx.reshape(h, p), "wB": wB.reshape(g, n, K), "bB": bB.reshape(g, n),
            "wC": wC.reshape(g, n, K), "bC": bC.reshape(g, n), "dt_raw": dt, "dt_bias": params["dt_bias"],
            "A_log": params["A_log"], "D": params["D"], "z": z.reshape(b, t, h, p),
            "norm_w": params["norm_w"].reshape(h, p)}


def mixer(params: dict, u, cfg: Mamba2Config, state: dict | None = None, kernel: ssmc.Kernel | None = None):
    """The Mamba2 mixer: u [b, t, d_model] (kernel call: prefill / full sequence) or u [b, d_model] (one decode
    step) from `state` ({state name: array} as in core().states, or None for zeros) -> (out, new_state).
    `kernel`: the core compiled otherwise (another target, say); default core()."""
    k = kernel if kernel is not None else core()
    one = u.ndim == 2
    x = u[:, None] if one else u
    inputs = core_inputs(params, x @ params["in_proj"], cfg)
    if one:
        y, *new = k.step(state, **inputs)                  # the scan length 1 form, from the carried states
    else:
        y, *new = k(**inputs, initial_states=state)        # chunk-parallel (SSD) over the whole prompt
    b, t = x.shape[:2]
    out = y.reshape(b, t, cfg.d_inner) @ params["out_proj"]
    return (out[:, 0] if one else out), dict(zip([s for s, _ in k.states], new))


def to_mamba_conv_state(state: dict, cfg: Mamba2Config):
    """The three conv windows as mamba_ssm's / EasyDeL's one conv state [b, conv_dim, d_conv - 1] over the
    concatenated x/B/C channels (theirs keeps d_conv columns; the oldest is never read again)."""
    b = state["xr_win"].shape[0]
    w = [state[n].reshape(b, cfg.d_conv - 1, -1) for n in ("xr_win", "Br_win", "Cr_win")]
    return jnp.concatenate(w, axis=-1).transpose(0, 2, 1)


def from_mamba_conv_state(conv_state, cfg: Mamba2Config) -> dict:
    """Inverse of to_mamba_conv_state; takes [b, conv_dim, d_conv] (mamba_ssm's layout) or [b, conv_dim, d_conv-1]."""
    b, K1 = conv_state.shape[0], cfg.d_conv - 1
    w = conv_state[:, :, conv_state.shape[2] - K1:].transpose(0, 2, 1)  # the last d_conv - 1 inputs, oldest first
    xw, Bw, Cw = jnp.split(w, [cfg.d_inner, cfg.d_inner + cfg.ngroups * cfg.d_state], axis=-1)
    g, n = cfg.ngroups, cfg.d_state
    return {"xr_win": xw.reshape(b, K1, cfg.nheads, cfg.headdim), "Br_win": Bw.reshape(b, K1, g, n),
            "Cr_win": Cw.reshape(b, K1, g, n)}


def check(cfg: Mamba2Config, batch: int, seqlen: int, prompt: int, seed: int = 0) -> float:
    """Prefill `prompt` tokens, then generate the rest one token at a time through a one-layer StateCache;
    returns the rel. error against one full-sequence forward (and prints timings)."""
    params = init_params(cfg, jax.random.PRNGKey(seed))
    u = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, seqlen, cfg.d_model))
    full = jax.jit(lambda p, u: mixer(p, u, cfg)[0])
    t0 = time.perf_counter()
    y_full = jax.block_until_ready(full(params, u))
    t_full = time.perf_counter() - t0

    @jax.jit
    def prefill(params, u, cache):
        y, new = mixer(params, u, cfg, cache.layer(0))
        return y, cache.update(0, new, num_tokens=u.shape[1])

    @jax.jit
    def decode(params, u_t, cache):
        y, new = mixer(params, u_t, cfg, cache.layer(0))
        return y, cache.update(0, new, num_tokens=1)

    cache = ssmc.StateCache.create(core(), num_layers=1, batch_size=batch, sizes=cfg.sizes)
    y0, cache = prefill(params, u[:, :prompt], cache)
    ys = [y0]
    for t in range(prompt, seqlen):
        y, cache = decode(params, u[:, t], cache)
        ys.append(y[:, None])
    y_inc = jax.block_until_ready(jnp.concatenate(ys, axis=1))
    assert int(cache.positions[0]) == seqlen
    err = float(jnp.linalg.norm(y_inc - y_full) / jnp.linalg.norm(y_full))
    print(f"mamba2 layer: d_model={cfg.d_model} heads={cfg.nheads}x{cfg.headdim} state={cfg.d_state} "
          f"groups={cfg.ngroups} conv={cfg.d_conv}; batch {batch}, {seqlen} tokens (prompt {prompt})")
    print(f"  full forward (incl. compile) {t_full * 1e3:.0f} ms; prefill + {seqlen - prompt} decode steps == full "
          f"forward: rel. error {err:.2e}")
    return err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--headdim", type=int, default=16)
    ap.add_argument("--ngroups", type=int, default=1)
    ap.add_argument("--d-conv", type=int, default=4)
    a = ap.parse_args(argv)
    cfg = Mamba2Config(d_model=a.d_model, d_state=a.d_state, d_conv=a.d_conv, headdim=a.headdim, ngroups=a.ngroups)
    err = check(cfg, a.batch, a.seqlen, a.prompt)
    if not err < 1e-5:
        raise SystemExit(f"FAILED: prefill + decode differs from the full forward by {err:.2e}")
    print("ok")


if __name__ == "__main__":
    main()
