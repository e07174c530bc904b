"""The body of a kernel program, shared by every kernel target: one visitor method per IR op, over tiles.

Inside a program every value is a tile whose axes are named: the scan position `t` (Q positions of the current
chunk, or none in a sequential step), the source position `~s` of in-chunk sums, and the tile dims of the plan.
Tiles broadcast by indexing (`x[:, None]`), which Triton and jax.numpy spell alike; everything that differs between
targets (intrinsics, matmuls, reductions, iota, masks) goes through a `Dialect`. The emitter only writes lines; the
target writes the loads, stores, loop and launcher around them.

Chunk stages on one chunk (the chunk-parallel SSD form, see passes/chunk_ops.py for the ops):
  cumsum:        L = cumsum(ell) within the chunk (decay dims; fp32)
  chunk_output:  y_t = Σ_{s<=t} (q_t·u_s) exp(L_t - L_s)  +  exp(L_t) q_t · S_enter
                 (masked s > t before exp and selected after every factor; exponents clamped <= 0 only where the
                 chunk op says `bounded`, i.e. |a| <= 1 is proven)
  chunk_state + state_passing (fused): S = exp(L_last) S + Σ_s exp(L_last - L_s) u_s     (S stays on chip)
"""
from __future__ import annotations

import functools
import re

from ssmc.ir import Instr
from ssmc.passes.chunk_ops import decode

from .kernel_plan import KernelPlan
from .writer import Names, Writer, py_const

SRC = "~s"  # the source-position axis of in-chunk sums


def dim_id(d: str) -> str:
    """A dim as part of an identifier (sizes N_<d>, blocks BLOCK_<d>, offsets o_<d>)."""
    return "".join(c if c.isalnum() else "_" for c in d)


class Dialect:
    """Spellings of tile operations; targets override what differs from jax.numpy."""
    UNARY = {"neg": "-({})", "exp": "jnp.exp({})", "log": "jnp.log({})", "softplus": "jax.nn.softplus({})",
             "silu": "jax.nn.silu({})", "sigmoid": "jax.nn.sigmoid({})", "tanh": "jnp.tanh({})",
             "sqrt": "jnp.sqrt({})", "rsqrt": "lax.rsqrt({})", "abs": "jnp.abs({})",
             "log_sigmoid": "jax.nn.log_sigmoid({})", "sign": "jnp.sign({})"}
    BINARY = {"add": "{} + {}", "sub": "{} - {}", "mul": "{} * {}", "div": "{} / {}",
              "min": "jnp.minimum({}, {})", "max": "jnp.maximum({}, {})"}

    def pow(self, a, b, b_const):
        if b_const is not None and float(b_const).is_integer() and 1 <= b_const <= 4:
            return " * ".join([f"({a})"] * int(b_const))
        return f"jnp.power({a}, {b})"

    def where(self, c, a, b):
        return f"jnp.where({c}, {a}, {b})"

    def minimum(self, a, b):
        return f"jnp.minimum({a}, {b})"

    def sum(self, x, axis):
        return f"jnp.sum({x}, axis={axis})"

    def cumsum0(self, x, ndim):
        return f"jnp.cumsum({x}, axis=0)"

    def floor(self, x):
        return f"jnp.floor({x})"

    def positions(self) -> str:
        """[Q] int32: each step's position inside the chunk."""
        return "lax.iota(jnp.int32, Q)"

    def dot(self, a, b, ca, cb):
        """Matmul of 2-D tiles a, b contracting axis ca of a with axis cb of b -> [a free, b free], fp32."""
        raise NotImplementedError

    def can_dot(self, axes) -> bool:
        return True

    def permute(self, x, perm):
        return f"jnp.transpose({x}, {tuple(perm)})"

    def broadcast_to(self, x, shape):
        return f"jnp.broadcast_to({x}, ({', '.join(shape)},))"

    def causal(self, strict: bool) -> str:
        """[Q, Q] boolean mask: target t >= source s (t > s when strict)."""
        raise NotImplementedError

    def needs_mask(self, d: str) -> bool:
        """Whether tile dim d may be padded past its size inside a program (summing over it needs a mask)."""
        return False

    def mask(self, offsets: str, size: str) -> str:
        """[block of d] boolean from d's offsets and size variables: index < size of d."""
        raise NotImplementedError


class TileEmitter:
    def __init__(self, plan: KernelPlan, dialect: Dialect, w: Writer, names: Names):
        self.k, self.d, self.w, self.pn = plan, dialect, w, names
        self.by = plan.by()
        self.vals: dict[str, tuple[str, tuple]] = {}   # SSA name -> (expression, axes)
        self.step_mode = plan.form == "sequential"
        self.order = [plan.scan, SRC] + list(plan.tile)
        self.state_var: dict[str, str] = {}            # state name -> the variable holding it on chip
        self.L: dict[str, str] = {}                     # state -> its in-chunk cumulative log-decay value name
        self.zero_padded: set[str] = set()              # variables whose padded tile entries are 0 (masked loads)
        self.shared: dict[str, tuple] = {}              # expression -> (variable, line, indent level) in scope
        self.tmp = 0

    # ---- naming / axes -------------------------------------------------------------------------------
    def axes_of(self, dims) -> tuple:
        ax = self.k.tdims(dims)
        return tuple(a for a in ax if a != self.k.scan) if self.step_mode else ax

    def sort(self, axes) -> tuple:
        s = set(axes)
        return tuple(a for a in self.order if a in s)

    def block(self, a: str) -> str:
        return "Q" if a in (self.k.scan, SRC) else self.pn.dim("BLOCK", a)

    def fresh(self, hint: str) -> str:
        self.tmp += 1
        return self.pn.temp(f"{hint}{self.tmp}")

    def bind(self, ssa: str, expr: str, axes, comment: str = "", name: str | None = None) -> str:
        var = name or self.pn(ssa)
        self.w(f"{var} = {expr}{'  # ' + comment if comment else ''}")
        self.vals[ssa] = (var, tuple(axes))
        return var

    def get(self, ssa: str) -> tuple[str, tuple]:
        if ssa in self.vals:
            return self.vals[ssa]
        i = self.by[ssa]
        if i.op == "const":
            return py_const(i.attr("value")), ()
        raise KeyError(f"internal: tile value {ssa} used before it is computed")

    @staticmethod
    def bc(expr: str, src, to) -> str:
        """Index `expr` (axes src) so it broadcasts against axes `to` (src must be an ordered subset of to)."""
        if not src or tuple(src) == tuple(to):
            return expr
        idx = [":" if a in src else "None" for a in to]
        while idx and idx[0] == "None":
            idx.pop(0)  # leading axes broadcast on their own
        if not any(x == "None" for x in idx):
            return expr
        if not expr.replace("_", "").isalnum():
            expr = f"({expr})"
        return f"{expr}[{', '.join(idx)}]"

    def arg(self, ssa, to) -> str:
        e, ax = self.get(ssa)
        return self.bc(e, ax, to)

    # ---- visiting ------------------------------------------------------------------------------------
    def instr(self, i: Instr):
        getattr(self, "op_" + i.op.replace(".", "_"), self.op_elementwise)(i)

    def op_const(self, i):
        pass

    def op_expand(self, i):  # the load already read group i_h // (h/g)
        self.vals[i.name] = self.get(i.args[0])

    def op_elementwise(self, i: Instr):
        axes = self.sort(set().union(*(set(self.get(a)[1]) for a in i.args)))
        args = [self.arg(a, axes) for a in i.args]
        D = self.d
        if i.op in D.UNARY:
            e = D.UNARY[i.op].format(*args)
        elif i.op == "pow":
            c = self.by[i.args[1]]
            e = D.pow(args[0], args[1], c.attr("value") if c.op == "const" else None)
        elif i.op in D.BINARY:
            e = D.BINARY[i.op].format(*args)
        elif i.op == "clamp":
            e = D.BINARY["max"].format(D.BINARY["min"].format(args[0], args[2]), args[1])
        else:
            raise NotImplementedError(f"kernel targets: no tile emitter for op '{i.op}'")
        if not axes and not any(self.get(a)[1] for a in i.args) and all(self.by[a].op == "const" for a in i.args):
            axes = ()
        self.bind(i.name, e, axes)

    def op_contract(self, i: Instr):
        out = self.sort(self.axes_of(i.dims))
        self.bind(i.name, self.contract([self.get(a) for a in i.args], out), out)

    def op_reduce(self, i: Instr):
        x, ax = self.get(i.args[0])
        over = set(self.axes_of(i.attr("over")))
        e = self.sum_axes(self.masked_sum_operand(x, ax, over), ax, over)
        if i.attr("kind") == "mean":
            e = f"({e}) / ({' * '.join(self.size(a) for a in sorted(over))})"
        self.bind(i.name, e, tuple(a for a in ax if a not in over))

    def op_rmsnorm(self, i: Instr):
        x, ax = self.get(i.args[0])
        over = set(self.axes_of(i.attr("over")))
        sq = self.masked_sum_operand(f"{x} * {x}", ax, over)
        keep = tuple(a for a in ax if a not in over)
        ms = self.fresh("ms")
        self.w(f"{ms} = {self.sum_axes(sq, ax, over)} / ({' * '.join(self.size(a) for a in sorted(over))})")
        self.bind(i.name, f"{x} * {self.d.UNARY['rsqrt'].format(self.bc(ms, keep, ax) + ' + ' + repr(i.attr('eps')))}",
                  ax, "rmsnorm over " + ",".join(i.attr("over")))

    def size(self, a: str) -> str:
        return "Q" if a == self.k.scan else self.pn.dim("N", a)

    def mask(self, d: str) -> str:
        return self.d.mask(self.pn.dim("o", d), self.size(d))

    def masked_sum_operand(self, x, ax, over):
        for a in ax:
            if a in over and self.d.needs_mask(a):
                x = self.d.where(self.bc(self.mask(a), (a,), ax), x, "0.0")
        return x

    def sum_axes(self, x, ax, over) -> str:
        for k in sorted((ax.index(a) for a in over if a in ax), reverse=True):
            x = self.d.sum(x, k)
        return x

    # ---- contractions --------------------------------------------------------------------------------
    def contract(self, ops, out, select=None) -> str:
        """Σ over every axis not in `out` of the product of `ops` [(expr, axes)], as matmuls where two operands
        meet over one axis and broadcast-multiply-sum otherwise. Scale operands (whose axes lie within another
        operand's) are multiplied into that operand first, so no product of two small tiles is widened twice.
        select: (mask, mask axes, summed axis): an operand that carries the mask axes is selected by the mask (where,
        not a product) just before that axis is summed, i.e. after every factor folded into it."""
        ops = [(e, tuple(a)) for e, a in ops]
        out = tuple(out)
        every = set().union(*(set(a) for _, a in ops)) if ops else set()
        summed = every - set(out)

        def sel(e, a, gone):
            if select is None or select[2] not in gone or not set(select[1]) <= set(a):
                return e
            return self.hold(self.d.where(self.bc(select[0], select[1], a), e, "0.0"))
        # padded tile dims must not leak into sums: mask the smallest operand carrying each
        for dim in sorted(summed):
            if dim in (self.k.scan, SRC) or not self.d.needs_mask(dim):
                continue
            if any(e in self.zero_padded for e, a in ops if dim in a):
                continue
            k = min((j for j, (_, a) in enumerate(ops) if dim in a), key=lambda j: len(ops[j][1]))
            e, a = ops[k]
            ops[k] = (self.d.where(self.bc(self.mask(dim), (dim,), a), e, "0.0"), a)
        if not ops:
            return "0.0"
        while True:
            ops = self.fold(ops)
            # an axis summed that only one operand carries: sum it there
            for j, (e, a) in enumerate(ops):
                alone = {x for x in a if x in summed and sum(x in b for _, b in ops) == 1}
                if alone and len(ops) > 1:
                    e = self.sum_axes(sel(e, a, alone), a, alone)
                    ops[j] = (self.hold(e), tuple(x for x in a if x not in alone))
            if len(ops) == 1:
                e, a = ops[0]
                e = self.sum_axes(sel(e, a, set(a) & summed), a, set(a) & summed)
                a = tuple(x for x in a if x not in summed)
                return self.reorder(e, a, out)
            pair = None
            for x in sorted(summed):
                holders = [j for j, (_, a) in enumerate(ops) if x in a]
                if len(holders) == 2:
                    pair = (holders, x)
                    break
            if pair is None:  # nothing to contract yet: multiply the two operands that share the most axes
                j1, j2 = max(((i, j) for i in range(len(ops)) for j in range(i + 1, len(ops))),
                             key=lambda ij: len(set(ops[ij[0]][1]) & set(ops[ij[1]][1])))
                ops = self.merge(ops, j1, j2)
                continue
            (j1, j2), x = pair
            (ea, aa), (eb, ab) = ops[j1], ops[j2]
            k = {x} | ({y for y in set(aa) & set(ab) if y in summed
                        and sum(y in b for _, b in ops) == 2})
            fa, fb = [y for y in aa if y not in k], [y for y in ab if y not in k]
            ea, eb = sel(ea, aa, k), sel(eb, ab, k)
            if (len(k) == 1 and len(aa) == 2 and len(ab) == 2 and len(fa) == 1 and len(fb) == 1 and fa != fb
                    and self.d.can_dot(aa + ab)):
                if self.sort((fa[0], fb[0])) != (fa[0], fb[0]):  # operands in the order the result's axes sort
                    (ea, aa, fa), (eb, ab, fb) = (eb, ab, fb), (ea, aa, fa)
                e = self.hold(self.d.dot(ea, eb, aa.index(x), ab.index(x)))
                res = (fa[0], fb[0])
            else:
                union = self.sort(set(aa) | set(ab))
                e = self.sum_axes(f"{self.bc(ea, aa, union)} * {self.bc(eb, ab, union)}", union, k)
                e = self.hold(e)
                res = tuple(y for y in union if y not in k)
            ops = [o for j, o in enumerate(ops) if j not in (j1, j2)] + [(e, res)]

    def hold(self, e: str) -> str:
        """Name a sub-expression (keeps the generated lines short and readable)."""
        if e.isidentifier():
            return e
        return self.share(e, None)

    def share(self, e: str, name: str | None, comment: str = "") -> str:
        """`name = e` (a fresh name when None), unless the same expression already sits in a variable in scope
        (common subexpressions: two states with one decay share the decay tile, the scores, the weights)."""
        hit = self.shared.get(e)
        if hit is not None:
            var, line, level = hit
            depth = level * len(self.w.indent)
            if all(len(x) - len(x.lstrip()) >= depth for x in self.w.lines[line + 1:] if x.strip()):
                return var  # the block that defined it is still open
        var = name or self.fresh("c")
        self.w(f"{var} = {e}{'  # ' + comment if comment else ''}")
        self.shared[e] = (var, len(self.w.lines) - 1, self.w.level)
        return var

    def reassigned(self, var: str):
        """`var` (a state) takes a new value: expressions that read it are no longer shared."""
        word = re.compile(rf"\b{re.escape(var)}\b")
        self.shared = {e: v for e, v in self.shared.items() if not word.search(e)}

    def fold(self, ops):
        changed = True
        while changed and len(ops) > 1:
            changed = False
            for j, (e, a) in enumerate(ops):
                sup = [m for m, (_, b) in enumerate(ops) if m != j and set(a) <= set(b)]
                if sup:
                    m = min(sup, key=lambda m: len(ops[m][1]))
                    eb, ab = ops[m]
                    ops = [o for n, o in enumerate(ops) if n not in (j, m)] + [(f"({eb}) * {self.bc(e, a, ab)}" if a
                                                                               else f"({eb}) * {e}", ab)]
                    changed = True
                    break
        return ops

    def merge(self, ops, j1, j2):
        (ea, aa), (eb, ab) = ops[j1], ops[j2]
        union = self.sort(set(aa) | set(ab))
        e = self.hold(f"{self.bc(ea, aa, union)} * {self.bc(eb, ab, union)}")
        return [o for j, o in enumerate(ops) if j not in (j1, j2)] + [(e, union)]

    def reorder(self, e, a, out) -> str:
        """Axes `a` -> `out` (a permutation, or broadcast when `a` lacks some)."""
        a, out = tuple(a), tuple(out)
        if a == out:
            return e
        if set(a) == set(out):
            return self.d.permute(e, [a.index(x) for x in out])
        if set(a) < set(out):
            srt = self.sort(a)
            if srt != a:
                e, a = self.d.permute(e, [a.index(x) for x in srt]), srt
            return self.d.broadcast_to(self.bc(e, a, out), [self.block(x) for x in out])
        raise AssertionError(f"internal: axes {a} do not fit {out}")

    # ---- chunk stages ----------------------------------------------------------------------------------
    def valid(self, axis: str = None) -> str:
        return "valid" if axis in (None, self.k.scan) else "valid[None, :]"

    def op_chunk_cumsum(self, i: Instr):
        S = i.attr("state")
        ell, eax = self.get(i.args[0])
        axes = self.sort(self.axes_of(i.dims))
        full = self.reorder(ell, eax, axes) if eax != axes else ell
        ell_v, last = self.pn.local(i.name, "ell"), self.pn.local(i.name, "last")
        self.w(f"{ell_v} = {self.d.where(self.bc('valid', (self.k.scan,), axes), full, '0.0')}"
               f"  # log-decay per step (0 past the end)")
        self.bind(i.name, self.d.cumsum0(ell_v, len(axes)), axes, "summed within the chunk")
        self.L[S] = i.name
        self.w(f"{last} = {self.last_row(self.pn(i.name), axes)}  # log-decay across the chunk: the cumsum's last "
               f"row (exp(last - L) is exactly 1 at the last step)")

    def op_chunk_cumsign(self, i: Instr):
        sgn, sax = self.get(i.args[0])
        axes = self.sort(self.axes_of(i.dims))
        full = self.reorder(sgn, sax, axes) if sax != axes else sgn
        negs, last = self.pn.local(i.name, "neg"), self.pn.local(i.name, "last")
        neg = self.d.where(f"{self.bc('valid', (self.k.scan,), axes)} & ({full} < 0)", "1.0", "0.0")
        self.w(f"{negs} = {self.d.cumsum0(neg, len(axes))}  # negative factors so far")
        self.bind(i.name, f"1.0 - 2.0 * ({negs} - 2.0 * {self.d.floor(negs + ' * 0.5')})", axes,
                  "sign of the decay product so far")
        self.w(f"{last} = {self.last_row(negs, axes)}  # negative factors in the whole chunk")

    def last_row(self, x: str, axes) -> str:
        """The tile's row at the chunk's last position, exactly (one nonzero addend)."""
        is_last = f"{self.bc(self.d.positions(), (self.k.scan,), axes)} == Q - 1"
        return self.d.sum(self.d.where(is_last, x, "0.0"), 0)

    def op_chunk_states(self, i):  # fused into the state update at the end of the chunk
        pass

    op_chunk_pass = op_chunk_final = op_chunk_states

    def state_axes(self, S: str) -> tuple:
        sd = next(i for i in self.k.states if i.attr("state") == S).dims
        return self.sort(self.axes_of(sd))

    def op_chunk_output(self, i: Instr):
        a = decode(i)
        S = i.attr("state")
        t = self.k.scan
        out = self.sort(self.axes_of(i.dims))
        L, Lax = self.get(a.L)
        dd = tuple(x for x in Lax if x != t)
        base = functools.partial(self.pn.local, i.name)  # base("D") etc.: this output's locals
        prev = i.attr("when") == "prev"
        Lt = L
        if prev:  # read before the update: decay through t-1
            ell, eax = self.get(a.ell)
            Lt = self.share(f"{L} - {self.d.where(self.bc('valid', (t,), Lax), self.bc(ell, eax, Lax), '0.0')}",
                            base("Lx"), "log-decay through t-1")
        s_ax = self.sort((t, SRC) + dd)
        diff = f"{self.bc(Lt, Lax, s_ax)} - {self.bc(L, (SRC,) + dd, s_ax)}"
        mask = self.bc(f"({self.d.causal(prev)} & {self.valid(SRC)})", (t, SRC), s_ax)
        bounded = i.attr("bounded", False)
        D = self.d.UNARY["exp"].format(self.clamped(self.d.where(mask, diff, "-1e30"), bounded))
        if a.sigma:
            sg, sgax = self.get(a.sigma)
            D += f" * {self.bc(sg, sgax, s_ax)} * {self.bc(sg, (SRC,) + dd, s_ax)}"
        Dv = self.share(D, base("D"), f"decay from source s to target t, masked s {'<' if prev else '<='} t before "
                        f"exp" + (", exponent clamped to <= 0 (|a| <= 1 proven)" if bounded else ""))
        q = [self.get(f) for f in a.q]
        causal = (f"({self.d.causal(prev)} & {self.valid(SRC)})", (t, SRC), SRC)
        parts = []
        for coef, prod in zip(a.ucoef, a.u):
            ops = q + [self.as_source(f) for f in prod]
            # per-step factors (dt, gates: axes within the decay's) go into the [t, s] tile itself, and the causal
            # mask selects after every factor: a NaN or inf at a later step s never reaches an earlier row t
            scales = [(e, ax) for e, ax in ops if set(ax) <= set(s_ax)]
            Dk = Dv
            if scales:
                Dk = self.hold(" * ".join([Dk] + [self.bc(e, ax, s_ax) for e, ax in scales]))
            ops = [o for o in ops if o not in scales] + [(Dk, s_ax)]
            e = self.contract(ops, out, select=causal)
            parts.append(e if coef == 1.0 else f"{coef!r} * {e}")
        self.w(f"{base('in')} = {' + '.join(parts) or '0.0'}  # in-chunk part")
        E = self.d.UNARY["exp"].format(Lt)
        if a.sigma:
            sg, sgax = self.get(a.sigma)
            E += f" * {self.bc(sg, sgax, Lax)}"
        Ev = self.share(E, base("E"), "decay from the chunk's start")
        st = self.contract(q + [(self.state_var[S], self.state_axes(S)), (Ev, Lax)], out)
        self.w(f"{base('st')} = {st}  # state part")
        coef = "" if a.qcoef == 1.0 else f"{a.qcoef!r} * "
        self.bind(i.name, f"{coef}({base('in')} + {base('st')})", out)

    def clamped(self, x: str, bounded: bool) -> str:
        """An in-chunk exponent: clamped to <= 0 only where |a| <= 1 is proven (rounding), else exact."""
        return self.d.minimum(x, "0.0") if bounded else x

    def as_source(self, ssa: str) -> tuple[str, tuple]:
        e, ax = self.get(ssa)
        return e, tuple(SRC if x == self.k.scan else x for x in ax)

    def state_update(self, states_instr: Instr):
        """chunk_state + state_passing for one chunk: S <- exp(L_last) S + Σ_s exp(L_last - L_s) u_s."""
        a = decode(states_instr)
        S = states_instr.attr("state")
        t = self.k.scan
        L, Lax = self.get(a.L)
        dd = tuple(x for x in Lax if x != t)
        L_last = self.pn.local(a.L, "last")
        sax = self.state_axes(S)
        upd_w = self.pn.local(S, "upd_w")
        last = self.bc(L_last, dd, Lax)
        wexp = self.d.UNARY["exp"].format(self.clamped(f"{last} - {L}", states_instr.attr("bounded", False)))
        if a.sigma:
            sg, sgax = self.get(a.sigma)
            sg_last = self.pn.local(a.sigma, "last")
            slast = f"(1.0 - 2.0 * ({sg_last} - 2.0 * {self.d.floor(sg_last + ' * 0.5')}))"
            wexp += f" * {self.bc(slast, dd, Lax)} * {sg}"
        wv = self.share(self.d.where(self.bc('valid', (t,), Lax), wexp, '0.0'), upd_w,
                        "decay from each step to the chunk's end")
        parts = []
        for coef, prod in zip(a.ucoef, a.u):
            e = self.contract([self.get(f) for f in prod] + [(wv, Lax)], sax)
            parts.append(e if coef == 1.0 else f"{coef!r} * {e}")
        decay = self.d.UNARY["exp"].format(L_last)
        if a.sigma:
            decay += f" * {slast}"
        var = self.state_var[S]
        self.w(f"{var} = {self.bc(decay, dd, sax) if dd else decay} * {var} + {' + '.join(parts) or '0.0'}"
               f"  # the state entering the next chunk")
        self.reassigned(var)

    def step_updates(self):
        """End of a sequential step: every state takes its updated value (broadcast to the state's tile)."""
        for u in (i for i in self.k.p.instrs if i.op == "update"):
            S = u.attr("state")
            e, ax = self.get(u.args[0])
            sax = self.state_axes(S)
            self.w(f"{self.state_var[S]} = {self.reorder(e, ax, sax) if ax != sax else e}")
            self.reassigned(self.state_var[S])
