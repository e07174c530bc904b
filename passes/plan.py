"""The recurrence plan: what classify reports and chunk rewrites.

For each state: its update S_t = a_t ⊙ S_{t-1} + Σ u_t (decay factors, update products) and its decay class;
for the program: the readouts (maximal linear state-dependent values consumed by something nonlinear or by an out)
and whether the whole program admits the chunk-parallel form, with the reason when it does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ssmc.ir import Program

from .expand_groups import split_name
from .linear import Analysis, Lin, NotLinear, Prod

CLASSES = ("identity", "constant", "scalar", "key-wise", "value-wise", "elementwise", "non-diagonal")


@dataclass
class StatePlan:
    name: str
    dims: tuple[str, ...]           # state dims in IR layout
    decay: tuple[str, ...] = ()     # factors whose product is a_t (empty: a = 1)
    updates: list[Prod] = field(default_factory=list)
    klass: str = "non-diagonal"
    decay_dims: tuple[str, ...] = ()
    K: tuple[str, ...] = ()         # state dims the readouts contract
    V: tuple[str, ...] = ()         # state dims the readouts keep that q does not carry
    reason: str = ""


@dataclass
class Plan:
    states: dict[str, StatePlan]
    readouts: dict[str, Lin]        # value name -> its linear form
    chunkable: bool
    reason: str
    analysis: Analysis
    # linear state-dependent values computed from readouts by state-free elementwise math (z = y * w with y an
    # out too; the derived dq program's <C, dC>): an epilogue of those readouts, not chunked a second time
    post: frozenset = frozenset()


def make_plan(p: Program) -> Plan:
    an = Analysis(p)
    states = {s: StatePlan(s, d) for s, d in an.state_dims.items()}
    reasons: list[str] = []
    scan = p.scan
    # -- updates ----------------------------------------------------------------------------------------
    for i in p.instrs:
        if i.op != "update":
            continue
        sp = states[i.attr("state")]
        try:
            lin = an.lin(i.args[0], atoms_new=False)
            own = [t for t in lin.terms if t.state == sp.name and t.when == "prev"]
            other = [t for t in lin.terms if not (t.state == sp.name and t.when == "prev")]  # O(n), not `not in own`
            if other:
                raise NotLinear(f"the update of '{sp.name}' reads state '{other[0].state}' (coupled states)", i)
            if len(own) > 1:
                raise NotLinear(f"the update of '{sp.name}' reads it in several terms", i)
            if own:
                t = own[0]
                if an.dims_of(t.factors) - set(sp.dims) - {scan}:
                    raise NotLinear(f"the transition of '{sp.name}' mixes state entries (a contraction over the state)",
                                    i)
                sp.decay = t.factors if t.coef == 1.0 else t.factors + (an.const(t.coef),)
            else:
                raise NotLinear(f"'{sp.name}' is overwritten each step (no recurrence)", i)
            sp.updates = [x for u in lin.rest for x in _expand(an, u)]
        except NotLinear as e:
            sp.klass, sp.reason = "non-diagonal", str(e)
            reasons.append(f"{sp.name}: {e}")
            continue
        sp.decay_dims = tuple(d for d in p.dims if d in an.dims_of(sp.decay))
    # -- readouts ---------------------------------------------------------------------------------------
    readouts: dict[str, Lin] = {}
    users = an.users
    reads: dict[str, set[str]] = {}  # value -> the states it depends on
    for i in p.instrs:
        reads[i.name] = {i.attr("state")} if i.op == "state" else set().union(*(reads.get(a, ()) for a in i.args))
    post: set[str] = set()
    for i in p.instrs:
        if not an.dep[i.name] or i.op in ("update", "out", "state"):
            continue
        try:
            lin = an.lin(i.name)
        except NotLinear:
            continue
        if i.op in _POST_OPS and all(a in readouts or a in post for a in i.args if an.dep[a]):
            post.add(i.name)
            continue
        # a readout is a maximal linear value: an out, or the operand of something nonlinear in the states
        consumers = users.get(i.name, [])
        if any(u.op == "out" or (u.op != "update" and _nonlinear(an, u.name)) for u in consumers):
            readouts[i.name] = lin
    # Everything state-dependent outside updates and readouts must be computable from readouts (nonlinear
    # epilogue); a nonlinear value feeding an update is a non-diagonal transition (caught above).
    for name, lin in readouts.items():
        for t in lin.terms:
            sp = states[t.state]
            summed = (an.dims_of(t.factors) | set(sp.dims)) - set(t.dims)
            K = tuple(d for d in sp.dims if d in summed)
            if not K:
                foreign = _foreign_query(p, an, name, t.state, reads)
                if foreign is None:
                    reasons.append(f"{name} reads the whole state '{t.state}' each step (nothing contracted)")
                    continue
                use, K, qd, others = foreign
                at = f" at {use.span}" if use.span else ""
                reasons.append(f"state '{t.state}' is contracted over [{','.join(K)}]{at} with a query computed from "
                               f"state{'s' if len(others) > 1 else ''} {', '.join(others)} (a nonlinear function of "
                               f"{'their' if len(others) > 1 else 'its'} readout); on its own '{t.state}' has a chunked "
                               f"form, but a query that needs another state's chunk outputs is not chunked yet")
                sp.K = tuple(d for d in sp.dims if d in set(sp.K) | set(K))
                sp.V = tuple(d for d in sp.dims if d in set(sp.V) | (set(sp.dims) - set(K) - qd))
                continue
            qd = an.dims_of(t.factors)
            # a group-indexed q (g) is read by every head of its group: it varies along h/g too
            qd |= {split_name(h) for g, h in p.groups if g in qd}
            sp.K = tuple(d for d in sp.dims if d in set(sp.K) | set(K))
            sp.V = tuple(d for d in sp.dims if d in set(sp.V) | (set(sp.dims) - summed - qd))
    for sp in states.values():
        if sp.klass == "non-diagonal" and sp.reason:
            continue
        sp.klass = classify(sp, scan)
    reason = "; ".join(reasons)
    return Plan(states, readouts, not reasons, reason, an, frozenset(post))


_POST_OPS = ("mul", "contract", "div", "add", "sub", "neg")  # linear in their state-dependent operands


def classify(sp: StatePlan, scan: str) -> str:
    if not sp.decay:
        return "identity"
    if scan not in sp.decay_dims:
        return "constant"
    dd = set(sp.decay_dims)
    k, v = bool(dd & set(sp.K)), bool(dd & set(sp.V))
    return {(False, False): "scalar", (True, False): "key-wise", (False, True): "value-wise"}.get((k, v), "elementwise")


def _expand(an: Analysis, u: Prod) -> list[Prod]:
    """Split an update's state-free part into a sum of flat products (dt*B⊗x -> factors dt, B, x)."""
    if len(u.factors) == 1:
        return [Prod(u.coef * x.coef, x.factors, u.dims) for x in an.products(u.factors[0])]
    return [u]


def _foreign_query(p: Program, an: Analysis, name: str, state: str, reads: dict):
    """A readout that keeps the whole state, consumed by a contraction whose other operands depend on other states
    only (GSA: o = softmax(q·K)·V reads V with a query from K's readout): (that contraction, the state dims it
    sums, the query's dims, the other states), or None."""
    for u in an.users.get(name, []):
        if u.op != "contract":
            continue
        query = [a for a in u.args if a != name]
        others = set().union(*(reads.get(a, set()) for a in query))
        if not query or not others or state in others:
            continue
        sd = set(an.state_dims[state])
        K = tuple(d for d in an.state_dims[state] if d in sd - set(u.dims) and d in an.dims_of(query))
        if K:
            return u, K, an.dims_of(query), sorted(others)
    return None


def _nonlinear(an: Analysis, name: str) -> bool:
    try:
        an.lin(name)
        return False
    except NotLinear:
        return True
