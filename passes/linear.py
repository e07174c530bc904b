"""Linearity analysis shared by classify and chunk.

Chunking is legal when every state update has the form  S_t = a_t ⊙ S_{t-1} + u_t  with a, u free of states,
and every place a state is read is linear in it (a contraction q · S, possibly plus state-free parts). This module
finds those forms in the step IR:
  - `Prod`: a product of state-free factors times a constant, contracted to `dims` (a sum of Prods is a value);
  - `Term`: the same with one state (as it enters the step, `prev`, or after its update, `new`) among the factors;
  - `Lin`: Terms + Prods, the linear decomposition of one value.
New helper instructions (1/f, log of a decay) are appended to `self.new` with fresh names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ssmc.ir import Instr, Namer, Program, make, union_dims


@dataclass(frozen=True)
class Prod:
    coef: float
    factors: tuple[str, ...]
    dims: tuple[str, ...]


@dataclass(frozen=True)
class Term:
    state: str
    when: str  # prev | new
    coef: float
    factors: tuple[str, ...]
    dims: tuple[str, ...]


@dataclass
class Lin:
    terms: list[Term]
    rest: list[Prod]


class NotLinear(Exception):
    """Raised with the reason a value is not linear in the states (becomes the IR note for the fallback)."""

    def __init__(self, reason: str, instr: Instr | None = None):
        self.reason, self.instr = reason, instr
        at = f" (at {instr.span})" if instr is not None and instr.span else ""
        super().__init__(reason + at)


class Analysis:
    def __init__(self, p: Program):
        self.p = p
        self.by = p.by_name()
        self.users = p.users()
        self.namer = Namer(self.by)
        self.new: list[Instr] = []
        self.state_names = [s.name for s in p.states]
        self.update_of: dict[str, str] = {}  # update value name -> state
        for i in p.instrs:
            if i.op == "update":
                self.update_of[i.args[0]] = i.attr("state")
        self.state_dims = {i.attr("state"): i.dims for i in p.instrs if i.op == "state"}
        self.dep: dict[str, bool] = {}
        for i in p.instrs:
            self.dep[i.name] = i.op == "state" or any(self.dep[a] for a in i.args)
        self._memo: dict[tuple, Lin] = {}
        self._prods: dict[str, list[Prod]] = {}

    # ---- helpers ---------------------------------------------------------------------------------------
    def emit(self, op, args, dims, span=None, hint=None, **attrs) -> str:
        i = make(self.namer(hint), op, args, self.p.order(dims), span, **attrs)
        self.new.append(i)
        self.by[i.name] = i
        self.dep[i.name] = False
        return i.name

    def const(self, v: float) -> str:
        return self.emit("const", (), (), None, value=float(v))

    def dims_of(self, names) -> set[str]:
        return union_dims(self.by, names)

    # ---- products of state-free values --------------------------------------------------------------------
    def products(self, name: str) -> list[Prod]:
        """Expand a state-free value into a sum of products of factors (through add/sub/neg/mul/div/contract).
        Operands are expanded first, deepest first by an explicit walk, so a sum of thousands of terms or a
        chain of thousands of negations needs no deep stack (the expansion is pure: memoised)."""
        if name not in self._prods:
            for n in _deep_first(name, lambda n: self.by[n].args if self.by[n].op in ("add", "sub", "neg", "mul")
                                 else (), self._prods):
                self._prods[n] = self._products(n)
        return list(self._prods[name])

    def _products(self, name: str) -> list[Prod]:
        i = self.by[name]
        dims = i.dims
        if i.op in ("add", "sub"):
            a, b = self.products(i.args[0]), self.products(i.args[1])
            s = -1.0 if i.op == "sub" else 1.0
            return [Prod(x.coef, x.factors, dims) for x in a] + [Prod(s * x.coef, x.factors, dims) for x in b]
        if i.op == "neg":
            return [Prod(-x.coef, x.factors, dims) for x in self.products(i.args[0])]
        if i.op == "const":
            return [Prod(i.attr("value"), (), dims)]
        if i.op == "mul":
            a, b = self.products(i.args[0]), self.products(i.args[1])
            if len(a) == 1 and len(b) == 1 and self._flat_ok(a[0], b[0]):
                return [Prod(a[0].coef * b[0].coef, a[0].factors + b[0].factors, dims)]
        return [Prod(1.0, (name,), dims)]

    def _flat_ok(self, a, b) -> bool:
        # Flattening is exact only if neither side had summed a dim the other side carries.
        summed_a = self.dims_of(a.factors) - set(a.dims)
        summed_b = self.dims_of(b.factors) - set(b.dims)
        return not (summed_a & set(b.dims) or summed_b & set(a.dims))

    # ---- linear forms --------------------------------------------------------------------------------
    def lin(self, name: str, atoms_new: bool = True) -> Lin:
        """Linear decomposition of a value in the states. With atoms_new, an update value (the state after its
        update) is an atom `new`; otherwise it is decomposed through its update expression."""
        key = (name, atoms_new)
        if key not in self._memo:
            # the operands _lin decomposes (as atoms_new=True) first, deepest first, so its recursion stays shallow
            if not (atoms_new and name in self.update_of):  # (an atom reads nothing below it)
                below = _deep_first(name, self._linear_operands, _DoneLin(self._memo))
                for n in below[:-1]:
                    self._memo[(n, True)] = self._lin(n, True)
            self._memo[key] = self._lin(name, atoms_new)
        return self._memo[key]

    def _linear_operands(self, name: str) -> tuple:
        """The state-dependent operands _lin recurses into (none where it stops or raises first)."""
        i = self.by[name]
        if not self.dep[name] or i.op == "state":
            return ()
        if i.op in ("add", "sub", "neg"):
            return tuple(a for a in i.args if self.dep[a] and a not in self.update_of)
        if i.op in ("mul", "contract"):
            deps = [a for a in i.args if self.dep[a]]
            return tuple(a for a in deps if a not in self.update_of) if len(deps) == 1 else ()
        return ()

    def _lin(self, name: str, atoms_new: bool) -> Lin:
        i = self.by[name]
        if not self.dep[name]:
            return Lin([], self.products(name))
        if i.op == "state":
            return Lin([Term(i.attr("state"), "prev", 1.0, (), i.dims)], [])
        if atoms_new and name in self.update_of:
            return Lin([Term(self.update_of[name], "new", 1.0, (), i.dims)], [])
        sub = lambda n: self.lin(n, True)  # inside an expression, another update value is that state's new value
        if i.op in ("add", "sub"):
            a, b = sub(i.args[0]), sub(i.args[1])
            s = -1.0 if i.op == "sub" else 1.0
            return Lin([_redim(t, i.dims) for t in a.terms] + [_redim(t, i.dims, s) for t in b.terms],
                       [Prod(x.coef, x.factors, i.dims) for x in a.rest] +
                       [Prod(s * x.coef, x.factors, i.dims) for x in b.rest])
        if i.op == "neg":
            a = sub(i.args[0])
            return Lin([_redim(t, i.dims, -1.0) for t in a.terms], [Prod(-x.coef, x.factors, i.dims) for x in a.rest])
        if i.op in ("mul", "contract", "div"):
            deps = [a for a in i.args if self.dep[a]]
            if len(deps) != 1:
                raise NotLinear(f"'{i.op}' multiplies two state-dependent values", i)
            if i.op == "div":
                if i.args[1] == deps[0]:
                    raise NotLinear("division by a state-dependent value", i)
                free = [self.emit("div", (self.const(1.0), i.args[1]), self.by[i.args[1]].dims, i.span)]
            else:
                free = [a for a in i.args if a != deps[0]]
            inner = sub(deps[0])
            free_dims = self.dims_of(free)
            out_terms, out_rest = [], []
            for t in inner.terms:
                summed = (self.dims_of(t.factors) | set(self.state_dims[t.state])) - set(t.dims)
                if summed & free_dims:
                    raise NotLinear(f"a contraction of state '{t.state}' is multiplied along the dim it summed, "
                                    f"which mixes state entries (non-diagonal)", i)
                out_terms.append(Term(t.state, t.when, t.coef, t.factors + tuple(free), i.dims))
            for x in inner.rest:
                if (self.dims_of(x.factors) - set(x.dims)) & free_dims:
                    raise NotLinear("a factor reuses a dim that an inner contraction already summed", i)
                out_rest.append(Prod(x.coef, x.factors + tuple(free), i.dims))
            return Lin(out_terms, out_rest)
        raise NotLinear(f"'{i.op}' of a state-dependent value is not linear in the state", i)

    # ---- decays ---------------------------------------------------------------------------------------
    def log_of(self, name: str) -> tuple[str, list[str]]:
        """log|a| of a decay factor, symbolically where possible (log(exp(E)) = E), and the values whose sign
        the decay carries (empty when a is provably positive)."""
        i = self.by[name]
        if i.op == "exp":
            return i.args[0], []
        if i.op == "sigmoid":
            return self.emit("log_sigmoid", i.args, i.dims, i.span), []
        if i.op == "const" and i.attr("value") > 0:
            return self.const(math.log(i.attr("value"))), []
        if i.op == "softplus":
            return self.emit("log", (name,), i.dims, i.span), []
        if i.op in ("mul", "div"):
            (la, sa), (lb, sb) = self.log_of(i.args[0]), self.log_of(i.args[1])
            return self.emit("add" if i.op == "mul" else "sub", (la, lb), i.dims, i.span), sa + sb
        if i.op == "pow" and self.by[i.args[1]].op == "const":
            la, sa = self.log_of(i.args[0])
            e = self.by[i.args[1]].attr("value")
            signs = sa if float(e).is_integer() and int(e) % 2 else []
            if sa and not float(e).is_integer():
                return self._log_abs(name)
            return self.emit("mul", (i.args[1], la), i.dims, i.span), signs
        return self._log_abs(name)

    def _log_abs(self, name: str) -> tuple[str, list[str]]:
        i = self.by[name]
        a = self.emit("abs", (name,), i.dims, i.span)
        tiny = self.const(1e-30)  # |a| = 0 is a full reset; 1e-30 keeps log finite and differences NaN-free
        return self.emit("log", (self.emit("max", (a, tiny), i.dims, i.span),), i.dims, i.span), [name]


class _DoneLin:
    """`value in done`: its decomposition as an atoms_new=True operand is memoised (no copy of the memo's keys)."""

    def __init__(self, memo):
        self.memo = memo

    def __contains__(self, name):
        return (name, True) in self.memo


def _deep_first(root: str, operands, done) -> list[str]:
    """`root` and the values below it through `operands` that are not `done`, each after its operands (an
    explicit stack: no recursion however deep the expression)."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        n, ready = stack.pop()
        if ready:
            order.append(n)
            continue
        if n in seen or n in done:
            continue
        seen.add(n)
        stack.append((n, True))
        stack.extend((a, False) for a in reversed(operands(n)))
    return order


def _redim(t: Term, dims, s: float = 1.0) -> Term:
    return Term(t.state, t.when, s * t.coef, t.factors, tuple(dims))
