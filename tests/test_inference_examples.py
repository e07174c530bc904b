"""examples/mamba2_layer.py and examples/generate.py run (tiny sizes), and the layer's full forward matches a float64
numpy Mamba2 mixer (in_proj split, one conv over the concatenated x/B/C channels, gated SSM, out_proj)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from reference import ref_mamba2_conv, rel_l2

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import mamba2_layer as m2  # noqa: E402


@pytest.mark.parametrize("ngroups", [1, 2])
def test_layer_matches_numpy_mixer(ngroups):
    cfg = m2.Mamba2Config(d_model=16, d_state=4, d_conv=4, headdim=8, ngroups=ngroups)
    params = m2.init_params(cfg, jax.random.PRNGKey(3))
    u = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (2, 11, cfg.d_model)), np.float64)
    out, state = m2.mixer(params, u.astype(np.float32), cfg)
    P = {k: np.asarray(v, np.float64) for k, v in params.items()}
    # the numpy mixer: split in_proj as mamba_ssm does, then the float64 core (tests/reference.py) and out_proj
    zxbcdt = u @ P["in_proj"]
    h, p, g, n, K = cfg.nheads, cfg.headdim, ngroups, cfg.d_state, cfg.d_conv
    z, xBC, dt = np.split(zxbcdt, [cfg.d_inner, cfg.d_inner + cfg.conv_dim], axis=-1)
    x, B, C = np.split(xBC, [cfg.d_inner, cfg.d_inner + g * n], axis=-1)
    w, b = P["conv_w"], P["conv_b"]
    cut = [cfg.d_inner, cfg.d_inner + g * n]
    core = {"xr": x.reshape(2, 11, h, p), "Br": B.reshape(2, 11, g, n), "Cr": C.reshape(2, 11, g, n),
            "wx": w[:cut[0]].reshape(h, p, K), "wB": w[cut[0]:cut[1]].reshape(g, n, K),
            "wC": w[cut[1]:].reshape(g, n, K), "bx": b[:cut[0]], "bB": b[cut[0]:cut[1]], "bC": b[cut[1]:],
            "dt_raw": dt, "dt_bias": P["dt_bias"], "A_log": P["A_log"], "D": P["D"], "z": z.reshape(2, 11, h, p),
            "norm_w": P["norm_w"].reshape(h, p)}
    (y,), states = ref_mamba2_conv(core)
    want = y.reshape(2, 11, cfg.d_inner) @ P["out_proj"]
    assert rel_l2(out, want) < 1e-4
    for name, s in zip(("s", "xr_win", "Br_win", "Cr_win"), states):
        assert rel_l2(state[name], s) < 1e-4, name
    # the windows in mamba_ssm's conv-state layout: the last K-1 raw xBC inputs, channels first
    conv_state = np.asarray(m2.to_mamba_conv_state(state, cfg))
    np.testing.assert_allclose(conv_state, xBC[:, -(K - 1):].transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
    full = np.concatenate([np.zeros((2, cfg.conv_dim, 1)), conv_state], axis=2)  # mamba's d_conv columns
    back = m2.from_mamba_conv_state(full, cfg)
    assert all(np.array_equal(np.asarray(back[n]), np.asarray(state[n])) for n in back)


def test_layer_example_runs(capsys):
    m2.main(["--batch", "1", "--seqlen", "12", "--prompt", "2", "--d-model", "16", "--d-state", "4",
             "--headdim", "8"])
    out = capsys.readouterr().out
    assert "prefill + 10 decode steps == full forward" in out and out.strip().endswith("ok")


def test_generate_example_runs():
    proc = subprocess.run([sys.executable, str(EXAMPLES / "generate.py"), "--layers", "2", "--prompt", "8", "--new",
                           "5", "--d-model", "16", "--d-state", "4", "--headdim", "8", "--vocab", "32", "--check"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tokens/s" in proc.stdout and "picks the same tokens: ok" in proc.stdout, proc.stdout
