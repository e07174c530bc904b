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

import contextlib
import functools
import re

from ssmc.errors import TargetError
from ssmc.ir import Instr
from ssmc.passes.chunk_ops import decode, part_problem
from ssmc.ops import spellings

from .kernel_plan import KernelPlan
from .writer import Names, Writer, py_const

SRC = "~s"  # the source-position axis of in-chunk sums


def dim_id(d: str) -> str:
    """A dim as part of an identifier (sizes N_<d>, blocks BLOCK_<d>, offsets o_<d>)."""
    return "".join(c if c.isalnum() else "_" for c in d)


class Dialect:
    """Spellings of tile operations; targets override what differs from jax.numpy."""
    UNARY = spellings("jnp", 1)  # ssmc/ops.py
    BINARY = {k: v for k, v in spellings("jnp", 2).items() if k != "pow"}  # pow: Dialect.pow

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

    def bdot(self, a, b, ca, cb):
        """Batched matmul of 3-D tiles over their leading axis, contracting axis ca (1 or 2) of a with axis cb of b
        -> [batch, a free, b free], fp32 accumulation (the sub-chunk blocks of key-/value-wise chunks)."""
        raise NotImplementedError

    def reshape(self, x, shape):
        return f"jnp.reshape({x}, ({', '.join(map(str, shape))},))"

    def iota(self, shape, dim: int) -> str:
        """int32 index along axis `dim` of a tile of `shape` (broadcastable to it)."""
        return f"lax.broadcasted_iota(jnp.int32, ({', '.join(map(str, shape))},), {dim})"

    # key-/value-wise chunks: a matmul form under a runtime guard (TileEmitter.guarded_in_chunk), for dialects
    # with a scalar `if` inside kernels; the others take the sub-chunk form unconditionally
    guarded_subchunks = False
    GUARD_EXP = 40.0  # the guarded form's exponents stay within +-GUARD_EXP: exp neither overflows nor flushes

    def static_range(self, n: str) -> str:
        """A loop unrolled when the kernel is compiled (n a compile-time expression)."""
        return f"range({n})"

    def max(self, x, axis):
        return f"jnp.max({x}, axis={axis})"

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
            pairs = [(h, x) for x in sorted(summed) for h in [[j for j, (_, a) in enumerate(ops) if x in a]]
                     if len(h) == 2]
            # a matmul another readout already computed is reused (Mamba2's dq: <C ⊗ dy, S> takes dy @ S from dC)
            pair = next((c for c in pairs if select is None and self.dot_of(ops, summed, *c) in self.shared),
                        pairs[0] if pairs else None)
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

    def dot_of(self, ops, summed, js, x) -> str | None:
        """The matmul contract() would write for operands js over axis x (None: not one matmul)."""
        (ea, aa), (eb, ab) = ops[js[0]], ops[js[1]]
        k = {x} | {y for y in set(aa) & set(ab) if y in summed and sum(y in b for _, b in ops) == 2}
        fa, fb = [y for y in aa if y not in k], [y for y in ab if y not in k]
        if not (len(k) == 1 and len(aa) == 2 and len(ab) == 2 and len(fa) == 1 and len(fb) == 1 and fa != fb
                and self.d.can_dot(aa + ab)):
            return None
        if self.sort((fa[0], fb[0])) != (fa[0], fb[0]):
            (ea, aa), (eb, ab) = (eb, ab), (ea, aa)
        return self.d.dot(ea, eb, aa.index(x), ab.index(x))

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

    def op_chunk_across(self, i: Instr):
        """Σ over the state's tile of an input indexed by chunk (loaded per chunk) times the state entering the
        chunk (the on-chip state before this chunk's update), the same for every step of the chunk."""
        x, xax = self.get(i.args[0])
        S = i.attr("state")
        z = self.contract([(x, xax), (self.state_var[S], self.state_axes(S))], ())
        out = self.sort(self.axes_of(i.dims))
        self.bind(i.name, self.reorder(self.hold(z), (), out), out, "<input, state entering the chunk>")

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
        sgt = None  # a signed decay's sign on the target side: through t (after the update) or t-1 (before)
        if a.sigma:
            sg, sgax = self.get(a.sigma)
            sgt = self.bc(sg, sgax, Lax)
            if prev and a.sgn:  # sigma_t / sign(a_t)
                sn, snax = self.get(a.sgn)
                neg = f"{self.bc('valid', (t,), Lax)} & ({self.bc(sn, snax, Lax)} < 0)"
                sgt = self.share(self.d.where(neg, f"-{sgt}", sgt), base("sgt"), "the decay's sign through t-1")
        q = [self.get(f) for f in a.q]
        part = i.attr("part")  # None: the whole value; "state" / "in" / "straddle": one part of it (chunk_ops)
        if part is not None:
            self.check_part(i, a, part, out, Lax)
        coef = "" if a.qcoef == 1.0 else f"{a.qcoef!r} * "
        if part == "straddle":
            self.quadratic_in_chunk(i, a, q, out, L, Lt, Lax, dd, sgt, base, prev, straddle=True)
            self.bind(i.name, f"{coef}{base('straddle')}", out)
            return
        shape = self.sub_shape(i, a, q, out, Lax) if self.d.guarded_subchunks and part is None else None
        if shape is not None:
            with self.guarded_in_chunk(i, a, shape, q, L, Lt, Lax, sgt, base, prev):
                self.exact_in_chunk(i, a, q, out, L, Lt, Lax, dd, sgt, base, prev)
        elif part != "state":
            self.exact_in_chunk(i, a, q, out, L, Lt, Lax, dd, sgt, base, prev)
        if part == "in":  # no state part: this kernel need not hold the state's tile for it
            self.bind(i.name, f"{coef}{base('in')}", out)
            return
        E = self.d.UNARY["exp"].format(Lt)
        if a.sigma:
            E += f" * {sgt}"
        Ev = self.share(E, base("E"), "decay from the chunk's start")
        # per-row scales (the decay from the chunk's start, dt: axes within the out's) multiply the contraction's
        # result in fp32, not its operand: readouts that differ only in them share one matmul with the state
        # (Mamba2's adjoint: d x = dt * (B·G) and d dt = Σ x * (B·G))
        ops = q + [(Ev, Lax)]
        scales = [o for o in ops if set(o[1]) <= set(out)]
        st = self.contract([o for o in ops if o not in scales] + [(self.state_var[S], self.state_axes(S))], out)
        st = " * ".join([f"({st})" if scales else st] + [self.bc(e, ax, out) for e, ax in scales])
        self.w(f"{base('st')} = {st}  # state part")
        if part == "state":
            self.bind(i.name, f"{coef}{base('st')}", out)
        else:
            self.bind(i.name, f"{coef}({base('in')} + {base('st')})", out)

    def check_part(self, i: Instr, a, part: str, out, Lax):
        """A chunk.output `part` the kernel body computes (chunk_ops.part_problem), else a TargetError naming what
        is missing; a straddle's decay has no tile axis and its out is the scan dim alone in the tile (every tile
        dim contracted)."""
        t = self.k.scan
        where = f"kernel targets: chunk.output {i.name} (state {i.attr('state')}) part={part}"
        problem = "needs the chunked quadratic form, got a sequential step" if self.step_mode else \
            part_problem(i, a, self.k.p.instrs)
        if problem:
            raise TargetError(f"{where}: {problem}")
        if part == "straddle" and tuple(Lax) != (t,):
            raise TargetError(f"{where}: needs a scalar positive decay (identity, constant or scalar class, no "
                              f"sign): its decay varies along tile dims {[x for x in Lax if x != t]}")
        if part == "straddle" and tuple(out) != (t,):
            raise TargetError(f"{where}: needs out dims that are the decay's dims and the scan dim, every other dim "
                              f"contracted; out {list(i.dims)} keeps tile dims {[x for x in out if x != t]}")

    def exact_in_chunk(self, i, a, q, out, L, Lt, Lax, dd, sgt, base, prev):
        """The in-chunk part with every exponent a difference L_t - L_s: by sub-chunks, or the [Q, Q, decay] tile."""
        sub = self.sub_plan(i, a, q, out, Lax)
        if sub is not None:
            self.w(f"{base('in')} = {self.sub_in_chunk(i, a, sub, q, L, Lt, sgt, base)}  # in-chunk part")
        else:
            self.quadratic_in_chunk(i, a, q, out, L, Lt, Lax, dd, sgt, base, prev)

    def quadratic_in_chunk(self, i, a, q, out, L, Lt, Lax, dd, sgt, base, prev, straddle=False):
        """Σ_{s<=t} (q_t·u_s) exp(L_t - L_s) through the [Q, Q, decay dims] decay tile (scalar decays; key-wise
        chunks of one sub-chunk). straddle: part=straddle instead (`straddle_pairs`), from the summands M[t, s]."""
        t = self.k.scan
        s_ax = self.sort((t, SRC) + dd)
        diff = f"{self.bc(Lt, Lax, s_ax)} - {self.bc(L, (SRC,) + dd, s_ax)}"
        mask = self.bc(f"({self.d.causal(prev)} & {self.valid(SRC)})", (t, SRC), s_ax)
        bounded = i.attr("bounded", False)
        D = self.d.UNARY["exp"].format(self.clamped(self.d.where(mask, diff, "-1e30"), bounded))
        if a.sigma:
            sg, sgax = self.get(a.sigma)
            D += f" * {self.bc(sgt, Lax, s_ax)} * {self.bc(sg, (SRC,) + dd, s_ax)}"
        Dv = self.share(D, base("D"), f"decay from source s to target t, masked s {'<' if prev else '<='} t before "
                        f"exp" + (", exponent clamped to <= 0 (|a| <= 1 proven)" if bounded else ""))
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
            e = self.contract(ops, (t, SRC) if straddle else out, select=None if straddle else causal)
            parts.append(e if coef == 1.0 else f"{coef!r} * {e}")
        if straddle:
            return self.straddle_pairs(parts, base)
        self.w(f"{base('in')} = {' + '.join(parts) or '0.0'}  # in-chunk part")

    def straddle_pairs(self, parts, base):
        """part=straddle (check_part: a scalar decay, out over t only): W_i = Σ_{t >= i, t valid} Σ_{s < i} M[t, s]
        from the in-chunk summands M = Σ parts ([t, s] tiles, selected s <= t, both steps valid, after every
        factor). A pair (s, t) counts for s < i <= t, i.e. [s < i] - [t < i]: W_i = Σ_{j < i} (colsum_j - rowsum_j),
        two reductions of the tile and an exclusive cumsum (no matmul, no [Q, Q] constant). The subtraction cancels
        only in-chunk pairs, each the same fp32 number on both sides."""
        D, t = self.d, self.k.scan
        ts = (t, SRC)
        mask = f"({D.causal(False)} & {self.valid(SRC)}) & {self.bc('valid', (t,), ts)}"
        M = base("M")
        self.w(f"{M} = {D.where(mask, ' + '.join(parts) or '0.0', '0.0')}  # in-chunk summands M[t, s], s <= t, "
               f"both steps valid")
        d = base("d")
        self.w(f"{d} = {D.sum(M, 0)} - {D.sum(M, 1)}  # per step j: pairs from j (column) minus pairs into j (row)")
        self.w(f"{base('straddle')} = {D.cumsum0(d, 1)} - {d}  # Σ_(j < i): the pairs s < i <= t")

    # ---- sub-chunks (key-wise / value-wise decay) ------------------------------------------------------------
    def sub_plan(self, i, a, q, out, Lax):
        """How to run the in-chunk part by sub-chunks of C = `sub` steps, or None for the [Q, Q, decay] form: one
        contracted tile axis K and one kept axis V besides t; the decay along K (key-wise) or V (value-wise); every
        query factor over (t, K), every update factor over (s, K) or (s, V)."""
        C, Q = i.attr("sub"), self.k.Q
        if not C or C >= Q:
            return None
        shape = self.sub_shape(i, a, q, out, Lax)
        return None if shape is None else dict(shape, C=C, n=Q // C)

    def sub_shape(self, i, a, q, out, Lax):
        """The in-chunk part's shape when it has the key-/value-wise block form (else None): K, V, joint (the decay
        along K: key-wise), and per update product its coefficient, (s, K) factors and (s, V) factors."""
        t = self.k.scan
        if self.step_mode:
            return None
        dd = tuple(x for x in Lax if x != t)
        O = tuple(x for x in out if x != t)
        every = set().union(*(set(ax) for _, ax in q), *(set(self.axes_of(self.by[f].dims)) for p in a.u for f in p),
                            set(self.state_axes(i.attr("state"))))
        K = tuple(sorted(every - set(out) - {t, SRC}))
        if len(O) != 1 or len(K) != 1 or len(dd) != 1 or t not in out or dd[0] not in (K[0], O[0]):
            return None
        if any(not set(ax) <= {t, K[0]} for _, ax in q) or not any(K[0] in ax for _, ax in q):
            return None
        prods = []
        for coef, prod in zip(a.ucoef, a.u):
            src = [self.as_source(f) for f in prod]
            uk = [(e, ax) for e, ax in src if set(ax) <= {SRC, K[0]}]
            ur = [(e, ax) for e, ax in src if (e, ax) not in uk and set(ax) <= {SRC, O[0]}]
            if len(uk) + len(ur) != len(src) or not any(K[0] in ax for _, ax in uk) or \
                    not any(O[0] in ax for _, ax in ur):
                return None
            prods.append((coef, uk, ur))
        return dict(K=K[0], V=O[0], joint=dd[0] == K[0], prods=prods)

    @contextlib.contextmanager
    def guarded_in_chunk(self, i, a, shape, q, L, Lt, Lax, sgt, base, prev):
        """Key-/value-wise in-chunk part as plain matmuls, exact to rounding while every exponent it takes stays
        within +-GUARD_EXP (checked per chunk at run time); the body of the `with` (the exact form) runs otherwise.

        Each row t takes the reference r = L at the step before its sub-chunk j (C steps). Then
        exp(L_t - L_s) = exp(L_t - r_j) exp(r_j - L_s) for every source s up to the end of sub-chunk j, so the
        scores of the rows of sub-chunk j are one [Q, K] x [K, Q] matmul of (q ⊙ exp(L - r)) with
        (k ⊙ exp(r_j - L_s)) (key-wise), or the values are scaled instead (value-wise): Q/C matmuls per chunk on
        tensor cores, no [Q, Q, K] or [C, C, K] tile. Within a sub-chunk exp(r_j - L_s) grows (|a| < 1): the guard
        bounds it, and a chunk whose decay spans more than GUARD_EXP inside a sub-chunk takes the exact form."""
        D, w, t = self.d, self.w, self.k.scan
        assert Lax[0] == t and len(Lax) == 2, Lax
        C = i.attr("sub") or self.k.Q
        K, V, joint = shape["K"], shape["V"], shape["joint"]
        loc = functools.partial(self.pn.local, i.name)
        exp = D.UNARY["exp"].format
        DB = self.block(Lax[1])
        pos = self.bc(D.positions(), (t,), Lax)
        j = loc("j")
        end = f"({j} * {C} + {C - 1})"

        rrow, hi, rj = loc("rrow"), loc("hi"), loc("r")
        # in a loop over sub-chunks j: r_j (L at the step before sub-chunk j; 0 for the first, L starts at 0),
        # the rows of sub-chunk j, and the source exponents r_j - L_s up to the end of sub-chunk j
        ref = D.sum(D.where(f"{pos} == {j} * {C} - 1", L, "0.0"), 0)
        in_j = f"{pos} // {C} == {j}"
        src_e = D.where(f"{pos} <= {end}", f"{rj}[None, :] - {L}", "-1e30")
        w(f"# sub-chunks of {C} steps as matmuls: each row's exponents from the step before its sub-chunk, both "
          f"factors within exp(+-{D.GUARD_EXP:g}) (checked here), else the exact form below")
        w(f"{rrow} = {D.broadcast_to('0.0', ['Q', DB])}")
        mx = D.BINARY["max"].format
        w(f"{hi} = {D.max(D.max(rrow, 1), 0)}  # the largest exponent taken (0 so far)")
        with w.block(f"for {j} in {D.static_range(f'Q // {C}')}:"):
            w(f"{rj} = {ref}")
            w(f"{rrow} += {D.where(in_j, f'{rj}[None, :]', '0.0')}")
            w(f"{hi} = {mx(hi, D.max(D.max(src_e, 0), 0))}  # sources up to the end of sub-chunk {j}")
        w(f"{hi} = {mx(hi, D.max(D.max(f'{Lt} - {rrow}', 1), 0))}  # targets")
        ib = base("in")
        with w.block(f"if {hi} <= {D.GUARD_EXP!r}:"):
            tgt = f"{exp(f'{Lt} - {rrow}')}" + (f" * {sgt}" if sgt else "")
            sgs = f" * {self.bc(*self.get(a.sigma), Lax)}" if a.sigma else ""
            causal = f"({D.causal(prev)} & {self.valid(SRC)})"
            parts = []
            qt = self.tile_of(q, (t, K))
            if D.needs_mask(K) and not any(e in self.zero_padded and K in ax for e, ax in q):
                qt = self.hold(D.where(self.mask(K), qt, "0.0"))  # padded K entries must not reach the sums
            for coef, uk, ur in shape["prods"]:
                ukt, urt = self.tile_of(uk, (SRC, K)), self.tile_of(ur, (SRC, V))
                acc = loc("acc")
                src = exp(src_e) + sgs
                if joint:  # key-wise: the decay enters the scores
                    qx = self.hold(f"{qt} * {tgt}")
                    w(f"{acc} = {D.broadcast_to('0.0', ['Q', 'Q'])}")
                    with w.block(f"for {j} in {D.static_range(f'Q // {C}')}:"):
                        w(f"{rj} = {ref}")
                        rows = D.where(in_j, qx, "0.0")
                        w(f"{acc} += {D.dot(rows, f'{ukt} * {src}', 1, 1)}")
                    A = self.hold(D.where(causal, acc, "0.0"))
                    e = self.hold(D.dot(A, urt, 1, 0))
                else:  # value-wise: the decay enters with the values
                    A = self.hold(D.where(causal, D.dot(qt, ukt, 1, 1), "0.0"))
                    w(f"{acc} = {D.broadcast_to('0.0', ['Q', self.block(V)])}")
                    with w.block(f"for {j} in {D.static_range(f'Q // {C}')}:"):
                        w(f"{rj} = {ref}")
                        rows = D.where(in_j, A, "0.0")
                        w(f"{acc} += {D.dot(rows, f'{urt} * {src}', 1, 0)}")
                    e = self.hold(f"{acc} * {tgt}")
                parts.append(e if coef == 1.0 else f"{coef!r} * {e}")
            w(f"{ib} = {' + '.join(parts) or '0.0'}  # in-chunk part")
        with w.block("else:"):
            w("# the exact form (a decay spanning more than the guard inside a sub-chunk)")
            yield

    def tile_of(self, ops, axes) -> str:
        """The product of factors (expression, axes) as one tile over exactly `axes` (broadcast where needed)."""
        union = self.sort(set().union(*(set(ax) for _, ax in ops)))
        e = " * ".join(self.bc(x, ax, union) if ax else x for x, ax in ops)
        return self.hold(self.reorder(e, union, axes) if tuple(union) != tuple(axes) else e)

    def sub_in_chunk(self, i, a, sub, q, L, Lt, sgt, base) -> str:
        """The in-chunk part by sub-chunks of C steps (n = Q/C of them), tiles [n, C, .] from reshapes. A target t in
        sub-chunk i and a source s before it: exp(L_t - L_s) = exp(L_t - r_i) exp(r_i - L_s) with r_i = L at the step
        before sub-chunk i, both exponents <= 0 for |a| <= 1, so the factors go into the operands of one batched
        matmul per sub-chunk ([C, K] x [K, Q], or [C, Q] x [Q, V] value-wise). The diagonal blocks (s in t's own
        sub-chunk) are computed directly, [n, C, C, decay] elementwise: never a [Q, Q, K] tile."""
        D, w, t = self.d, self.w, self.k.scan
        C, n, K, V = sub["C"], sub["n"], sub["K"], sub["V"]
        prev = i.attr("when") == "prev"
        bounded = i.attr("bounded", False)
        Q = "Q"
        dd = K if sub["joint"] else V
        DB, KB, VB = self.block(dd), self.block(K), self.block(V)
        loc = functools.partial(self.pn.local, i.name)
        exp = D.UNARY["exp"].format
        w(f"# sub-chunks of {C} steps (sub={C}): blocks between sub-chunks as batched matmuls, exponents from the step "
          f"before each target sub-chunk (both <= 0 for |a| <= 1); diagonal blocks [{C}, {C}] direct")
        L3, Lt3 = loc("L3"), loc("Lt3")
        w(f"{L3} = {D.reshape(L, (n, C, DB))}")
        if Lt != L:
            w(f"{Lt3} = {D.reshape(Lt, (n, C, DB))}")
        else:
            Lt3 = L3
        ell = self.pn.local(a.L, "ell")  # the cumsum's masked per-step log-decay
        first = f"{D.iota((n, C, DB), 1)} == 0"
        r = loc("ref")
        w(f"{r} = {D.sum(D.where(first, f'{L3} - {D.reshape(ell, (n, C, DB))}', '0.0'), 1)}  # r_i: L at the step "
          f"before sub-chunk i")
        sig3 = sigs3 = None
        if a.sigma:
            sg, _ = self.get(a.sigma)
            sig3, sigs3 = loc("sig3"), loc("sigs3")
            w(f"{sig3} = {D.reshape(sgt, (n, C, DB))}  # the decay's sign at the target")
            w(f"{sigs3} = {D.reshape(sg, (n, C, DB))}  # and at the source")
        tgt = loc("tgt")
        w(f"{tgt} = {exp(self.clamped(f'{Lt3} - {r}[:, None, :]', bounded))}"
          f"{' * ' + sig3 if sig3 else ''}  # exp(L_t - r_i), t in sub-chunk i")
        before = loc("before")
        w(f"{before} = {D.iota((n, Q, DB), 1)} < {D.iota((n, Q, DB), 0)} * {C}  # source s before sub-chunk i")
        src = loc("src")
        sgs = f" * {self.get(a.sigma)[0]}[None, :, :]" if a.sigma else ""
        w(f"{src} = {exp(self.clamped(D.where(before, f'{r}[:, None, :] - {L}[None, :, :]', '-1e30'), bounded))}"
          f"{sgs}  # exp(r_i - L_s), s before sub-chunk i (0 for the others)")
        cmp = ">" if prev else ">="
        dg = loc("diag")
        dmask = f"{D.iota((n, C, C, DB), 1)} {cmp} {D.iota((n, C, C, DB), 2)}"
        dsig = f" * {sig3}[:, :, None, :] * {sigs3}[:, None, :, :]" if sig3 else ""
        w(f"{dg} = {exp(self.clamped(D.where(dmask, f'{Lt3}[:, :, None, :] - {L3}[:, None, :, :]', '-1e30'), bounded))}"
          f"{dsig}  # exp(L_t - L_s), s {'<' if prev else '<='} t in one sub-chunk")
        bmask = f"{D.iota((n, C, C), 1)} {cmp} {D.iota((n, C, C), 2)}"
        qt = self.tile_of(q, (t, K))
        if D.needs_mask(K) and not any(e in self.zero_padded and K in ax for e, ax in q):
            qt = self.hold(D.where(self.mask(K), qt, "0.0"))  # padded K entries must not reach the sums
        q3 = self.hold(D.reshape(qt, (n, C, KB)))
        parts = []
        for coef, uk, ur in sub["prods"]:
            ukt = self.tile_of(uk, (SRC, K))
            urt = self.tile_of(ur, (SRC, V))
            uk3, ur3 = self.hold(D.reshape(ukt, (n, C, KB))), self.hold(D.reshape(urt, (n, C, VB)))
            if sub["joint"]:  # key-wise: the decay enters the scores
                srck = self.hold(D.where(before, f"{ukt}[None, :, :] * {src}", "0.0"))  # select after the product
                A3 = self.hold(D.bdot(f"{q3} * {tgt}", srck, 2, 2))  # [n, C, Q]
                off = D.bdot(A3, D.broadcast_to(f"{urt}[None, :, :]", (str(n), Q, VB)), 2, 1)
                B = self.hold(D.sum(f"{dg} * {q3}[:, :, None, :] * {uk3}[:, None, :, :]", 3))
                B = self.hold(D.where(bmask, B, "0.0"))
                e = f"{off} + {D.bdot(B, ur3, 2, 1)}"
            else:  # value-wise: the decay enters with the values
                A = self.hold(D.dot(qt, ukt, 1, 1))  # [Q, Q] scores, no decay
                A = self.hold(D.where(f"{D.iota((Q, Q), 0)} {cmp} {D.iota((Q, Q), 1)}", A, "0.0"))
                srcv = self.hold(D.where(before, f"{urt}[None, :, :] * {src}", "0.0"))
                off = f"{D.bdot(D.reshape(A, (n, C, Q)), srcv, 2, 1)} * {tgt}"
                B = self.hold(D.bdot(q3, uk3, 2, 2))
                B = self.hold(D.where(bmask, B, "0.0"))
                e = f"{off} + {D.sum(f'{dg} * {B}[:, :, :, None] * {ur3}[:, None, :, :]', 2)}"
            e = D.reshape(self.hold(e), (Q, VB))
            parts.append(e if coef == 1.0 else f"{coef!r} * {e}")
        return " + ".join(parts)

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
