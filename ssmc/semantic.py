"""Semantic check of a parsed spec and lowering to IR (one step of the recurrence, in statement order).

Shape rules: values carry named dims; arithmetic broadcasts by name; `a · b` sums every operand dim that the
statement's target shape lacks; a value indexed by a group dim g is read at the dim it maps to (head i reads
group i // (h/g)) wherever it meets that dim, through an explicit `expand` instruction.
"""
from __future__ import annotations

import math

import networkx as nx

from . import ast
from .errors import SpecError
from .ir import Array, Instr, Namer, Program, make
from .window import window_dim, window_state_name

UNARY = {"exp", "log", "softplus", "silu", "sigmoid", "tanh", "sqrt", "rsqrt", "abs"}
BUILTINS = sorted(UNARY | {"min", "max", "clamp", "sum", "mean", "rmsnorm", "outer", "dot", "conv"})
# positional operands of each builtin (the expressions lowered before the call itself)
ARITY = {**{f: 1 for f in UNARY}, "min": 2, "max": 2, "clamp": 3, "outer": 2, "dot": 2, "sum": 1, "mean": 1,
         "rmsnorm": 1, "conv": 2}


class _Lower:
    def __init__(self, spec: ast.Spec):
        self.spec = spec
        self.instrs: list[Instr] = []
        self.namer = Namer(())
        self.state_dep: set[str] = set()  # values that read an SSM state
        self.windows: dict[str, tuple] = {}  # conv window state -> (x value, weight's window dim, leaf, span)
        self.lowered: dict[int, Instr] = {}  # id(expression node) -> its value, within one statement

    def err(self, msg, span):
        return SpecError(msg, span, self.spec.source, self.spec.filename)

    # ---- declarations --------------------------------------------------------------------------------
    def declarations(self):
        s = self.spec
        self.dims: list[str] = []
        for d in s.dims:
            if d.name in self.dims:
                raise self.err(f"dim '{d.name}' is declared twice", d.span)
            self.dims.append(d.name)
        if not self.dims:
            raise self.err("no dims declared; add e.g. `dims b, t, h`", s.span)
        if s.scan is None:
            raise self.err(f"ssm '{s.name}' has no scan dim; add `scan t` naming the dim the recurrence runs along",
                           s.span)
        self.need_dim(s.scan)
        self.scan = s.scan.name
        self.group_of: dict[str, str] = {}  # g -> h
        for g, h, span in s.groups:
            self.need_dim(g, "group")
            self.need_dim(h, "group")
            if g.name == h.name or g.name == self.scan or h.name == self.scan:
                raise self.err("a group maps a group dim to a different, non-scan dim (e.g. `group g -> h`)", span)
            if g.name in self.group_of:
                raise self.err(f"group dim '{g.name}' is mapped twice", g.span)
            self.group_of[g.name] = h.name
        self.arrays: dict[str, ast.ArrayDecl] = {}
        for a in s.arrays:
            if a.name in self.arrays:
                prev = self.arrays[a.name]
                raise self.err(f"'{a.name}' is already declared as `{prev.kind}` at {prev.span}", a.span)
            names = [d.name for d in a.dims]
            for d in a.dims:
                self.need_dim(d, f"array '{a.name}'")
            if len(set(names)) != len(names):
                raise self.err(f"array '{a.name}' repeats a dim", a.span)
            for g, h in self.group_of.items():
                if g in names and h in names:
                    raise self.err(f"array '{a.name}' is indexed by both group dim '{g}' and '{h}', which it maps to",
                                   a.span)
            if a.kind == "state" and self.scan in names:
                raise self.err(f"state '{a.name}' must not have the scan dim '{self.scan}': it is carried across "
                               f"steps", a.span)
            if a.kind == "out" and self.scan not in names:
                raise self.err(f"out '{a.name}' must have the scan dim '{self.scan}' (one value per step)", a.span)
            self.arrays[a.name] = a
        if not s.decls("out"):
            raise self.err(f"ssm '{s.name}' declares no `out`", s.span)
        if not any(self.scan in (d.name for d in a.dims) for a in s.decls("in")):
            raise self.err(f"no `in` array has the scan dim '{self.scan}', so the sequence length is unknown",
                           s.scan.span)
        self.canon = canonical_order(self.dims, s.arrays)

    def need_dim(self, d: ast.Name, what: str = ""):
        if d.name not in self.dims:
            where = f" in {what}" if what else ""
            raise self.err(f"dim '{d.name}'{where} is not declared; declared dims: {', '.join(self.dims)}", d.span)

    def order(self, dims) -> tuple[str, ...]:
        s = set(dims)
        return tuple(d for d in self.canon if d in s)

    # ---- body ----------------------------------------------------------------------------------------
    def emit(self, op, args=(), dims=(), span=None, name=None, **attrs) -> Instr:
        i = make(name or self.namer(), op, args, self.order(dims), span, **attrs)
        self.instrs.append(i)
        if op == "state" or any(a in self.state_dep for a in i.args):
            self.state_dep.add(i.name)
        return i

    def body(self):
        s = self.spec
        self.env: dict[str, Instr] = {}
        self.defined_at: dict[str, ast.Assign] = {}
        for a in s.decls("in"):
            self.env[a.name] = self.emit("input", (), [d.name for d in a.dims], a.span, name=self.namer(a.name),
                                         array=a.name)
        for a in s.decls("state"):
            self.env[a.name] = self.emit("state", (), [d.name for d in a.dims], a.span,
                                         name=self.namer(a.name + ".prev"), state=a.name)
        for st in s.body:
            self.statement(st)
        for a in s.decls("state"):
            if a.name not in self.defined_at:
                raise self.err(f"state '{a.name}' is never assigned; add a statement `{a.name} = ...` that updates "
                               f"it each step", a.span)
        for a in s.decls("out"):
            if a.name not in self.defined_at:
                raise self.err(f"out '{a.name}' is never assigned; add a statement `{a.name} = ...`", a.span)
        if not s.body:
            raise self.err(f"ssm '{s.name}' has no statements", s.span)
        # a state its update never reads (`S = 2*k`) is still carried: it is an argument of the kernel and the
        # update is what it holds after each step
        read = {a for i in self.instrs for a in i.args}
        keep = {i.name for i in self.instrs if i.op == "state" and i.name not in read}
        # and the kernel needs one input along the scan dim (the sequence length), read or not
        timed = [i for i in self.instrs if i.op == "input" and self.scan in i.dims]
        if not any(i.name in read for i in timed):
            keep.add(timed[0].name)
        self.instrs = [i.with_attrs(keep=True) if i.name in keep else i for i in self.instrs]

    def statement(self, st: ast.Assign):
        decl = self.arrays.get(st.target)
        if st.target in self.defined_at:
            prev = self.defined_at[st.target]
            raise self.err(f"'{st.target}' is already assigned at {prev.span}; each name is assigned once per step",
                           st.target_span)
        if decl is not None and decl.kind == "in":
            raise self.err(f"cannot assign to '{st.target}': it is declared `in` (inputs are read-only)",
                           st.target_span)
        if decl is not None and st.dims is not None:
            if [d.name for d in st.dims] != [d.name for d in decl.dims]:
                raise self.err(f"'{st.target}' is declared [{','.join(d.name for d in decl.dims)}] at {decl.span}; "
                               f"the statement gives it a different shape", st.target_span)
        if decl is not None:
            target = [d.name for d in decl.dims]
        elif st.dims is not None:
            for d in st.dims:
                self.need_dim(d, f"the shape of '{st.target}'")
            target = [d.name for d in st.dims]
        else:
            target = None
        # A state is assigned once per step: its target shape is the state's dims plus the scan dim.
        ctx = set(target) | ({self.scan} if decl is not None and decl.kind == "state" else set()) \
            if target is not None else None
        self.stmt, self.ctx, self.target_dims = st, ctx, target
        self.lowered.clear()
        v = self.expr(st.expr)
        if ctx is not None:
            extra = set(v.dims) - ctx
            if extra:
                shown = "[" + ",".join(sorted(ctx, key=self.dims.index)) + "]"
                raise self.err(f"the right side has dims [{','.join(v.dims)}] but '{st.target}' is {shown}: dim(s) "
                               f"{', '.join(sorted(extra, key=self.dims.index))} would remain; contract them with · "
                               f"or sum(..., over=[...])", st.expr.span)
            v = self.expand_to(v, ctx, st.expr.span)
        if decl is not None and decl.kind == "state":
            v = self.rename(v, st.target + ".new")
            self.emit("update", (v.name,), v.dims, st.span, name=f"update.{st.target}", state=st.target)
        elif decl is not None and decl.kind == "out":
            v = self.rename(v, st.target)
            self.emit("out", (v.name,), v.dims, st.span, name=f"out.{st.target}", out=st.target)
        else:
            v = self.rename(v, st.target)
        self.env[st.target] = v
        self.defined_at[st.target] = st

    def rename(self, v: Instr, hint: str) -> Instr:
        """Give the statement's top instruction the spec's name (if it is a fresh temporary of this statement)."""
        if v.op in ("input", "state", "const") or not v.name[1:].isdigit() or self.instrs[-1] is not v:
            return v
        new = make(self.namer(hint), v.op, v.args, v.dims, v.span, **dict(v.attrs))
        self.instrs[-1] = new
        if v.name in self.state_dep:
            self.state_dep.add(new.name)
        return new

    # ---- expressions ---------------------------------------------------------------------------------
    def expand_to(self, v: Instr, ctx, span) -> Instr:
        """Read a group-indexed value at the dim its group maps to, when the context has that dim."""
        for g, h in self.group_of.items():
            if g in v.dims and h in ctx:
                dims = [h if d == g else d for d in v.dims]
                v = self.emit("expand", (v.name,), dims, span, group=g, to=h)
        return v

    def unify(self, vals, span):
        dims = set().union(*(v.dims for v in vals))
        return [self.expand_to(v, dims, span) for v in vals]

    def expr(self, e) -> Instr:
        """Lower an expression. Its operands are lowered first, deepest first, by an explicit walk, so the
        recursive cases below find them done: a sum of thousands of terms or a deep nest needs no deep stack."""
        done = self.lowered.get(id(e))
        if done is not None:
            return done
        order, stack = [], [(e, False)]
        while stack:
            node, ready = stack.pop()
            if ready:
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((c, False) for c in reversed(_operands(node)) if id(c) not in self.lowered)
        for node in order:
            if id(node) not in self.lowered:
                self.lowered[id(node)] = self.lower_node(node)
        return self.lowered[id(e)]

    def lower_node(self, e) -> Instr:
        if isinstance(e, ast.Num):
            if not math.isfinite(e.value):
                raise self.err("number out of range: it overflows a 64-bit float (at most about 1.8e308)", e.span)
            return self.emit("const", (), (), e.span, value=float(e.value))
        if isinstance(e, ast.Var):
            return self.var(e)
        if isinstance(e, ast.Neg):
            v = self.expr(e.operand)
            return self.emit("neg", (v.name,), v.dims, e.span)
        if isinstance(e, ast.BinOp):
            a, b = self.expr(e.left), self.expr(e.right)
            if e.op == "dot":
                return self.contract([a, b], e.span, [e.left, e.right])
            if e.op == "outer":
                return self.outer(a, b, e.span)
            a, b = self.unify([a, b], e.span)
            return self.emit(e.op, (a.name, b.name), set(a.dims) | set(b.dims), e.span)
        if isinstance(e, ast.Call):
            return self.call(e)
        raise TypeError(e)  # pragma: no cover

    def var(self, e: ast.Var) -> Instr:
        if e.name in self.env:
            return self.env[e.name]
        if e.name in self.arrays:  # an out/state/intermediate read before it is assigned
            a = self.arrays[e.name]
            raise self.err(f"'{e.name}' (declared `{a.kind}` at {a.span}) is read before it is assigned", e.span)
        hint = f"; '{e.name}' is a dim, not a value" if e.name in self.dims else ""
        known = sorted(self.env)
        raise self.err(f"undeclared name '{e.name}'{hint}; known values: {', '.join(known)}", e.span)

    def outer(self, a: Instr, b: Instr, span) -> Instr:
        a, b = self.unify([a, b], span)
        return self.emit("mul", (a.name, b.name), set(a.dims) | set(b.dims), span, outer=True)

    def contract(self, vals, span, exprs=()) -> Instr:
        if self.ctx is None:
            raise self.err(f"'{self.stmt.target}' uses · so it must declare its shape, e.g. "
                           f"`{self.stmt.target}[{','.join(self.dims[:2])}] = ...`", self.stmt.target_span)
        vals = [self.expand_to(v, self.ctx, span) for v in vals]
        vals = self.unify(vals, span)
        dims = set().union(*(v.dims for v in vals))
        keep = dims & self.ctx
        if self.scan in dims - keep:
            raise self.err(f"· would sum over the scan dim '{self.scan}'; a statement works on one step at a time",
                           span)
        self.one_sided(vals, exprs, dims - keep)
        return self.emit("contract", [v.name for v in vals], keep, span)

    def one_sided(self, vals, exprs, summed):
        """`·` contracts dims the operands share; a summed dim only one operand has is almost always a shape slip
        (a transition A[h,dk,dk2] against S[..,dk,..] computes rowsum(A)*S; an out missing a state dim sums it)
        that would silently change the meaning, so it is an error unless written as an explicit sum."""
        def show(j):  # a named operand with its declared dims, else the operand's dims
            e = exprs[j] if j < len(exprs) else None
            if isinstance(e, ast.Var):
                a = self.arrays.get(e.name)
                dims = [d.name for d in a.dims] if a is not None else vals[j].dims
                return f"'{e.name}' [{','.join(dims)}]", e.name
            return f"the operand [{','.join(vals[j].dims)}]", "..."

        for d in sorted(summed, key=self.dims.index):
            having = [j for j, v in enumerate(vals) if d in v.dims]
            if len(having) != 1:
                continue
            j = having[0]
            mine, arg = show(j)
            others = ", ".join(show(i)[0] for i in range(len(vals)) if i != j)
            span = exprs[j].span if j < len(exprs) else self.stmt.expr.span
            raise self.err(f"· sums dim '{d}', but only {mine} has it (not {others}), so the sum would run over that "
                           f"operand alone; write sum({arg}, over=[{d}]) if that is meant, or keep '{d}' in the shape "
                           f"of '{self.stmt.target}' [{','.join(self.target_dims)}]", span)

    def call(self, e: ast.Call) -> Instr:
        f, n = e.func, len(e.args)
        kw = {k: (v, s) for k, v, s in e.kwargs}

        def need(count, names=()):
            if n != count:
                raise self.err(f"{f}() takes {count} positional argument{'s' if count != 1 else ''}, got {n}", e.span)
            for k, (_, s) in kw.items():
                if k not in names:
                    allowed = f"; it accepts {', '.join(names)}" if names else ""
                    raise self.err(f"{f}() got an unexpected keyword argument '{k}'{allowed}", s)

        if f in UNARY:
            need(1)
            v = self.expr(e.args[0])
            return self.emit(f, (v.name,), v.dims, e.span)
        if f in ("min", "max"):
            need(2)
            a, b = self.unify([self.expr(x) for x in e.args], e.span)
            return self.emit(f, (a.name, b.name), set(a.dims) | set(b.dims), e.span)
        if f == "clamp":
            need(3)
            vs = self.unify([self.expr(x) for x in e.args], e.span)
            return self.emit("clamp", [v.name for v in vs], set().union(*(v.dims for v in vs)), e.span)
        if f == "outer":
            need(2)
            return self.outer(self.expr(e.args[0]), self.expr(e.args[1]), e.span)
        if f == "dot":
            need(2)
            return self.contract([self.expr(x) for x in e.args], e.span, e.args)
        if f in ("sum", "mean"):
            need(1, ("over",))
            v = self.expr(e.args[0])
            over = self.dimlist(kw, "over", f, e.span, v)
            return self.emit("reduce", (v.name,), set(v.dims) - set(over), e.span, kind=f, over=over)
        if f == "rmsnorm":
            need(1, ("over", "group", "eps"))
            v = self.expr(e.args[0])
            over = self.dimlist(kw, "over", f, e.span, v)
            group = None
            if "group" in kw:
                gexpr, gspan = kw["group"]
                if not isinstance(gexpr, ast.Var) or gexpr.name not in self.group_of:
                    raise self.err(f"rmsnorm(group=...) must name a group dim declared with `group`; groups: "
                                   f"{', '.join(self.group_of) or 'none'}", gspan)
                group = gexpr.name
                if self.group_of[group] not in v.dims:
                    raise self.err(f"rmsnorm(group={group}) needs its operand to have dim '{self.group_of[group]}'",
                                   gspan)
            eps = 1e-5
            if "eps" in kw:
                ev, es = kw["eps"]
                if not isinstance(ev, ast.Num):
                    raise self.err("rmsnorm(eps=...) must be a number", es)
                eps = float(ev.value)
            return self.emit("rmsnorm", (v.name,), v.dims, e.span, over=over, group=group, eps=eps)
        if f == "conv":
            need(2, ("over",))
            return self.conv(e, kw)
        raise self.err(f"unknown function '{f}'; builtins: {', '.join(BUILTINS)}", e.span)

    def conv(self, e: ast.Call, kw) -> Instr:
        """conv(x, w, over=t): causal depthwise convolution along the scan dim,
        y[t] = sum_j w[..., j] * x[t - (K-1) + j] (j = K-1 is the current step), with the K-1 inputs before the
        first step taken from the window state `<x>_win` (zeros unless given). w carries x's channel dims (or
        some of them) and one dim x lacks: the window dim k, of size K."""
        if "over" not in kw:
            raise self.err(f"conv() needs over={self.scan} (it convolves along the scan dim)", e.span)
        over, ospan = kw["over"]
        if not isinstance(over, ast.Var) or over.name not in self.dims:
            raise self.err(f"conv(over=...) must name the scan dim '{self.scan}'", ospan)
        if over.name != self.scan:
            raise self.err(f"conv() runs along the scan dim '{self.scan}' only, not '{over.name}'", ospan)
        xe, we = e.args
        x, w = self.expr(xe), self.expr(we)
        if self.scan not in x.dims:
            raise self.err(f"conv()'s input has dims [{','.join(x.dims)}], without the scan dim '{self.scan}'",
                           xe.span)
        for v, ve, what in ((x, xe, "input"), (w, we, "weight")):
            if v.name in self.state_dep:
                raise self.err(f"conv()'s {what} reads a state; a conv window only holds state-free inputs", ve.span)
        if self.scan in w.dims:
            raise self.err(f"conv()'s weight must not vary along the scan dim '{self.scan}'", we.span)
        extra = [d for d in w.dims if d not in x.dims]
        if len(extra) != 1:
            got = f"it has no dim besides the input's [{','.join(x.dims)}]" if not extra else \
                f"it has {len(extra)} dims the input lacks: {', '.join(extra)}"
            raise self.err(f"conv()'s weight needs exactly one window dim that the input lacks, e.g. w[c,k] for "
                           f"x[b,{self.scan},c]; {got}", we.span)
        k = extra[0]
        if k in self.group_of or k in self.group_of.values():
            raise self.err(f"conv()'s window dim '{k}' must not be a group dim", we.span)
        win = self.window(x, xe, k, e.span)
        y = self.emit("conv", (x.name, w.name, win.name), x.dims, e.span, over=self.scan, k=k)
        return y

    def window(self, x: Instr, xe, k: str, span) -> Instr:
        """The window state of conv input x (shared by convs of the same x with the same window dim)."""
        name = window_state_name(xe.name if isinstance(xe, ast.Var) else self.stmt.target)
        if name in self.windows:
            src, k0, leaf, _ = self.windows[name]
            if src == x.name and k0 == k:
                return leaf
            raise self.err(f"a second conv window named '{name}' (for a different input or window dim); assign "
                           f"the input to its own name first", span)
        if name in self.arrays or name in self.env:
            raise self.err(f"the conv window state would be named '{name}', which is already declared", span)
        wd = window_dim(k)
        if wd not in self.canon:  # the window dim sits where the scan dim is, so windows keep x's layout
            at = self.canon.index(self.scan) + 1
            self.canon = self.canon[:at] + (wd,) + self.canon[at:]
        dims = [wd if d == self.scan else d for d in x.dims]
        leaf = self.emit("window", (), dims, span, name=self.namer(name + ".prev"), state=name, k=k, dim=wd)
        last = self.emit("conv.window", (x.name, leaf.name), dims, span, name=self.namer(name + ".last"), k=k)
        self.emit("final", (last.name,), dims, span, name=f"final.{name}", state=name)
        self.windows[name] = (x.name, k, leaf, span)
        return leaf

    def dimlist(self, kw, key, f, span, v: Instr) -> tuple[str, ...]:
        if key not in kw:
            raise self.err(f"{f}() needs {key}=[dims]", span)
        val, s = kw[key]
        if not isinstance(val, tuple):
            raise self.err(f"{f}({key}=...) takes a list of dims in brackets, e.g. {key}=[p]", s)
        for d in val:
            self.need_dim(d, f"{f}({key}=...)")
            if d.name == self.scan:
                raise self.err(f"{f}() cannot reduce over the scan dim '{self.scan}'", d.span)
            if d.name not in v.dims:
                raise self.err(f"{f}(): its operand has dims [{','.join(v.dims)}], not '{d.name}'", d.span)
        return self.order(d.name for d in val)


def _operands(e) -> tuple:
    """The sub-expressions lowered before `e`, in order (a call's, when it is a builtin with the right count)."""
    if isinstance(e, ast.Neg):
        return (e.operand,)
    if isinstance(e, ast.BinOp):
        return (e.left, e.right)
    if isinstance(e, ast.Call) and ARITY.get(e.func) == len(e.args):
        return tuple(e.args)
    return ()


def canonical_order(dims, arrays) -> tuple[str, ...]:
    """An order of all dims that keeps every declared array's dims in its written order where possible, so arrays
    enter and leave kernels without transposes; ties follow the `dims` line. Falls back to the `dims` line."""
    g = nx.DiGraph()
    g.add_nodes_from(dims)
    for a in arrays:
        names = [d.name for d in a.dims]
        g.add_edges_from(zip(names, names[1:]))
    if not nx.is_directed_acyclic_graph(g):
        return tuple(dims)
    return tuple(nx.lexicographical_topological_sort(g, key=list(dims).index))


def lower(spec: ast.Spec) -> Program:
    """Check a spec and lower it to the step-form IR."""
    lw = _Lower(spec)
    lw.declarations()
    lw.body()
    arr = lambda kind: tuple(Array(a.name, tuple(d.name for d in a.dims), a.span) for a in spec.decls(kind))
    # conv window states follow the declared states
    windows = tuple(Array(n, leaf.dims, span) for n, (_, _, leaf, span) in lw.windows.items())
    return Program(spec.name, lw.canon, lw.scan, tuple(lw.group_of.items()), arr("in"), arr("state") + windows,
                   arr("out"), tuple(lw.instrs), (), spec.source, spec.filename)
