"""fuse: fold products into the contractions that consume them, and assign every instruction to a stage.

- A `mul` used only by one `contract` (or chunk op) becomes extra operands of it, so `C·(dt*B⊗x)`-like values are
  never materialised at full size: the emitter contracts all factors at once.
- Stages: prologue (state-free per-step work: dt softplus, log-decay...), the chunk stages (cumsum, chunk_state,
  state_passing, chunk_output) or `step` for a sequential scan, then epilogue (skip, gate, norm). An elementwise
  prologue value used by a single stage op is marked fused_into that op, and an epilogue value is fused into the
  chunk_output it reads, which is where kernel targets compute them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ssmc.ir import ELEMENTWISE_BINARY, ELEMENTWISE_UNARY, Program, dce

from .chunk_ops import STAGE_OF, STAGE_OPS, decode

FACTOR_OPS = ("contract", "chunk.states", "chunk.output")  # ops that take a product's factors as operands
ELEMENTWISE = set(ELEMENTWISE_UNARY) | set(ELEMENTWISE_BINARY) | {"clamp", "const", "expand"}


@dataclass(frozen=True)
class Fuse:
    name = "fuse"

    def run(self, p: Program) -> Program:
        p = dce(_flatten_contracts(p))
        by, users = p.by_name(), p.users()
        dep: dict[str, bool] = {}
        stage_of: dict[str, str] = {}
        chunked = any(i.op in STAGE_OPS for i in p.instrs)
        for i in p.instrs:
            dep[i.name] = i.op in ("state",) + STAGE_OPS or any(dep[a] for a in i.args)
            if i.op in STAGE_OPS:
                stage_of[i.name] = STAGE_OF[i.op]
            elif i.op in ("out", "final", "update"):
                stage_of[i.name] = "output"
            elif i.op in ("input", "state", "window"):
                stage_of[i.name] = "input"
            elif not dep[i.name]:
                stage_of[i.name] = "prologue"
            else:
                stage_of[i.name] = "epilogue" if chunked else "step"
        fused: dict[str, str] = {}
        # prologue -> the single stage op that (transitively) consumes it; walk users first
        for i in reversed(p.instrs):
            if stage_of[i.name] != "prologue" or i.op not in ELEMENTWISE:
                continue
            targets = set()
            for u in users.get(i.name, []):
                targets.add(u.name if u.op in STAGE_OPS else fused.get(u.name))
            if len(targets) == 1 and None not in targets:
                fused[i.name] = targets.pop()
        # epilogue -> the chunk_output it reads (the last one, in order)
        for i in p.instrs:
            if stage_of[i.name] != "epilogue":
                continue
            srcs = [a if by[a].op == "chunk.output" else fused.get(a) for a in i.args if dep.get(a)]
            srcs = [s for s in srcs if s]
            if srcs:
                fused[i.name] = srcs[-1]
        instrs = []
        for i in p.instrs:
            kw = {"stage": stage_of[i.name]}
            if i.name in fused:
                kw["fused_into"] = fused[i.name]
            instrs.append(i.with_attrs(**kw))
        # inputs and prologue first (they only depend on each other), then the stages in dependency order
        rank = {"input": 0, "prologue": 1}
        instrs.sort(key=lambda i: rank.get(i.attr("stage"), 2))
        n = sum(1 for i in instrs if i.attr("fused_into"))
        return p.with_instrs(instrs, note=f"fuse: {n} elementwise values fused into the stage that consumes them")


def _flatten_contracts(p: Program) -> Program:
    """Contractions and the chunk ops' q/u factor lists take a product's factors instead of the product, so an
    outer product such as `(1 - f)⊗v` [.., dk, dv] is never materialised, whatever form its factors take."""
    by, users = p.by_name(), p.users()
    out = []
    for i in p.instrs:
        if i.op == "contract":
            args = []
            for a in i.args:
                args.extend(_factors(a, by, users))
            i = replace(i, args=tuple(args))
        elif i.op in ("chunk.states", "chunk.output"):
            c = decode(i)
            flat = lambda names: tuple(f for n in names for f in _factors(n, by, users))
            args, attrs = replace(c, q=flat(c.q), u=tuple(flat(prod) for prod in c.u)).encode()
            i = replace(i, args=args).with_attrs(**attrs)
        out.append(i)
    return p.with_instrs(out)


def _factors(name, by, users):
    """Factors of a product that only contractions and chunk ops consume (all of them take its factors instead, so
    it is not computed at all); a product has no summed dims inside, so flattening is exact."""
    i = by[name]
    consumers = users.get(name, [])
    if i.op == "mul" and consumers and all(u.op in FACTOR_OPS for u in consumers) and \
            set(by[i.args[0]].dims) | set(by[i.args[1]].dims) == set(i.dims):
        return _factors(i.args[0], by, users) + _factors(i.args[1], by, users)
    return [name]
