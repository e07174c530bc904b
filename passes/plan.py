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
    for i in p.instrs:
        if not an.dep[i.name] or i.op in ("update", "out", "state"):
            continue
        try:
            lin = an.lin(i.name)
        except NotLinear:
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
                reasons.append(f"{name} reads the whole state '{t.state}' each step (nothing contracted)")
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
    return Plan(states, readouts, not reasons, reason, an)


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


def _nonlinear(an: Analysis, name: str) -> bool:
    try:
        an.lin(name)
        return False
    except NotLinear:
        return True
