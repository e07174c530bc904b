"""chunk: rewrite the step recurrence into the chunk-parallel form (the four SSD stages), or keep the sequential
scan and record why.

Per state S with S_t = a_t ⊙ S_{t-1} + Σ u_t: log-decay ℓ = log|a| (symbolic: log(exp(E)) = E) -> chunk.cumsum ->
chunk.states (each chunk from zero) -> chunk.pass (across chunks) -> chunk.final; each readout q · S becomes
chunk.output (in-chunk quadratic part + state part); nonlinear consumers of readouts (division, norm, gate) follow
as the epilogue. Elementwise decay (a over the whole state) has no matmul form: its chunk ops walk the chunk's
steps (form=scan) instead of the quadratic form.

Numerics decided here (passes/bounds.py): a log-decay that may be -inf (a decay of exactly 0, a reset) is floored at
log(1e-30), so L_t - L_s is never -inf - -inf; the stage ops say `bounded=True` only where |a| <= 1 is proven, and
only then may emitters clamp in-chunk exponents to <= 0. States whose decays are alike share one log-decay, cumsum
and sign (repeated state-free values are computed once first).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ssmc.errors import SSMCError
from ssmc.ir import Instr, Program, make

from . import bounds
from .chunk_ops import STEP_CHUNK_OPS, ChunkArgs
from .linear import NotLinear
from .plan import make_plan

# Default chunk length per class (the smallest over a program's states is used).
DEFAULT_CHUNK = {"identity": 64, "constant": 64, "scalar": 64, "key-wise": 64, "value-wise": 64, "elementwise": 32}
# Key-wise and value-wise decays split each chunk into sub-chunks of this many steps: blocks between two different
# sub-chunks are matmuls (exponents taken from a reference at a sub-chunk boundary, both <= 0 for |a| <= 1), only
# the diagonal blocks are computed elementwise ([C, C, K] per sub-chunk, never [Q, Q, K]).
DEFAULT_SUB = 16
SUB_CLASSES = ("key-wise", "value-wise")


def sub_chunk(Q: int, sub: int) -> int:
    """The sub-chunk length for chunk length Q: the largest divisor of Q that is <= sub, preferring multiples of 8
    (whole sublane tiles on TPU) when there is one; Q itself (one sub-chunk: the diagonal block only) when Q <= sub
    or Q has no such divisor of at least 4."""
    if Q <= sub:
        return Q
    divisors = [c for c in range(1, sub + 1) if Q % c == 0]
    C = max([c for c in divisors if c % 8 == 0] or divisors)
    return C if C >= min(4, sub) else Q  # sub-chunks of 1-3 steps (Q prime...): the [Q, Q, K] form instead
LOG_FLOOR = math.log(1e-30)  # log-decays below this are a reset at fp32 resolution (and never -inf)


class NeedsChunks(SSMCError):
    """A program with step-level chunk ops (`pairs`, `enter`: the derived backward's) is not chunked; the caller
    (ssmc/backward.py) derives the form without them."""


def chunk_dim(scan: str) -> str:
    """The chunk-index dim of the scan dim t: `t#` (no spec can name it)."""
    return f"{scan}#"


@dataclass(frozen=True)
class Chunk:
    size: int = 0  # 0: the default of the states' classes; 1: sequential scan
    elementwise: str = "chunked"  # or "sequential": how a default-sized elementwise decay is scheduled
    scalar: int = 64  # default chunk length of the identity / constant / scalar classes (a target's choice)
    keywise: int = DEFAULT_CHUNK["key-wise"]  # default chunk length of the key-wise / value-wise classes
    sub: int = DEFAULT_SUB  # sub-chunk length of key-wise / value-wise chunks (<= the chunk length)
    name = "chunk"

    def run(self, p: Program) -> Program:
        out = self._run(p)
        if not any(i.op.startswith("chunk.") for i in out.instrs):
            marked = [i for i in out.instrs if i.op in STEP_CHUNK_OPS]
            if marked:
                raise NeedsChunks(f"chunk: '{marked[0].op}' ({marked[0].name}) needs the chunked form, and "
                                  f"'{p.name}' runs as a sequential scan: {out.notes[-1] if out.notes else ''}")
        return out

    def _run(self, p: Program) -> Program:
        if self.size == 1:
            return p.with_instrs(p.instrs, note="chunk: sequential scan (chunk size 1 requested)")
        if self.size < 0:
            raise ValueError(f"chunk size must be >= 1, got {self.size}")
        if self.sub < 1:
            raise ValueError(f"sub-chunk length must be >= 1, got {self.sub}")
        p, shared = share_state_free(p)
        plan = make_plan(p)
        if not plan.chunkable:
            ignored = f" (chunk_size {self.size} ignored)" if self.size > 1 else ""
            return p.with_instrs(p.instrs, note=f"chunk: sequential scan, not chunkable{ignored}: {plan.reason}")
        elem = [sp.name for sp in plan.states.values() if sp.klass == "elementwise"]
        if elem and not self.size and self.elementwise == "sequential":
            return p.with_instrs(p.instrs, note=f"chunk: sequential scan: elementwise decay of {', '.join(elem)} has no "
                                 f"matmul form, and on this backend walking time once beats the two-pass chunked scan "
                                 f"(pass chunk_size to force it)")
        defaults = {**DEFAULT_CHUNK, **{k: self.scalar for k in ("identity", "constant", "scalar")},
                    **{k: self.keywise for k in SUB_CLASSES}}
        Q = self.size or min(defaults[sp.klass] for sp in plan.states.values())
        out = _Rewrite(p, plan, Q, sub_chunk(Q, self.sub)).run()
        if shared:
            out = out.with_instrs(out.instrs, note=f"chunk: {shared} repeated state-free value(s) computed once")
        return out


PURE_LEAVES = ("input", "state", "window", "update", "out", "final")


def share_state_free(p: Program) -> tuple[Program, int]:
    """Common state-free values computed once (op, operands, dims and attributes alike), so states with the same
    decay (mLSTM's S and n: sigmoid(f) written twice) get one log-decay, one cumsum and one in-chunk decay tile."""
    rename: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    dep: set[str] = set()
    out = []
    for i in p.instrs:
        args = tuple(rename.get(a, a) for a in i.args)
        if i.op == "state" or any(a in dep for a in args):
            dep.add(i.name)
        elif i.op not in PURE_LEAVES:
            key = (i.op, args, i.dims, i.attrs)
            if key in seen:
                rename[i.name] = seen[key]
                continue
            seen[key] = i.name
        out.append(i if args == i.args else make(i.name, i.op, args, i.dims, i.span, **dict(i.attrs)))
    return (p.with_instrs(out) if rename else p), len(rename)


class _Rewrite:
    def __init__(self, p: Program, plan, Q: int, C: int):
        self.p, self.plan, self.Q, self.C = p, plan, Q, C
        self.an = plan.analysis
        cd = chunk_dim(p.scan)
        k = p.dims.index(p.scan)
        self.dims = p.dims if cd in p.dims else p.dims[:k] + (cd,) + p.dims[k:]
        self.cd = cd
        self.out: list[Instr] = []
        self.memo: dict = {}  # intervals of values (passes/bounds.py)

    def order(self, ds) -> tuple[str, ...]:
        s = set(ds)
        return tuple(d for d in self.dims if d in s)

    def emit(self, name, op, args, dims, span=None, **attrs) -> str:
        i = make(name or self.an.namer(), op, args, self.order(dims), span, **attrs)
        self.out.append(i)
        self.an.by[i.name] = i
        return i.name

    def run(self) -> Program:
        p, an, Q, scan = self.p, self.an, self.Q, self.p.scan
        # prologue: everything that does not depend on a state, including the helpers the analysis built
        free = [i for i in p.instrs if not an.dep[i.name] and i.op not in ("update", "out")]
        leaves = [i for i in p.instrs if i.op == "state"]
        stage: dict[str, dict] = {}
        logs = {}
        bounded = {}
        same: dict[tuple, tuple] = {}  # the decay factors -> (ell, sgn): states with one decay share its stages
        for sp in self.plan.states.values():
            key = tuple(("const", an.by[f].attr("value")) if an.by[f].op == "const" else f for f in sp.decay)
            if key not in same:
                same[key] = self.logdecay(sp)
            logs[sp.name] = same[key]
            # |a| <= 1 proven: in-chunk exponents may be clamped to <= 0 (rounding only); otherwise exact
            bounded[sp.name] = bounds.decay_bounded(self.an.by, logs[sp.name][0], self.memo)
        self.out = free + leaves + an.new + self.out
        cums: dict[str, tuple] = {}  # ell -> (L, sigma), shared by the states with that decay
        for sp in self.plan.states.values():
            ell, sgn = logs[sp.name]
            S = sp.name
            span = next((i.span for i in p.instrs if i.op == "update" and i.attr("state") == S), None)
            ell_dims = an.by[ell].dims if ell in an.by else ()
            bd = bounded[S]
            if ell not in cums:
                L = self.emit(f"%{S}.L", "chunk.cumsum", (ell,), set(ell_dims) | {scan}, span, chunk=Q, state=S,
                              bounded=bd)
                sigma = None
                if sgn is not None:
                    # same dims as L, so both index alike in every stage
                    sigma = self.emit(f"%{S}.sigma", "chunk.cumsign", (sgn,), set(ell_dims) | {scan}, span,
                                      chunk=Q, state=S)
                cums[ell] = (L, sigma)
            L, sigma = cums[ell]
            form = "scan" if sp.klass == "elementwise" else "quadratic"
            u = tuple(x.factors for x in sp.updates)
            uc = tuple(x.coef for x in sp.updates)
            step_sgn = sgn if form == "scan" else None  # the walk multiplies by a_t itself
            args, attrs = ChunkArgs(ell=ell, L=L, sigma=sigma, sgn=step_sgn, u=u, ucoef=uc).encode()
            chunks = self.emit(f"%{S}.chunks", "chunk.states", args, set(sp.dims) | {self.cd}, span, chunk=Q,
                               state=S, form=form, klass=sp.klass, bounded=bd, **attrs)
            init = next(i.name for i in leaves if i.attr("state") == S)
            args, attrs = ChunkArgs(L=L, sigma=sigma, chunks=chunks, init=init).encode()
            enter = self.emit(f"%{S}.enter", "chunk.pass", args, set(sp.dims) | {self.cd}, span, chunk=Q, state=S,
                              **attrs)
            args, attrs = ChunkArgs(L=L, sigma=sigma, chunks=chunks, enter=enter).encode()
            final = self.emit(f"%{S}.final", "chunk.final", args, sp.dims, span, chunk=Q, state=S, **attrs)
            stage[S] = dict(ell=ell, L=L, sigma=sigma, sgn=step_sgn, enter=enter, u=u, uc=uc, form=form, final=final,
                            bounded=bd, raw_sgn=sgn)
        # readouts (one whose only users are `pairs` ops is emitted by them, part by part)
        users = p.users()
        for name in self.plan.readouts:
            us = users.get(name, [])
            if not (us and all(u.op == "pairs" for u in us)):
                self.readout(name, stage, name)
        # epilogue: nonlinear state-dependent values, computed from readouts
        alias: dict[str, str] = {}  # an `enter` op -> its state's chunk.pass value
        for i in p.instrs:
            if not an.dep[i.name] or i.op in ("update", "state") or i.name in self.plan.readouts:
                continue
            if i.op == "out":
                self.out.append(i)
                continue
            if i.op == "pairs":
                self.readout(i.args[0], stage, i.name, i.attr("part"))
                continue
            if i.op == "enter":
                alias[i.name] = stage[self.an.by[i.args[0]].attr("state")]["enter"]
                continue
            if i.op == "across":
                S = self.an.by[i.args[1]].attr("state")
                self.emit(i.name, "chunk.across", (i.args[0], stage[S]["enter"]), set(i.dims) | {scan}, i.span,
                          chunk=Q, state=S)
                continue
            if i.name not in self.plan.post:  # (a post value: computed from its readouts, below)
                try:
                    an.lin(i.name)
                    continue  # linear: part of an update or a readout
                except NotLinear:
                    pass
            self.emit(i.name, i.op, i.args, set(i.dims) | {scan}, i.span, **dict(i.attrs))
        for S, s in stage.items():
            self.emit(f"final.{S}", "final", (s["final"],), self.plan.states[S].dims, None, state=S)
        # out sinks of state-free values come along with `free`'s order; keep all sinks last
        outs = [i for i in p.instrs if i.op == "out"]
        outs = [make(i.name, "out", (alias[i.args[0]],), i.dims, i.span, **dict(i.attrs)) if i.args[0] in alias else i
                for i in outs]
        body = [i for i in self.out if i.op != "out"]
        classes = ", ".join(f"{sp.name}: {sp.klass}" for sp in self.plan.states.values())
        note = f"chunk: chunk-parallel form, chunk length {Q} ({classes})"
        if any(sp.klass in SUB_CLASSES for sp in self.plan.states.values()) and self.C < Q:
            note += (f"\nchunk: key-/value-wise in-chunk part in sub-chunks of {self.C} steps (sub={self.C}): "
                     f"blocks between sub-chunks are matmuls, diagonal blocks elementwise")
        for S, bd in bounded.items():
            note += (f"\nchunk: decay of {S} provably |a| <= 1: in-chunk exponents clamped to <= 0 (bounded=True)" if bd
                     else f"\nchunk: decay of {S} not provably |a| <= 1: exact in-chunk exponents, no clamp (a growing "
                          f"decay may overflow to inf, never clamped)")
        return p.with_instrs(body + outs, note=note, dims=self.dims)

    def readout(self, name: str, stage: dict, result: str, part: str | None = None) -> None:
        """Readout `name` (a plan readout) as chunk.output ops (one per term, plus its state-free products),
        summed into `result`; `part`: only that part of each term (chunk_ops: state, straddle)."""
        an, scan, Q = self.an, self.p.scan, self.Q
        r, lin = an.by[name], self.plan.readouts[name]
        dims = set(r.dims) | {scan}
        parts = []
        for t in lin.terms:
            s = stage[t.state]
            if part and (self.plan.states[t.state].klass != "scalar" or t.when != "new" or s["sigma"]):
                raise SSMCError(f"chunk: part={part} of readout {name} needs a scalar positive decay read after "
                                f"the update (state '{t.state}': {self.plan.states[t.state].klass}, when={t.when})")
            # read before the update with a signed decay: the sign through t-1 is sigma_t / sign(a_t)
            sgn = s["sgn"] if s["form"] == "scan" or t.when != "prev" or not s["sigma"] else s["raw_sgn"]
            args, attrs = ChunkArgs(ell=s["ell"], L=s["L"], sigma=s["sigma"], sgn=sgn, enter=s["enter"], q=t.factors,
                                    qcoef=t.coef, u=s["u"], ucoef=s["uc"]).encode()
            single = len(lin.terms) == 1 and not lin.rest
            part_name = result if single else an.namer(f"{result[1:]}.{t.state}.{t.when}")
            if self.plan.states[t.state].klass in SUB_CLASSES:
                attrs["sub"] = self.C  # sub-chunk length of the in-chunk part (C == Q: one diagonal block)
            if part:
                attrs["part"] = part
            parts.append(self.emit(part_name, "chunk.output", args, dims, r.span, chunk=Q, state=t.state,
                                   when=t.when, form=s["form"], bounded=s["bounded"], **attrs))
        if part and lin.rest:
            raise SSMCError(f"chunk: part={part} of readout {name}, which has state-free terms")
        for x in lin.rest:
            parts.append(self.product(x, r.span))
        acc = parts[0]
        for k, p in enumerate(parts[1:]):
            acc = self.emit(result if k == len(parts) - 2 else None, "add", (acc, p), dims, r.span)

    def logdecay(self, sp) -> tuple[str, str | None]:
        an = self.an
        if not sp.decay:
            return an.const(0.0), None
        logs, signs = [], []
        for f in sp.decay:
            lg, sg = an.log_of(f)
            logs.append(lg)
            signs.extend(sg)
        ell = logs[0]
        for lg in logs[1:]:
            ell = an.emit("add", (ell, lg), an.dims_of([ell, lg]))
        sgn = None
        for s in signs:
            one = an.emit("sign", (s,), an.by[s].dims)
            sgn = one if sgn is None else an.emit("mul", (sgn, one), an.dims_of([sgn, one]))
        if not bounds.never_minus_inf(an.by, ell, self.memo):
            # a decay of exactly 0 (a reset) has log -inf, and L_t - L_s would be -inf - -inf = NaN after it: floor
            # the log at log(1e-30), so earlier history is scaled by <= 1e-30 (below fp32 resolution)
            ell = an.emit("max", (ell, an.const(LOG_FLOOR)), an.by[ell].dims, an.by[ell].span)
        # name the log-decay after its state for readability
        i = an.by[ell]
        if i in an.new and i.op != "const":
            renamed = make(an.namer(f"{sp.name}.ell"), i.op, i.args, i.dims, i.span, **dict(i.attrs))
            an.new[an.new.index(i)] = renamed
            an.by[renamed.name] = renamed
            an.dep[renamed.name] = False
            ell = renamed.name
        return ell, sgn

    def product(self, x, span) -> str:
        an = self.an
        if not x.factors:
            return self.emit(None, "const", (), (), span, value=float(x.coef))
        if an.dims_of(x.factors) == set(x.dims):  # nothing summed: a plain product
            v = x.factors[0]
            for f in x.factors[1:]:
                v = self.emit(None, "mul", (v, f), an.dims_of([v, f]), span)
        else:
            v = self.emit(None, "contract", x.factors, x.dims, span)
        if x.coef != 1.0:
            c = self.emit(None, "const", (), (), span, value=float(x.coef))
            v = self.emit(None, "mul", (c, v), x.dims, span)
        return v
