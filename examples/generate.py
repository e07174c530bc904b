"""Generate tokens with a tiny random-weight Mamba2 language model: a few mixer layers (examples/mamba2_layer.py,
whose core is the ssmc spec mamba2_conv.ssm) with pre-norm residuals, tied embeddings, one ssmc.StateCache for all
layers. The prompt runs as one prefill (the chunk-parallel kernel), then tokens are decoded one at a time (each
layer's `Kernel.step` from its cached states), both jitted with the cache as a pytree argument.

    python examples/generate.py                      # prints tokens/s for prefill and decode
    python examples/generate.py --layers 8 --d-model 256 --prompt 512 --new 64
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mamba2_layer as m2  # noqa: E402

import ssmc  # noqa: E402


def init_model(cfg: m2.Mamba2Config, vocab: int, layers: int, key) -> dict:
    keys = jax.random.split(key, layers + 1)
    return {"embed": jax.random.normal(keys[0], (vocab, cfg.d_model)) / math.sqrt(cfg.d_model),
            "layers": [dict(m2.init_params(cfg, k), norm=jnp.ones((cfg.d_model,))) for k in keys[1:]],
            "final_norm": jnp.ones((cfg.d_model,))}


def rmsnorm(x, w, eps=1e-5):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def forward(params, tokens, cache: ssmc.StateCache, cfg: m2.Mamba2Config):
    """tokens [b, t] (a prefill: the kernel call) or [b] (one decode step) -> (logits, cache after them)."""
    n = 1 if tokens.ndim == 1 else tokens.shape[1]
    x = params["embed"][tokens]
    for i, lp in enumerate(params["layers"]):
        h, new = m2.mixer(lp, rmsnorm(x, lp["norm"]), cfg, cache.layer(i))
        cache = cache.update(i, new, num_tokens=n)
        x = x + h
    return rmsnorm(x, params["final_norm"]) @ params["embed"].T, cache


def generate(params, prompt, new_tokens: int, cfg: m2.Mamba2Config, temperature: float = 0.0, seed: int = 0):
    """Greedy (temperature 0) or sampled continuation of prompt [b, t]; returns (tokens [b, new], timings)."""
    batch = prompt.shape[0]
    cache = ssmc.StateCache.create(m2.core(), num_layers=len(params["layers"]), batch_size=batch, sizes=cfg.sizes)
    # the cache is donated: XLA updates its buffers in place instead of copying every layer's states per token
    prefill = jax.jit(lambda p, t, c: forward(p, t, c, cfg), donate_argnums=2)
    decode = jax.jit(lambda p, t, c: forward(p, t, c, cfg), donate_argnums=2)

    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1)
        return jax.random.categorical(key, logits / temperature, axis=-1)

    t0 = time.perf_counter()  # compile both once, outside the timings (on a throwaway cache: it is donated)
    _, c = jax.block_until_ready(prefill(params, prompt, cache.reset()))
    jax.block_until_ready(decode(params, prompt[:, -1], c))
    compile_s = time.perf_counter() - t0

    key = jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    logits, cache = jax.block_until_ready(prefill(params, prompt, cache))
    prefill_s = time.perf_counter() - t0
    tok = pick(logits[:, -1], key)
    out = [tok]
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        key, sub = jax.random.split(key)
        logits, cache = decode(params, tok, cache)
        tok = pick(logits, sub)
        out.append(tok)
    tokens = jax.block_until_ready(jnp.stack(out, axis=1))
    decode_s = time.perf_counter() - t0
    return tokens, cache, {"compile_s": compile_s, "prefill_s": prefill_s, "decode_s": decode_s}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64, help="prompt length")
    ap.add_argument("--new", type=int, default=32, help="tokens to generate")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--headdim", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--check", action="store_true",
                    help="also check the decoded logits against one full forward over prompt + generated tokens")
    a = ap.parse_args(argv)
    cfg = m2.Mamba2Config(d_model=a.d_model, d_state=a.d_state, headdim=a.headdim)
    params = init_model(cfg, a.vocab, a.layers, jax.random.PRNGKey(0))
    prompt = jax.random.randint(jax.random.PRNGKey(1), (a.batch, a.prompt), 0, a.vocab)
    tokens, cache, t = generate(params, prompt, a.new, cfg, a.temperature)
    print(f"tiny Mamba2 LM: {a.layers} layers, d_model {cfg.d_model}, {cfg.nheads} heads x {cfg.headdim}, state "
          f"{cfg.d_state}, vocab {a.vocab}; batch {a.batch}; backend {jax.default_backend()}; cache {cache!r}")
    print(f"  compile {t['compile_s']:.2f} s")
    print(f"  prefill {a.prompt} tokens: {t['prefill_s'] * 1e3:.1f} ms, "
          f"{a.batch * a.prompt / t['prefill_s']:.0f} tokens/s")
    steps = a.new - 1
    if steps:
        print(f"  decode {steps} steps: {t['decode_s'] / steps * 1e3:.2f} ms/step, "
              f"{a.batch * steps / t['decode_s']:.0f} tokens/s")
    print(f"  sample 0: {tokens[0, :16].tolist()}{' ...' if a.new > 16 else ''}")
    if a.check:
        seq = jnp.concatenate([prompt, tokens[:, :-1]], axis=1)
        fresh = ssmc.StateCache.create(m2.core(), num_layers=a.layers, batch_size=a.batch, sizes=cfg.sizes)
        full, _ = forward(params, seq, fresh, cfg)
        # the full forward's logits at the generated positions must pick the same tokens
        same = bool(jnp.all(jnp.argmax(full[:, a.prompt - 1:], axis=-1) == tokens)) if a.temperature == 0 else True
        if not same:
            raise SystemExit("FAILED: greedy decode differs from the full forward's argmax")
        print("  check: the full forward over prompt + generated tokens picks the same tokens: ok")


if __name__ == "__main__":
    main()
