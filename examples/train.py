"""Train a small Mamba2 language model whose conv + SSM + gated-norm core is an ssmc spec, with optax, on
multi-query associative recall: a sequence shows `pairs` key-value pairs, then asks for the values of keys it
showed (in another order). Only a model that carries what it read in its state can answer; the loss (cross-entropy
on the answers) falls from log(vocab) as it learns to.

    python examples/train.py [--steps 300] [--target auto] [--layers 2] [--batch 64] [--pairs 4]

Every layer is the Mamba2 mixer of examples/mamba2_layer.py around `examples/mamba2_conv.ssm`, compiled for
`--target` (auto: triton on a GPU, tpu on a TPU, xla elsewhere); jax.grad goes through the compiled kernel (on the
kernel targets its derivatives come from the spec's XLA code). Prints the loss, the answers' accuracy and
tokens/s (the tokens of every sequence, per second of training steps after the first, which compiles).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ssmc

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mamba2_layer as m2  # noqa: E402
from generate import init_model, rmsnorm  # noqa: E402  (the same model as generate.py: tied embeddings, pre-norm)


def make_batch(rng: np.random.Generator, batch: int, pairs: int, vocab: int):
    """tokens [batch, 4 * pairs], the answer at every position (-1 where nothing is asked). Keys come from the
    first half of the vocabulary, values from the second; a sequence is k1 v1 ... kP vP, then q1 a1 ... qP aP with
    the keys in a fresh order (each query followed by its answer, which the model predicts at the query)."""
    half = vocab // 2
    keys = np.stack([rng.choice(half, pairs, replace=False) for _ in range(batch)])
    vals = rng.integers(half, vocab, (batch, pairs))
    order = np.argsort(rng.random((batch, pairs)), axis=1)
    qk = np.take_along_axis(keys, order, 1)
    qv = np.take_along_axis(vals, order, 1)
    tokens = np.stack([keys, vals], 2).reshape(batch, 2 * pairs)
    tokens = np.concatenate([tokens, np.stack([qk, qv], 2).reshape(batch, 2 * pairs)], 1)
    target = np.full(tokens.shape, -1)
    target[:, 2 * pairs::2] = qv  # at each query, predict its value
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(target, jnp.int32)


def forward(params, tokens, cfg: m2.Mamba2Config, core):
    """tokens [b, t] -> logits: generate.py's model run over the whole sequence by `core` (no state cache)."""
    x = params["embed"][tokens]
    for lp in params["layers"]:
        h, _ = m2.mixer(lp, rmsnorm(x, lp["norm"]), cfg, kernel=core)
        x = x + h
    return rmsnorm(x, params["final_norm"]) @ params["embed"].T


def loss_fn(params, tokens, target, cfg, core):
    logits = forward(params, tokens, cfg, core)
    mask = target >= 0
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, jnp.maximum(target, 0)[..., None], -1)[..., 0]
    loss = jnp.sum(nll * mask) / jnp.sum(mask)
    acc = jnp.sum((jnp.argmax(logits, -1) == target) * mask) / jnp.sum(mask)
    return loss, acc


def train(steps: int = 300, target: str = "auto", layers: int = 2, batch: int = 64, pairs: int = 4,
          vocab: int = 32, d_model: int = 64, lr: float = 5e-3, seed: int = 0, log_every: int = 25,
          interpret: bool = False, chunk_size: int | None = None, printer=print) -> list[dict]:
    """Trains and returns the log: one record per logged step (step, loss, accuracy, tokens/s)."""
    cfg = m2.Mamba2Config(d_model=d_model, d_state=16, headdim=16, d_conv=4)
    core = ssmc.compile(m2.SPEC, target=target, interpret=interpret, chunk_size=chunk_size)
    params = init_model(cfg, vocab, layers, jax.random.PRNGKey(seed))
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, min(50, steps // 5 + 1), steps),
                                  weight_decay=0.01))
    state = opt.init(params)

    @jax.jit
    def step(params, state, tokens, tgt):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, tgt, cfg, core)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, acc

    rng = np.random.default_rng(seed)
    printer(f"ssmc {core.target} ({core.pipeline}): {layers} Mamba2 layers, d_model {d_model}, "
            f"{cfg.nheads} heads; recall of {pairs} pairs over a vocabulary of {vocab}; chance loss "
            f"{math.log(vocab // 2):.2f}")
    log, t_start, n_tokens = [], None, 0
    for i in range(1, steps + 1):
        tokens, tgt = make_batch(rng, batch, pairs, vocab)
        params, state, loss, acc = step(params, state, tokens, tgt)
        if i == 1:
            jax.block_until_ready(loss)
            t_start = time.perf_counter()  # the first step compiles
        else:
            n_tokens += tokens.size
        if i % log_every == 0 or i == steps or i == 1:
            loss, acc = float(loss), float(acc)
            rate = n_tokens / (time.perf_counter() - t_start) if n_tokens else float("nan")
            log.append({"step": i, "loss": loss, "accuracy": acc, "tokens_per_s": rate})
            printer(f"step {i:4d}  loss {loss:.3f}  recall accuracy {acc:.2f}  {rate:,.0f} tokens/s")
    return log


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--target", default="auto")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    train(a.steps, a.target, a.layers, a.batch, a.pairs, a.vocab, a.d_model, a.lr, a.seed)


if __name__ == "__main__":
    main()
