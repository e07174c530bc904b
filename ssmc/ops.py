"""The IR's elementwise ops in one table: arity, the jax.numpy function and each target's spelling.

Every emitter spells an op from here: `jnp` is jax.numpy source (the XLA target's code, the kernel targets'
launchers and the Pallas TPU kernels), `triton` is Triton's `tl` source, `pallas` overrides `jnp` where Mosaic
lowers something else. `fn` is the function itself: ssmc/ir_eval.py evaluates the state-free parts of a program
with it (the derived backward's glue, which jax differentiates). A format string takes the operands' expressions.
`pow` has no kernel spelling here: the kernel dialects write small integer powers as products (Dialect.pow).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax


@dataclass(frozen=True)
class Op:
    arity: int
    fn: Callable
    jnp: str
    triton: str
    pallas: str = ""


def _softplus_tl(x: str) -> str:  # log(1 + e^x) without overflow
    return f"(tl.maximum({x}, 0.0) + tl.log(1.0 + tl.exp(-tl.abs({x}))))"


ELEMENTWISE: dict[str, Op] = {
    "neg": Op(1, jnp.negative, "-({})", "-({})"),
    "exp": Op(1, jnp.exp, "jnp.exp({})", "tl.exp({})"),
    "log": Op(1, jnp.log, "jnp.log({})", "tl.log({})"),
    "softplus": Op(1, jax.nn.softplus, "jax.nn.softplus({})", _softplus_tl("{0}")),
    "silu": Op(1, jax.nn.silu, "jax.nn.silu({})", "({0}) * tl.sigmoid({0})"),
    "sigmoid": Op(1, jax.nn.sigmoid, "jax.nn.sigmoid({})", "tl.sigmoid({})"),
    "tanh": Op(1, jnp.tanh, "jnp.tanh({})", "(2.0 * tl.sigmoid(2.0 * ({0})) - 1.0)"),
    "sqrt": Op(1, jnp.sqrt, "jnp.sqrt({})", "tl.sqrt({})"),
    "rsqrt": Op(1, lax.rsqrt, "lax.rsqrt({})", "tl.rsqrt({})"),
    "abs": Op(1, jnp.abs, "jnp.abs({})", "tl.abs({})"),
    "log_sigmoid": Op(1, jax.nn.log_sigmoid, "jax.nn.log_sigmoid({})",
                      "-(tl.maximum(-({0}), 0.0) + tl.log(1.0 + tl.exp(-tl.abs({0}))))"),
    # jnp.sign's Mosaic lowering asks the attached TPU for its generation (no lowering without one): compare
    "sign": Op(1, jnp.sign, "jnp.sign({})", "tl.where({0} > 0, 1.0, tl.where({0} < 0, -1.0, 0.0))",
               pallas="jnp.where({0} > 0, 1.0, jnp.where({0} < 0, -1.0, 0.0))"),
    "add": Op(2, jnp.add, "{} + {}", "{} + {}"),
    "sub": Op(2, jnp.subtract, "{} - {}", "{} - {}"),
    "mul": Op(2, jnp.multiply, "{} * {}", "{} * {}"),
    "div": Op(2, jnp.divide, "{} / {}", "{} / {}"),
    "pow": Op(2, jnp.power, "{} ** {}", ""),
    "min": Op(2, jnp.minimum, "jnp.minimum({}, {})", "tl.minimum({}, {})"),
    "max": Op(2, jnp.maximum, "jnp.maximum({}, {})", "tl.maximum({}, {})"),
}
UNARY = tuple(n for n, o in ELEMENTWISE.items() if o.arity == 1)
BINARY = tuple(n for n, o in ELEMENTWISE.items() if o.arity == 2)


def spellings(target: str, arity: int) -> dict[str, str]:
    """{op: format string} of the ops of one arity as `target` ("jnp", "triton", "pallas") writes them; ops the
    target spells elsewhere (an empty entry) are left out."""
    out = {}
    for name, op in ELEMENTWISE.items():
        if op.arity == arity:
            s = getattr(op, target) or (op.jnp if target == "pallas" else "")
            if s:
                out[name] = s
    return out
