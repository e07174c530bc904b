"""bounds: interval analysis of IR values, for what the chunk pass may assume about a decay.

`interval(by, name)` gives (lo, hi) such that every finite input makes the value lie in [lo, hi] (inputs are
unknown: (-inf, inf)). An end at -inf means "unbounded below", so a value with lo > -inf can never be -inf. Rules
are the monotone ones of each op (exp, sigmoid, softplus, log, ...) and interval arithmetic for + - * /; anything
else is unknown. NaN inputs are outside the analysis (a NaN input gives NaN outputs whatever is assumed).

The chunk pass asks two things of a log-decay ell = log|a|:
  - `hi <= 0`, i.e. |a| <= 1 for every input: then in-chunk exponents L_t - L_s (s <= t) are <= 0 in exact
    arithmetic, and clamping them to <= 0 only removes rounding (the kept clamp); otherwise the exponents are used
    as they are (a growing decay is exact, or overflows to inf, never silently clamped);
  - `lo > -inf`: ell can never be -inf (a zero decay), so no floor is needed to keep L_t - L_s free of -inf - -inf.
"""
from __future__ import annotations

import math

INF = math.inf
UNKNOWN = (-INF, INF)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return INF


def _log(x: float) -> float:
    return -INF if x <= 0 else (INF if x == INF else math.log(x))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + _exp(-x)) if x >= 0 else _exp(x) / (1.0 + _exp(x))


def _softplus(x: float) -> float:
    return x + _log(1.0 + _exp(-x)) if x > 0 else _log(1.0 + _exp(x))


def _log_sigmoid(x: float) -> float:
    return -_softplus(-x)


def _mul_end(a: float, b: float) -> float:
    # 0 * inf: a bound of 0 times an unbounded factor is still bounded by 0 at that end
    return 0.0 if a == 0.0 or b == 0.0 else a * b


def mul(x: tuple, y: tuple) -> tuple:
    ends = [_mul_end(a, b) for a in x for b in y]
    return min(ends), max(ends)


def _add(x: tuple, y: tuple) -> tuple:
    lo, hi = x[0] + y[0], x[1] + y[1]
    return (-INF if math.isnan(lo) else lo), (INF if math.isnan(hi) else hi)


def _neg(x: tuple) -> tuple:
    return -x[1], -x[0]


def _monotone(f, x: tuple) -> tuple:
    return f(x[0]), f(x[1])


def _div(x: tuple, y: tuple) -> tuple:
    if y[0] > 0 or y[1] < 0:
        return mul(x, (1.0 / y[1] if y[1] not in (INF, -INF) else 0.0, 1.0 / y[0] if y[0] not in (INF, -INF) else 0.0))
    return UNKNOWN


def _abs(x: tuple) -> tuple:
    if x[0] >= 0:
        return x
    if x[1] <= 0:
        return _neg(x)
    return 0.0, max(-x[0], x[1])


def _pow(x: tuple, c: float) -> tuple:
    if float(c).is_integer():
        n = int(c)
        if n >= 0 and n % 2 == 0:
            a = _abs(x)
            return a[0] ** n, (a[1] ** n if a[1] != INF else INF)
        if n > 0:  # odd: monotone
            return _monotone(lambda v: v ** n if abs(v) != INF else v, x)
    if x[0] > 0:  # positive base: monotone in the base
        ends = [v ** c if v != INF else (INF if c > 0 else 0.0) for v in x]
        return min(ends), max(ends)
    return UNKNOWN


def _sign_of_sum(x: tuple) -> tuple:
    """A sum of an unknown number of values each in x."""
    if x == (0.0, 0.0):
        return x
    return (0.0 if x[0] >= 0 else -INF), (0.0 if x[1] <= 0 else INF)


_UNARY = {
    "exp": lambda x: _monotone(_exp, x),
    "sigmoid": lambda x: _monotone(_sigmoid, x),
    "softplus": lambda x: _monotone(_softplus, x),
    "log_sigmoid": lambda x: _monotone(_log_sigmoid, x),
    "tanh": lambda x: _monotone(lambda v: math.tanh(v), x),
    "neg": _neg,
    "abs": _abs,
    "log": lambda x: _monotone(_log, x) if x[0] >= 0 else UNKNOWN,
    "sqrt": lambda x: _monotone(lambda v: INF if v == INF else math.sqrt(v), x) if x[0] >= 0 else UNKNOWN,
    "rsqrt": lambda x: (1.0 / math.sqrt(x[1]) if x[1] != INF else 0.0, 1.0 / math.sqrt(x[0]) if x[0] > 0 else INF)
    if x[0] >= 0 else UNKNOWN,
    "silu": lambda x: (-0.2785, max(x[1], 0.0)),  # silu >= -0.2785 and silu(v) <= max(v, 0)
    "expand": lambda x: x,
}
_BINARY = {
    "add": _add,
    "sub": lambda x, y: _add(x, _neg(y)),
    "mul": mul,
    "div": _div,
    "min": lambda x, y: (min(x[0], y[0]), min(x[1], y[1])),
    "max": lambda x, y: (max(x[0], y[0]), max(x[1], y[1])),
}


def interval(by: dict, name: str, memo: dict | None = None) -> tuple:
    """(lo, hi) of the value `name` over all finite inputs; `by` maps SSA names to instructions."""
    memo = {} if memo is None else memo
    # iterative post-order: deep expressions must not hit the recursion limit
    stack = [name]
    while stack:
        n = stack[-1]
        if n in memo:
            stack.pop()
            continue
        i = by.get(n)
        todo = [a for a in (i.args if i is not None else ()) if a not in memo]
        if todo:
            stack.extend(todo)
            continue
        stack.pop()
        memo[n] = _eval(i, [memo[a] for a in i.args] if i is not None else [])
    return memo[name]


def _eval(i, args: list) -> tuple:
    if i is None:
        return UNKNOWN
    op = i.op
    if op == "const":
        v = float(i.attr("value"))
        return (v, v) if not math.isnan(v) else UNKNOWN
    if op in _UNARY and args:
        return _UNARY[op](args[0])
    if op in _BINARY and len(args) == 2:
        return _BINARY[op](*args)
    if op == "pow" and len(args) == 2 and args[1][0] == args[1][1]:
        return _pow(args[0], args[1][0])
    if op == "clamp" and len(args) == 3:  # max(min(x, hi), lo)
        x, lo, hi = args
        m = (min(x[0], hi[0]), min(x[1], hi[1]))
        return max(m[0], lo[0]), max(m[1], lo[1])
    if op == "reduce" and i.attr("kind") == "mean":
        return args[0]
    if op in ("reduce", "contract"):
        p = args[0]
        for a in args[1:]:
            p = mul(p, a)
        return _sign_of_sum(p)
    return UNKNOWN


def decay_bounded(by: dict, ell: str, memo: dict | None = None) -> bool:
    """|a| <= 1 for every input: the log-decay ell is provably <= 0."""
    return interval(by, ell, memo)[1] <= 0.0


def never_minus_inf(by: dict, ell: str, memo: dict | None = None) -> bool:
    """The log-decay ell is bounded below (a decay that is never exactly 0)."""
    return interval(by, ell, memo)[0] > -INF
