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

_EXPAND_MAX = 64  # products in a sum / factors in a product beyond which a state-free value is kept whole


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


class Lin:
    """The linear decomposition of one value: sum(terms) + sum(rest), every item carrying the value's `dims`.

    Kept as a persistent DAG rather than flat lists: a `sum` node refers to its operands' Lins (with a sign), a
    `mul` node to its operand's Lin and the state-free factors it multiplies by, so analysing a chain of n
    statements is O(n) instead of copying ever longer lists (and taking the union of ever longer factor lists) at
    each statement. `terms` and `rest` are flattened on first use, iteratively, which only readouts and updates
    need. For the linearity checks every node keeps, per state, the union of the dims of its terms' factors
    (`tdims`) and the same over its rest items (`rdims`)."""

    __slots__ = ("dims", "tdims", "rdims", "nrest", "_kind", "_parts", "_flat")

    def __init__(self, kind, parts, dims, tdims, rdims, nrest):
        self.dims, self.tdims, self.rdims, self.nrest = tuple(dims), tdims, rdims, nrest
        self._kind, self._parts, self._flat = kind, parts, None

    @property
    def terms(self) -> list[Term]:
        return self._flatten()[0]

    @property
    def rest(self) -> list[Prod]:
        return self._flatten()[1]

    def _flatten(self) -> tuple[list[Term], list[Prod]]:
        if self._flat is None:
            terms, rest = [], []
            # (node, sign, factors appended by the enclosing muls: a linked list (factors, outer) innermost first)
            stack = [(self, 1.0, None)]
            while stack:
                node, sign, suffix = stack.pop()
                if node._kind == "leaf":
                    tail = []
                    while suffix is not None:
                        tail.extend(suffix[0])
                        suffix = suffix[1]
                    tail = tuple(tail)
                    node_terms, node_rest = node._parts
                    terms.extend(Term(t.state, t.when, sign * t.coef, t.factors + tail, self.dims) for t in node_terms)
                    rest.extend(Prod(sign * x.coef, x.factors + tail, self.dims) for x in node_rest)
                elif node._kind == "sum":
                    stack.extend((child, sign * s, suffix) for child, s in reversed(node._parts))
                else:  # mul
                    inner, free = node._parts
                    stack.append((inner, sign, (free, suffix)))
            self._flat = (terms, rest)
        return self._flat


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
        self._memo: dict[tuple, Lin | NotLinear] = {}
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

        Memoized and evaluated without recursion (a chain of n statements is n levels deep); an expansion that would
        exceed _EXPAND_MAX products or factors keeps the value whole instead (always exact, and what makes
        `g2 = g1 + g1; g3 = g2 + g2; ...` linear rather than exponential)."""
        if name not in self._prods:
            stack = [name]
            while stack:
                n = stack[-1]
                i = self.by[n]
                todo = [a for a in (i.args if i.op in ("add", "sub", "neg", "mul") else ()) if a not in self._prods]
                if todo:
                    stack.extend(todo)
                    continue
                stack.pop()
                self._prods[n] = self._products(n)
        return self._prods[name]

    def _products(self, name: str) -> list[Prod]:  # the operands' expansions are memoized
        i = self.by[name]
        dims = i.dims
        whole = [Prod(1.0, (name,), dims)]
        if i.op in ("add", "sub"):
            a, b = self._prods[i.args[0]], self._prods[i.args[1]]
            if len(a) + len(b) > _EXPAND_MAX:
                return whole
            s = -1.0 if i.op == "sub" else 1.0
            return [Prod(x.coef, x.factors, dims) for x in a] + [Prod(s * x.coef, x.factors, dims) for x in b]
        if i.op == "neg":
            return [Prod(-x.coef, x.factors, dims) for x in self._prods[i.args[0]]]
        if i.op == "const":
            return [Prod(i.attr("value"), (), dims)]
        if i.op == "mul":
            a, b = self._prods[i.args[0]], self._prods[i.args[1]]
            if (len(a) == 1 and len(b) == 1 and len(a[0].factors) + len(b[0].factors) <= _EXPAND_MAX
                    and self._flat_ok(a[0], b[0])):
                return [Prod(a[0].coef * b[0].coef, a[0].factors + b[0].factors, dims)]
        return whole

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
        # Operands first, without recursion (a chain of n statements is n levels deep), so _lin finds them memoized.
        stack = [key]
        while stack:
            k = stack[-1]
            if k in self._memo:
                stack.pop()
                continue
            todo = [(a, True) for a in self._lin_operands(*k) if (a, True) not in self._memo]
            if todo:
                stack.extend(reversed(todo))  # left operand first, as _lin asks
                continue
            stack.pop()
            try:
                self._memo[k] = self._lin(*k)
            except NotLinear as e:  # remembered too: every later statement of a chain asks again
                self._memo[k] = e
        got = self._memo[key]
        if isinstance(got, NotLinear):
            raise got
        return got

    def _lin_operands(self, name: str, atoms_new: bool) -> tuple[str, ...]:
        """The operands whose linear forms _lin(name, atoms_new) reads."""
        i = self.by[name]
        if not self.dep[name] or i.op == "state" or (atoms_new and name in self.update_of):
            return ()
        if i.op in ("add", "sub", "neg"):
            return i.args
        deps = [a for a in i.args if self.dep[a]]
        if i.op in ("mul", "contract", "div") and len(deps) == 1 and not (i.op == "div" and deps[0] == i.args[1]):
            return tuple(deps)
        return ()

    def _leaf(self, terms: list[Term], rest: list[Prod], dims) -> Lin:
        tdims: dict[str, frozenset] = {}
        for t in terms:
            tdims[t.state] = tdims.get(t.state, frozenset()) | self.dims_of(t.factors)
        rdims = frozenset().union(*(self.dims_of(x.factors) for x in rest))
        return Lin("leaf", (tuple(terms), tuple(rest)), dims, tdims, rdims, len(rest))

    def _lin(self, name: str, atoms_new: bool) -> Lin:
        i = self.by[name]
        if not self.dep[name]:
            return self._leaf([], self.products(name), i.dims)
        if i.op == "state":
            return self._leaf([Term(i.attr("state"), "prev", 1.0, (), i.dims)], [], i.dims)
        if atoms_new and name in self.update_of:
            return self._leaf([Term(self.update_of[name], "new", 1.0, (), i.dims)], [], i.dims)
        sub = lambda n: self.lin(n, True)  # inside an expression, another update value is that state's new value
        if i.op in ("add", "sub", "neg"):
            parts = [(sub(i.args[0]), -1.0 if i.op == "neg" else 1.0)]
            if i.op != "neg":
                parts.append((sub(i.args[1]), -1.0 if i.op == "sub" else 1.0))
            tdims: dict[str, frozenset] = {}
            for lin, _ in parts:
                for st, fd in lin.tdims.items():
                    tdims[st] = tdims.get(st, frozenset()) | fd
            return Lin("sum", tuple(parts), i.dims, tdims, frozenset().union(*(lin.rdims for lin, _ in parts)),
                       sum(lin.nrest for lin, _ in parts))
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
            free_dims = frozenset(self.dims_of(free))
            # every item of `inner` carries inner.dims, so a check over the union of their factor dims is the
            # check over each item
            for st, fd in inner.tdims.items():
                if ((fd | set(self.state_dims[st])) - set(inner.dims)) & free_dims:
                    raise NotLinear(f"a contraction of state '{st}' is multiplied along the dim it summed, "
                                    f"which mixes state entries (non-diagonal)", i)
            if inner.nrest and (inner.rdims - set(inner.dims)) & free_dims:
                raise NotLinear("a factor reuses a dim that an inner contraction already summed", i)
            return Lin("mul", (inner, tuple(free)), i.dims, {st: fd | free_dims for st, fd in inner.tdims.items()},
                       inner.rdims | free_dims if inner.nrest else frozenset(), inner.nrest)
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

