"""adjoint: the backward of a step program as step programs the same passes and emitters compile.

For a state with a diagonal recurrence S_t = a_t ⊙ S_{t-1} + Σ_u u_t read by terms r_t = Σ_τ c_τ q_τ · S_t,
given the readouts' cotangents dr (design-notes "Backward"):
  * part=dq   the forward recurrence again (same decay, same updates) whose outs are the cotangents of the
              readouts' query factors: d q_τ = c_τ dr · S (the dims q_τ does not carry summed);
  * part=adj  the adjoint G_t = a_{t+1} ⊙ G_{t+1} + Σ_τ c_τ q_τ ⊗ dr_t, a forward recurrence of the same decay
              class over reversed time (a reverse-time program, Program.reverse; the log-decay is shifted one
              step and 0 at the first reversed step; G starts from the final state's cotangent); its outs are the
              cotangents of the update factors: d f = G · (the other factors). A state whose readouts read it
              before its update (r_t = q · S_{t-1}) has G_t = a_t ⊙ G_{t+1} + Σ q_{t+1} ⊗ dr_{t+1} instead: no
              shift, and the update factors' cotangents read G before the step.
  * part=readouts  the readouts' state terms (Σ_τ c_τ q_τ · S_t), when the outs are a nonlinear function of
              them (a gated norm): the epilogue's cotangent needs their values first.
The log-decays' cotangent dℓ_t = a_t <S_{t-1}, G_t>: for a scalar positive decay read after its update (Mamba2,
RetNet) the programs give it per chunk without cancellation (`pairs`): dq the entering state's reads in the chunk
(X_t = exp(L_t) <q_t ⊗ dr_t, S_enter>, the state part of <q_t, dq_t>) and the states entering each chunk (or,
with split, the forward stores those: `forward_entering`); adj the chunk's updates read after it (Y_s, the state
part of <u_s, G_s>), the in-chunk pairs s < i <= t (W_i, from the summand tile of <u, G> that adj's d dt already
forms: no matmul of its own) and, from the entering states (an input indexed by chunk), the pairs across the
chunk <S_enter, G_enter>; ssmc/backward.py sums
dℓ_i = Σ_{t >= i} X_t + W_i + Σ_{s < i} Y_s + exp(Σ ℓ) <S_enter, G_enter> within each chunk. Otherwise
(and where the programs are not chunked) dℓ_t = Σ_{s >= t} (<q_s, dq_s> - <u_s, G_s>) plus <S_T, dS_T>: a sum
whose terms cancel, exact only with fp32 dots. Every program takes the factors as inputs (evaluated once by the
caller, a group-indexed factor before its `expand`), so a causal conv or any other prologue is never replayed
backwards.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ssmc.errors import SSMCError
from ssmc.ir import Array, Instr, Namer, Program, dce, make

from .chunk import chunk_dim

from .linear import NotLinear
from .plan import make_plan


class NotAdjointable(SSMCError):
    """The program has no derived backward (the caller falls back to XLA derivatives); the message says why."""


@dataclass
class Cot:
    """One out of a derived program: the cotangent of factor `factor` (a value of the forward program), with
    dims `dims` (the factor's, plus the decay's and batch dims, summed away by the caller), for state `state`."""
    out: str
    factor: str
    dims: tuple[str, ...]
    state: str
    sign: float           # +1 for a readout term's query factor, -1 for an update factor (dℓ = <q,dq> - <u,G>)
    for_decay: bool       # the one factor per term / update whose cotangent gives that term's share of dℓ
    when: str = "new"
    share: str | None = None  # the out holding <factor, cotangent> over the log-decay's dims (fp32), when the
    #                           cotangent has more dims than those (dC[b,t,h,n] of a decay over [b,t,h])
    share_dims: tuple[str, ...] = ()


@dataclass
class StateInfo:
    name: str
    dims: tuple[str, ...]
    update_dims: tuple[str, ...]
    log: str | None       # value (forward program or analysis helper) holding log|a_t|; None: a = 1
    signs: tuple[str, ...]  # values whose sign the decay carries (empty: a > 0)
    ldims: tuple[str, ...]  # dims of the log-decay input: the log's, the scan dim and the batch dims
    when: str             # "new": readouts read S_t; "prev": they read S_{t-1}
    batch: tuple[str, ...]  # state dims along which the state holds independent sequences (dℓ keeps them)
    pairs: dict | None = None  # the per-chunk form's outs (dq: read, enter; adj: upd, straddle, across), or None


@dataclass
class Derivation:
    forward: Program
    programs: dict[str, Program]
    inputs: dict[str, dict[str, str]]   # part -> {input array: forward value it holds ("dr:<readout>", "ln:<S>")}
    cots: dict[str, list[Cot]]          # part -> its cotangent outs
    states: dict[str, StateInfo]
    readouts: dict[str, tuple]          # readout value -> (its dims, the R program's out name or None)
    rest: dict[str, list]               # readout value -> state-free Prods of its linear form
    helpers: list[Instr]                # analysis helpers (logs of decays, reciprocals) the caller evaluates
    linear_outs: bool                   # the outs are linear in the readouts (no R program needed)
    dep: dict[str, bool]                # forward value -> whether it depends on a state
    forward_entering: Program | None = None  # split: the forward program plus the states entering each chunk
    pieces: dict[str, dict[str, Program]] | None = None  # split: adj as the programs its kernels run
    sums: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)  # part -> {out: the pieces' outs
    #                                                                            that sum to it}


def derive(p: Program, pairs: bool = True, split: bool = False) -> Derivation:
    """The derived backward programs of a lowered (pre-pass) step program, or NotAdjointable. pairs: the per-chunk
    form of the decay gradient for the states that have it (the programs then need the chunked form). split (with
    pairs, when every state has the per-chunk form): the forward itself stores the states entering each chunk (the
    `forward` program: the spec's program plus those outs), so `dq` takes them as given and runs every chunk in
    parallel (a kernel module's `entering` option) instead of walking the sequence again; likewise `adj_entering`
    (adj's recurrence alone) stores the adjoint states entering each chunk, and adj runs from them as `pieces`."""
    plan = make_plan(p)
    an = plan.analysis
    for sp in plan.states.values():
        if sp.klass == "non-diagonal":
            raise NotAdjointable(f"state '{sp.name}': {sp.reason or 'non-diagonal transition'}; its backward is the "
                                 f"XLA target's derivative")
    scan = p.scan
    timed = [set(a.dims) for a in p.inputs if scan in a.dims]
    batch_all = set.intersection(*timed) - {scan} if timed else set()
    states: dict[str, StateInfo] = {}
    for sp in plan.states.values():
        upd = next(i for i in p.instrs if i.op == "update" and i.attr("state") == sp.name)
        terms = [t for lin in plan.readouts.values() for t in lin.terms if t.state == sp.name]
        whens = {t.when for t in terms}
        if len(whens) > 1:
            raise NotAdjointable(f"state '{sp.name}' is read both before and after its update")
        log, signs = None, []
        if sp.decay:
            logs = []
            for f in sp.decay:
                lg, sg = an.log_of(f)
                logs.append(lg)
                signs += sg
            log = logs[0]
            for other in logs[1:]:
                log = an.emit("add", (log, other), an.dims_of((log, other)))
        batch = p.order(set(sp.dims) & batch_all)
        # the log-decay input carries the scan and batch dims (so packed sequences lie along a dim every input has)
        ld = p.order(an.dims_of((log,)) | {scan} | set(batch)) if log else ()
        when = whens.pop() if whens else "new"
        per_chunk = pairs and log is not None and not signs and sp.klass == "scalar" and when == "new" and terms
        states[sp.name] = StateInfo(sp.name, sp.dims, upd.dims, log, tuple(signs), ld, when, batch,
                                    {} if per_chunk else None)
    readouts, rest = {}, {}
    for r, lin in plan.readouts.items():
        if any(t.state not in states for t in lin.terms):
            raise NotAdjointable(f"readout {r} reads an unknown state")
        readouts[r] = (an.by[r].dims, None)
        rest[r] = list(lin.rest)
    linear_outs = True
    for i in p.instrs:
        if i.op == "out" and an.dep[i.args[0]]:
            try:
                an.lin(i.args[0])
            except NotLinear:
                linear_outs = False
    split = split and bool(states) and all(st.pairs is not None for st in states.values())
    b = _Builders(p, an, states, plan, split)
    d = Derivation(p, {}, {}, {}, states, readouts, rest, [], linear_outs, dict(an.dep))
    for part in ("dq", "adj") + (() if linear_outs else ("readouts",)):
        prog, inputs, cots, outs = b.build(part)
        d.programs[part], d.inputs[part], d.cots[part] = prog, inputs, cots
        if part == "readouts":
            d.readouts = {r: (dims, outs[r]) for r, (dims, _) in readouts.items()}
    d.helpers = list(an.new)
    if split:
        d.forward_entering = b.forward_entering()
        d.programs["adj_entering"] = b.states_walk(d.programs["adj"])  # (its inputs are adj's: adj's feed)
        adj_pieces, d.sums["adj"] = b.pieces(d.programs["adj"])
        d.pieces = {"adj": adj_pieces}
    return d


_IDENT = re.compile(r"[A-Za-z_]\w*$")


class _Builders:
    def __init__(self, p, an, states, plan, split=False):
        self.p, self.an, self.states, self.plan, self.scan = p, an, states, plan, p.scan
        self.split = split  # the states entering each chunk are the forward's outs (forward_entering), not dq's
        cd = chunk_dim(p.scan)
        self.dims = tuple(d for x in p.dims for d in ((cd, x) if x == p.scan else (x,)))  # t# before the scan dim

    def order(self, dims) -> tuple[str, ...]:
        """Dims in the derived programs' order: the forward's, with the chunk-index dim t# before the scan dim."""
        s = set(dims)
        return tuple(d for d in self.dims if d in s)

    def build(self, part: str):
        p, an = self.p, self.an
        taken = {a.name for a in p.states}  # array names of the new program (identifiers)
        ssa = Namer({i.name for i in p.instrs} | {i.name for i in an.new})
        instrs: list[Instr] = []
        dims_of: dict[str, tuple] = {}  # value -> its dims, as instructions are added
        inputs: list[Array] = []
        held: dict[str, str] = {}  # input array -> what it holds
        local: dict[str, str] = {}  # forward value -> its name in the new program

        def add(op, args, dims, span=None, hint=None, **attrs) -> str:
            i = make(ssa(hint), op, args, self.order(dims), span, **attrs)
            instrs.append(i)
            dims_of[i.name] = i.dims
            return i.name

        def array(hint: str, dims, holds: str, span=None) -> str:
            name = _fresh(taken, _ident(hint))
            inputs.append(Array(name, tuple(dims), span))
            held[name] = holds
            return add("input", (), dims, span, hint=name, array=name)

        def value(f: str) -> str:
            """A forward factor in the new program: a constant, the `expand` of a group-indexed input, or an input
            array holding its value."""
            if f in local:
                return local[f]
            i = an.by[f]
            if i.op == "const":
                v = add("const", (), (), None, value=i.attr("value"))
            elif i.op == "expand":
                v = add("expand", (value(i.args[0]),), i.dims, i.span, **dict(i.attrs))
            else:
                v = array(i.attr("array") or f, i.dims, f, i.span)
            local[f] = v
            return v

        def product(coef: float, factors, dims, extra=(), span=None) -> str:
            """coef * the factors * extra, summed to `dims`, spelled as the frontend spells a spec's products
            (a chain of binary muls, then one contraction with the last operand, e.g. a state) so the chunk
            pass finds the same factors in it."""
            ops = [value(f) for f in factors] + list(extra)
            if coef != 1.0:
                ops.insert(0, add("const", (), (), value=float(coef)))
            have = set().union(*(set(dims_of[o]) for o in ops))
            if not set(dims) <= have:
                raise NotAdjointable(f"a product broadcasts along {sorted(set(dims) - have)} (at {span})")
            acc = ops[0]
            for k, o in enumerate(ops[1:], 1):
                both = set(dims_of[acc]) | set(dims_of[o])
                rest = set().union(*(set(dims_of[x]) for x in ops[k + 1:]))
                keep = both & (set(dims) | rest)
                acc = add("mul" if keep == both else "contract", (acc, o), keep, span)
            if set(dims_of[acc]) != set(dims):
                acc = add("reduce", (acc,), dims, span, kind="sum",
                          over=tuple(x for x in dims_of[acc] if x not in dims))
            return acc

        dr: dict[str, str] = {}

        def cotangent(r: str) -> str:
            if r not in dr:
                dims = an.by[r].dims
                dr[r] = array(f"d{_readable(an.by[r])}", dims, "dr:" + r, an.by[r].span)
            return dr[r]

        state_vals: dict[str, tuple[str, str]] = {}  # state -> (value before the step, after)
        cots: list[Cot] = []
        for s in self.states.values():
            sp = self.plan.states[s.name]
            prev = add("state", (), s.dims, None, hint=f"{s.name}.prev", state=s.name)
            parts = []
            if s.log is not None:  # a_t = exp(log|a_t|), times the product of the factors' signs where not > 0
                ln = array(f"log_a_{s.name}", s.ldims, "ln:" + s.name)
                a = add("exp", (ln,), s.ldims)
                if s.signs:
                    a = add("mul", (a, array(f"sign_a_{s.name}", s.ldims, "sign:" + s.name)), s.ldims)
                parts.append(add("mul", (a, prev), s.update_dims))
            else:
                parts.append(prev)
            if part == "adj":
                for r, lin in self.plan.readouts.items():
                    for t in lin.terms:
                        if t.state == s.name:
                            parts.append(product(t.coef, t.factors, s.update_dims, (cotangent(r),),
                                                 an.by[r].span))
            else:
                for u in sp.updates:
                    parts.append(product(u.coef, u.factors, s.update_dims))
            new = parts[0]
            for x in parts[1:]:
                new = add("add", (new, x), s.update_dims, hint=f"{s.name}.new")
            instrs.append(make(f"update.{s.name}", "update", (new,), s.update_dims, None, state=s.name))
            state_vals[s.name] = (prev, new)
        outs: list[Array] = []
        out_of: dict[str, str] = {}

        def out(value_name: str, hint: str, dims, span=None, fp32=False) -> str:
            """An out of the derived program. fp32: kept in float32 whatever the activations' dtype (the
            values the decays' cotangents and the nonlinear epilogue are computed from: sums that cancel);
            the others come out in the activations' dtype, as a forward's outs."""
            name = _fresh(taken, _ident(hint))
            outs.append(Array(name, tuple(dims), span))
            instrs.append(make(f"out.{name}", "out", (value_name,), self.order(dims), span, out=name,
                               **({"fp32": True} if fp32 else {})))
            return name

        if part == "readouts":
            for r, lin in self.plan.readouts.items():
                acc = None
                for t in lin.terms:
                    prev, new = state_vals[t.state]
                    v = product(t.coef, t.factors, an.by[r].dims, (new if t.when == "new" else prev,), an.by[r].span)
                    acc = v if acc is None else add("add", (acc, v), an.by[r].dims)
                out_of[r] = out(acc, f"{an.by[r].name.lstrip('%')}_terms", an.by[r].dims, an.by[r].span, fp32=True)
        else:
            # the cotangent of each factor of each readout term (dq) / update product (adj)
            items = []
            if part == "dq":
                for r, lin in self.plan.readouts.items():
                    for t in lin.terms:
                        items.append((t.state, t.coef, t.factors, (cotangent(r),), +1.0, t.when, an.by[r].span))
            else:
                for s in self.states.values():
                    for u in self.plan.states[s.name].updates:
                        items.append((s.name, u.coef, u.factors, (), -1.0, s.when, None))
            shares: dict[str, list] = {}  # state -> (factor, its cotangent, dims) whose <f, d f> sum to <q, dq>
            for state, coef, factors, extra, sign, when, span in items:
                s = self.states[state]
                prev, new = state_vals[state]
                G = new if (part == "dq" and when == "new") or (part == "adj" and s.when == "new") else prev
                live = [k for k, f in enumerate(factors) if an.by[f].op != "const"]
                need = set(s.ldims) | set(s.batch) if s.log is not None else set()
                # dℓ takes <f, d f> over the dims outside the decay's: one factor per term keeps the decay's dims
                pick = next((k for k in live if need <= set(an.by[factors[k]].dims)), live[0] if live else None)
                chosen = False  # the picked factor's cotangent keeps the decay's dims
                for k in live:
                    f = factors[k]
                    others = factors[:k] + factors[k + 1:]
                    keep = set(an.by[f].dims) | set(s.batch) | {self.scan} | (need if k == pick else set())
                    have = set(s.dims) | {self.scan} | set().union(*(set(an.by[o].dims) for o in others)) \
                        | set().union(*(set(dims_of[e]) for e in extra))
                    keep = p.order(keep & have)
                    v = product(coef, others, keep, extra + (G,), span)
                    if s.pairs is not None and k == pick and need <= set(keep):
                        # <f, d f> over the decay's dims: this term's (update's) reads of G (S) in the per-chunk form
                        shares.setdefault(state, []).append((f, v, keep))
                    for_decay = k == pick and need <= set(keep) and s.pairs is None
                    decay_src = for_decay and s.log is not None
                    over = tuple(x for x in keep if x not in need)
                    share, sd = None, ()
                    if decay_src and over:
                        # this term's share of dℓ, <f, d f> summed over the dims outside the decay's, in the kernel
                        # from the fp32 cotangent (an epilogue of it: passes/plan.py `post`), so the cotangent
                        # itself goes out in the activations' dtype
                        fv = value(f)
                        prod = add("mul", (fv, v), set(dims_of[fv]) | set(keep), span)
                        sd = p.order(need & set(dims_of[prod]))
                        red = add("reduce", (prod,), sd, span, kind="sum",
                                  over=tuple(x for x in dims_of[prod] if x not in need))
                        share = out(red, f"share_{_readable(an.by[f])}", sd, span, fp32=True)
                    # a cotangent over the decay's dims only (d dt) is small: fp32, it meets dℓ in the same sum
                    small = s.log is not None and set(keep) <= set(s.ldims)
                    name = out(v, f"d_{_readable(an.by[f])}", keep, an.by[f].span,
                               fp32=(decay_src and not over) or small)
                    cots.append(Cot(name, f, keep, state, sign, for_decay, when, share, sd))
                    chosen = chosen or cots[-1].for_decay
                if s.log is not None and s.pairs is None and not chosen:
                    raise NotAdjointable(f"state '{state}': no factor of a {'readout term' if sign > 0 else 'update'} "
                                         f"carries the decay's dims {list(s.ldims)}")
        if part != "readouts":
            for s in self.states.values():
                if s.pairs is not None:
                    self.pairs_outs(part, s, state_vals[s.name], shares.get(s.name, []), value, product, add, out,
                                    array)
        used = set().union(*(set(i.dims) for i in instrs))
        groups = tuple((g, h) for g, h in p.groups if g in used and h in used)
        prog = Program(f"{p.name}_{part}", self.order(used), p.scan, groups, tuple(inputs),
                       tuple(Array(s.name, s.dims) for s in self.states.values()), tuple(outs), tuple(instrs),
                       notes=(f"adjoint{{part={part}}} of `ssm {p.name}`: {_WHAT[part]}",), source=p.source,
                       filename=p.filename, reverse=part == "adj")
        return prog, held, cots, out_of


    def enter_dims(self, s) -> tuple[str, ...]:
        """How the states entering each chunk lie in memory: the chunk index first, then the state's dims (each
        chunk's state contiguous, as a segment schedule's incoming states: `entering` takes them without a copy)."""
        return (chunk_dim(self.scan),) + tuple(s.dims)

    def enter_out(self, s, prev, add, out):
        """The out holding the forward state entering each chunk (dq's)."""
        e = add("enter", (prev,), s.dims + (chunk_dim(self.scan),), hint=f"{s.name}.enter_fwd", state=s.name)
        s.pairs["enter"] = out(e, f"{s.name}_enter", self.enter_dims(s))

    def stored_states(self, prog: Program, key: str, suffix: str) -> tuple[list, list]:
        """(instrs, outs) storing each state of `prog` entering each chunk, an out per state (recorded in the
        state's pairs under `key`)."""
        taken = {a.name for a in prog.inputs + prog.states + prog.outs}
        instrs, outs = [], []
        for s in self.states.values():
            prev = next(i for i in prog.instrs if i.op == "state" and i.attr("state") == s.name)
            e = make(f"{s.name}.{suffix}", "enter", (prev.name,), self.order(s.dims + (chunk_dim(self.scan),)),
                     None, state=s.name)
            name = _fresh(taken, f"{s.name}_enter")
            outs.append(Array(name, self.enter_dims(s)))
            instrs += [e, make(f"out.{name}", "out", (e.name,), e.dims, None, out=name)]
            s.pairs[key] = name
        return instrs, outs

    def forward_entering(self) -> Program:
        """The forward program that also stores the states entering each chunk (an out per state, indexed by chunk
        as dq's would be): what the forward of a differentiated call runs, so the backward need not walk again."""
        p = self.p
        instrs, outs = self.stored_states(p, "enter", "enter_fwd")
        instrs, outs = list(p.instrs) + instrs, list(p.outs) + outs
        return Program(f"{p.name}_fwd", self.dims, p.scan, p.groups, p.inputs, p.states, tuple(outs), tuple(instrs),
                       notes=p.notes + ("forward of a differentiated call: also stores the states entering each "
                                        "chunk (the derived backward's dq and adj read them)",),
                       source=p.source, filename=p.filename)

    def states_walk(self, prog: Program) -> Program:
        """`prog`'s recurrence alone (the instructions its state updates need), storing the states entering each
        chunk: adj's walk over reversed time, so that adj itself then runs every chunk at once from them (its
        `entering`), as dq does from the forward's."""
        instrs, outs = self.stored_states(prog, "adj_enter", "enter_adj")
        return _restrict(prog, (), f"{self.p.name}_adj_entering", instrs, outs,
                         f"adjoint{{part=adj_entering}} of `ssm {self.p.name}`: adj's recurrence alone over reversed "
                         f"time, storing the adjoint states entering each chunk (adj then runs every chunk at once "
                         f"from them)")

    def pieces(self, prog: Program) -> tuple[dict[str, Program], dict[str, tuple[str, str]]]:
        """`prog` (run from given entering states: every chunk on its own) as one program per set of state dims
        its outs keep: an out that keeps p and sums n (Mamba2's dx) and one that keeps n and sums p (dB) then run
        as kernels blocked along the dim each keeps, instead of one kernel holding every tile at once. The outs
        that keep no state dim split by what they read: their state parts (d dt's, the decay gradient's upd and
        across) join the piece whose contraction with the state they share, which then holds the state's tile
        whole; their in-chunk parts (d dt's, the straddle) form "rest", a piece that reads no state at all.
        Returns (pieces by label, {out: (its in-chunk out, its state-part out)} for the outs split in two)."""
        sdims = set().union(*(set(s.dims) - set(s.batch) - set(s.ldims) for s in self.states.values()))
        by = prog.by_name()
        states = {i.name for i in prog.instrs if i.op == "state"} | {i.args[0] for i in prog.instrs
                                                                     if i.op == "update"}
        groups: dict[tuple, list[str]] = {}
        rest: list[tuple[str, str]] = []  # (out, its value) keeping no state dim
        for o in prog.outs:
            kept = tuple(d for d in o.dims if d in sdims)
            if kept:
                groups.setdefault(kept, []).append(o.name)
            else:
                rest.append((o.name, by[f"out.{o.name}"].args[0]))

        def cone(v):  # the instructions value v is computed from
            seen, todo = set(), [v]
            while todo:
                x = todo.pop()
                if x not in seen and x in by:
                    seen.add(x)
                    todo += list(by[x].args)
            return [by[x] for x in seen]

        def first_factor_dims(v):
            """The state dims of the readout's first factor: the emitters contract it with the state first
            (Mamba2's d dt = Σ x * (B·G), the B·G of d x), so the piece summing those dims shares that matmul."""
            i = by[v]
            while i.op == "reduce":
                i = by[i.args[0]]
            if i.op == "contract":
                i = by[next((a for a in i.args if a not in states), i.args[0])]
            while i.op == "mul":
                i = by[i.args[0]]
            return set(i.dims) & sdims

        taken = {a.name for a in prog.inputs + prog.states + prog.outs}
        host_outs, rest_outs, sums, extra, host = [], [], {}, {"host": [], "rest": []}, None
        for name, v in rest:
            ops = cone(v)
            if any(i.op == "across" or (i.op == "pairs" and i.attr("part") == "state") for i in ops):
                host_outs.append(name)
            elif any(i.op == "pairs" for i in ops) or not (states & {i.name for i in ops}):
                rest_outs.append(name)
            else:  # a readout of the state: its in-chunk part here, its state part with the host
                host = host or tuple(d for d in prog.order(sdims - first_factor_dims(v)))
                o = next(a for a in prog.outs if a.name == name)
                pair = []
                for part, where in (("in", "rest"), ("state", "host")):
                    out_name = _fresh(taken, f"{name}_{part}")
                    # (the decay gradient's upd already takes the state part of d dt: the same value)
                    val = next((i for i in prog.instrs if i.op == "pairs" and i.args == (v,)
                                and i.attr("part") == part), None)
                    new = []
                    if val is None:
                        val = make(f"{v}.{part}", "pairs", (v,), by[v].dims, by[v].span, part=part)
                        new = [val]
                    extra[where].append((Array(out_name, o.dims, o.span), new + [
                        make(f"out.{out_name}", "out", (val.name,), o.dims, o.span, out=out_name, fp32=True)]))
                    pair.append(out_name)
                sums[name] = tuple(pair)
        if host not in groups:
            host = min(groups, key=lambda kept: (len(kept), kept)) if groups else None
        if host is None:  # no piece keeps a state dim: one program reads the state whole
            groups[()] = [n for n, _ in rest]
            extra, sums = {"host": [], "rest": []}, {}
        else:
            groups[host] += host_outs
            if rest_outs or extra["rest"]:
                groups[()] = rest_outs

        def piece(kept, names):
            label = "_".join(kept) or "rest"
            add = extra["host"] if kept == host else extra["rest"] if not kept else []
            listed = names + [a.name for a, _ in add]
            return _restrict(prog, names, f"{prog.name}_{label}", [x for _, ins in add for x in ins],
                             [a for a, _ in add],
                             prog.notes[0] + f"; outs {', '.join(listed)} (" + (
                                 f"those keeping the state dims {list(kept)}" if kept else "the in-chunk parts: no "
                                 "state read") + (", and the state parts of the outs keeping none" if add and kept
                                                  else "") + ": one of its kernels run from the entering states)")
        return {("_".join(kept) or "rest"): piece(kept, names) for kept, names in groups.items()}, sums

    def pairs_outs(self, part, s, vals, shares, value, product, add, out, array):
        """The per-chunk decay gradient's outs of state `s` (module docstring). dq: the state part of <q ⊗ dr, S_t>
        (X) and the states entering each chunk; adj: the state part of <u, G_t> (Y), the in-chunk pairs straddling
        each step (W, from the summands of <u, G_t> that adj's own cotangent readouts already form) and, from dq's
        entering states (an input indexed by chunk), <S_enter, G_enter> at each step of the chunk. A state part
        comes from the cotangent readouts' own matmul with the state."""
        prev, new = vals
        ld = s.ldims

        def total(vs):
            acc = None
            for v in vs:
                acc = v if acc is None else add("add", (acc, v), ld)
            return acc
        states = []
        for f, v, keep in shares:
            st = add("pairs", (v,), keep, part="state")
            both = set(self.an.by[f].dims) | set(keep)
            prod = add("mul", (value(f), st), both)
            over = tuple(x for x in self.p.order(both) if x not in ld)
            states.append(add("reduce", (prod,), ld, kind="sum", over=over) if over else prod)
        if not states:
            raise NotAdjointable(f"state '{s.name}': no factor of a {'readout term' if part == 'dq' else 'update'} "
                                 f"carries the decay's dims {list(ld)}")
        s.pairs["read" if part == "dq" else "upd"] = out(total(states), f"dl_{'read' if part == 'dq' else 'upd'}_"
                                                         f"{s.name}", ld, fp32=True)
        if part == "dq":  # the forward states entering each chunk, for adj (unless the forward stores them)
            if not self.split:
                self.enter_out(s, prev, add, out)
            return
        # the straddle over reversed time: pairs (G's source <= i' < its target) of the summands of <u, G>
        # (factors over the decay's dims only, dt, multiply the contraction: its matmuls are d dt's own)
        terms = []
        for u in self.plan.states[s.name].updates:
            small = [f for f in u.factors if set(self.an.by[f].dims) <= set(ld)]
            v = product(u.coef, [f for f in u.factors if f not in small], ld, (new,), None)
            for f in small:
                v = add("mul", (value(f), v), ld)
            terms.append(v)
        v = add("pairs", (total(terms),), ld, part="straddle")
        s.pairs["straddle"] = out(v, f"dl_straddle_{s.name}", ld, fp32=True)
        # the pairs across each chunk: <S entering it, G entering it (walking back)>, at each of its steps
        fwd = array(f"{s.name}_fwd", self.enter_dims(s), "enter:" + s.name)
        z = add("across", (fwd, prev), ld, state=s.name)
        s.pairs["across"] = out(z, f"dl_across_{s.name}", ld, fp32=True)


_WHAT = {"dq": "the forward recurrence; outs: the cotangents of the readouts' query factors",
         "adj": "the adjoint state over reversed time (scan reverse); outs: the cotangents "
                "of the update factors",
         "readouts": "the forward recurrence; outs: the readouts' state terms (the epilogue is nonlinear in them)"}


def _restrict(prog: Program, keep_outs, name: str, instrs, outs, note: str) -> Program:
    """`prog` with only the outs `keep_outs` (plus `outs`, set by the extra `instrs`) and the instructions they and
    the state updates need, under `name`."""
    body = dce(prog.with_instrs([i for i in prog.instrs if i.op != "out" or i.attr("out") in keep_outs]
                                + list(instrs))).instrs
    arrays = {i.attr("array") for i in body if i.op == "input"}
    used = set().union(*(set(i.dims) for i in body))
    return Program(name, tuple(d for d in prog.dims if d in used), prog.scan,
                   tuple((g, h) for g, h in prog.groups if g in used and h in used),
                   tuple(a for a in prog.inputs if a.name in arrays), prog.states,
                   tuple(o for o in prog.outs if o.name in keep_outs) + tuple(outs), tuple(body), notes=(note,),
                   source=prog.source, filename=prog.filename, reverse=prog.reverse)


def _fresh(taken: set, base: str) -> str:
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _ident(n: str) -> str:
    n = n.lstrip("%")
    return n if _IDENT.match(n) else "v" + re.sub(r"[^0-9A-Za-z_]", "_", n)


def _readable(i: Instr) -> str:
    return _ident(i.attr("array") or i.name)


@dataclass(frozen=True)
class Adjoint:
    """The pass form (pipelines, `k.passes`): the named part of the derived backward program."""
    part: str = "dq"
    name = "adjoint"

    def run(self, p: Program) -> Program:
        d = derive(p)
        if self.part not in d.programs:
            raise SSMCError(f"adjoint: no part '{self.part}' for '{p.name}' (parts: {', '.join(d.programs)})")
        return d.programs[self.part]


