"""XLA target: jax.numpy / lax source from the IR, one visitor method per op.

Chunked programs become the four SSD stages as einsums over chunked views of the scan axis; sequential programs
become a lax.scan over a step function with the state-free prologue hoisted out of it. The generated module is
self-describing (targets/base.py): MODULE_INFO lists the entry's params and results in their declared dims. The
entry takes the arrays as declared, in any float dtype, like the kernel targets' launchers: its first lines cast
them to the compute dtype and move them into the IR's layout (grouped dims split, canonical dim order), its return
moves the results back, inside the traced function where XLA fuses those copies into their neighbours.
"""
from __future__ import annotations

import functools

import jax

from ssmc.errors import TargetError
from ssmc.ir import Instr, Program, union_dims
from ssmc.ops import spellings
from ssmc.passes.chunk import chunk_dim
from ssmc.passes.chunk_ops import STAGE_OPS, decode, part_problem
from ssmc.passes.expand_groups import split_name

from .base import (ACROSS, BASE_OPTIONS, CU_SEQLENS, MODULE_IMPORT, MODULE_NAMES, ModuleInfo, Target, check_chunk_outs,
                   packed_batch_dim)
from .writer import Names, Writer, dim_letters, py_const

UNARY, BINARY = spellings("jnp", 1), spellings("jnp", 2)  # ssmc/ops.py


class XlaTarget(Target):
    name = "xla"
    kernels = False
    float64 = True  # jax.numpy computes in float64 when every input is (with jax_enable_x64)

    def pipeline(self, chunk_size: int | None) -> str:
        # Measured per backend (docs/benchmarks.md): on CPU one sequential walk beats the two-pass chunked scan
        # for elementwise decay (0.65x) and chunk length 64 is best for SSD; on GPUs the chunked walk wins and
        # longer SSD chunks (128) amortise XLA's per-chunk passes better. Key-/value-wise chunks on CPU: 16 steps
        # in sub-chunks of 4 measured fastest (GLA b=1 t=2048 h=4 dk=dv=64; the diagonal blocks' exps dominate).
        cpu = jax.default_backend() == "cpu"
        elem, scalar = ("sequential", 64) if cpu else ("chunked", 128)
        keywise = ",keywise=16,sub=4" if cpu else ""
        return (f"expand-groups{{mode=split}},classify,chunk{{size={chunk_size or 0},elementwise={elem},"
                f"scalar={scalar}{keywise}}},fuse,dce")

    def emit(self, p: Program, pipeline: str = "") -> str:
        return XlaEmitter(p, pipeline).emit()


class XlaEmitter:
    # every identifier the emitted module writes literally (imports, globals, the call's `mm`, the chunked
    # form's sizes, the scan bodies' parameters); everything else comes from the name table
    FIXED = MODULE_NAMES + ("jax", "jnp", "lax", "rt", "mm", "out_dtype", "across", "cu_seqlens", "pk", "ew", "sizes",
                            "T", "Q", "Tp", "nc",
                            "valid", "step", "carry", "xs", "S", "inp", "a", "s", "y_t")

    def __init__(self, p: Program, pipeline: str):
        self.p, self.pipeline = p, pipeline
        self.by = p.by_name()
        self.w = Writer()
        self.pn = Names(p.instrs, self.FIXED)
        used = set().union(*(i.dims for i in p.instrs))  # only dims some value has need an einsum letter
        self.letter = dim_letters([d for d in p.dims if d in used])
        self.scan = p.scan
        self.cd = chunk_dim(p.scan)
        self.chunked = any(i.op in STAGE_OPS for i in p.instrs)
        self.Q = next((i.attr("chunk") for i in p.instrs if i.op == "chunk.cumsum"), None)
        self.stored_chunked: set[str] = set()  # values kept as [..., nc, Q, ...] (cumulative decays)
        self.chunk_decay: dict[str, str] = {}
        self.local_dims: dict[str, tuple] = {}  # inside a scan body: per-step dims (scan dim dropped)
        # matmul operand dtype expression: the kernel's `mm`, but float32 inside a step that carries a state, so a
        # recurrence never rounds its state through bfloat16
        self.mm = "mm"
        self.batch = packed_batch_dim(p)  # the dim packed sequences lie along (None: no cu_seqlens option)

    # ---- naming and broadcasting ---------------------------------------------------------------------
    def n(self, ssa: str) -> str:
        i = self.by.get(ssa)
        if i is not None and i.op == "const":
            return py_const(i.attr("value"))
        return self.pn(ssa)

    def dims(self, ssa: str) -> tuple:
        return self.local_dims.get(ssa, self.by[ssa].dims)

    def b(self, ssa: str, to) -> str:
        """`ssa` indexed so it broadcasts against dims `to`."""
        src = self.dims(ssa)
        return self.n(ssa) + (self.b_dims(src, to) if src else "")

    @staticmethod
    def b_dims(src, to, full: bool = False) -> str:
        """Index that makes an array with dims `src` broadcast against dims `to` (numpy aligns trailing axes, so
        leading new axes are left out unless `full`): [b,h] against [b,t,h,p] -> [:, None, :, None]."""
        idx = [":" if d in src else "None" for d in to]
        while idx and idx[0] == "None" and not full:
            idx.pop(0)
        return "" if all(x == ":" for x in idx) else f"[{', '.join(idx)}]"

    def ax(self, dims, d) -> int:
        return list(dims).index(d)

    # ---- module --------------------------------------------------------------------------------------
    def emit(self) -> str:
        p, w = self.p, self.w
        # outs indexed by chunk (dim t#: the state entering each chunk, ...) are chunked values returned as they
        # are; a sequential program has none (an SSMCError)
        chunk = check_chunk_outs(p, "xla")
        w(f"# Generated by ssmc for `ssm {p.name}`, target xla.")
        w(f"# pass pipeline: {self.pipeline}")
        for note in p.notes:
            for ln in note.split("\n"):
                w(f"# {ln.strip().lstrip('# ')}")
        w("import jax")
        w("import jax.numpy as jnp")
        w("from jax import lax")
        w("from ssmc.targets import xla_runtime as rt")
        w(MODULE_IMPORT)
        w()
        leaves = [i for i in p.instrs if i.op in ("input", "state", "window")]
        params = [(self.pn(i.name), i.attr("array") or i.attr("state"), i.op, i.dims) for i in leaves]
        rets = self.returns()
        entry = self.pn.key("entry", p.name)
        decl = {a.name: a.dims for a in p.inputs + p.states + p.outs}
        params += self.shape_params(params, rets, decl)
        info = ModuleInfo.build("xla", entry, [(py, n, op, decl[n]) for py, n, op, _ in params],
                                [(k, name, decl[name]) for k, name, _, _ in rets],
                                BASE_OPTIONS + ((ACROSS,) if self.chunked else ())
                                + ((CU_SEQLENS,) if self.batch else ()), chunk=chunk)
        w(info.source())
        w()
        w()
        w("# mm: the matmul operand dtype (float32, or the inputs' bfloat16/float16; float64 for float64 inputs);")
        w("# accumulation is float32 (float64). out_dtype: the outs' dtype; states come back in the compute dtype.")
        if self.chunked:
            w("# across: None, or the mesh axis this sequence is split over (inside a shard_map, see ssmc.shard): the")
            w("# state entering this device's part then comes from the parts before it")
        if self.batch:
            w(f"# cu_seqlens: None, or int32 offsets of packed sequences along {self.scan} (a batch of one along "
              f"{self.batch}):")
            w(f"# every sequence runs on its own, from its initial state (index along {self.batch} of the states) "
              "to its final state")
        with w.block(f"def {entry}({''.join(a + ', ' for a, *_ in params)}*, mm=jnp.float32, "
                     f"out_dtype=jnp.float32{', across=None' if self.chunked else ''}"
                     f"{', cu_seqlens=None' if self.batch else ''}):"):
            self.entry_prologue(params, rets, decl)
            self.body(rets)
        source = w.text()
        self.pn.verify(source)
        return source

    # ---- the entry's edges: declared layout and dtype in and out ---------------------------------------
    def splits(self) -> dict[str, str]:
        """Grouped dims split into (g, h/g) by expand-groups: {h: g}."""
        return {h: g for g, h in self.p.groups if split_name(h) in self.p.dims}

    def split_dims(self, dims) -> tuple:
        sp = self.splits()
        return tuple(x for d in dims for x in ((sp[d], split_name(d)) if d in sp else (d,)))

    def result_dims(self, dims, declared) -> tuple:
        """A result's IR dims padded with the declared dims it lacks (it is constant along them), canonical order."""
        return self.p.order(set(dims) | set(self.split_dims(declared)))

    def size_of(self, d) -> list[str]:
        """The declared dims whose sizes give IR dim d's size (h/g: h and g)."""
        return next(([h, g] for h, g in self.splits().items() if d == split_name(h)), [d])

    def needed_sizes(self, params, rets, decl) -> list[str]:
        """Declared dims whose sizes the edges need: a group's (to split h), and those of the dims a result is
        broadcast along (it is constant along them)."""
        need = [g for h, g in self.splits().items() if any(h in decl[n] for _, n, _, _ in params)]
        for _, name, _, dims in rets:
            need += [x for d in self.result_dims(dims, decl[name]) if d not in dims for x in self.size_of(d)]
        return list(dict.fromkeys(need))

    def shape_params(self, params, rets, decl) -> list:
        """Arrays the computation dropped (dce) that the entry still takes because only they give the size of a
        dim a result is broadcast along; the entry reads their shape and nothing else (IR dims None)."""
        extra = []
        for d in self.needed_sizes(params, rets, decl):
            if not any(d in decl[n] for _, n, _, _ in params + extra):
                arr = next(a for a in self.p.inputs + self.p.states if d in a.dims)  # the semantic check: one has
                kind = "input" if arr in self.p.inputs else "state"
                extra.append((self.pn.key(("shape", arr.name), arr.name), arr.name, kind, None))
        return extra

    def entry_prologue(self, params, rets, decl):
        w, sp = self.w, self.splits()
        sizes = {}
        for d in self.needed_sizes(params, rets, decl):
            py, n = next((py, n) for py, n, _, _ in params if d in decl[n])
            sizes[d] = f"{py}.shape[{decl[n].index(d)}]"
        self.sizes = "sizes" if sizes else "None"
        layout = ", ".join(f"{h} split into ({g}, {split_name(h)})" for h, g in sp.items())
        w("# the arrays come as declared, in any float dtype: cast to the compute dtype `ew` (float32; float64 for")
        w(f"# float64 inputs) and moved to the IR's layout ({layout + ', ' if layout else ''}canonical dim order)")
        w("ew = rt.elementwise_dtype(mm)")
        if sizes:
            w(f"sizes = {{{', '.join(f'{d!r}: {e}' for d, e in sizes.items())}}}")
        for py, n, _, ir in params:
            split = self.split_arg(decl[n])
            if ir is None:  # only its shape is read
                continue
            if tuple(decl[n]) == tuple(ir):  # already in the IR's layout
                w(f"{py} = jnp.asarray({py}, ew)")
            else:
                w(f"{py} = rt.to_ir({py}, {','.join(decl[n])!r}, {','.join(ir)!r}, ew{split}"
                  f"{', sizes=sizes' if split else ''})")

    def split_arg(self, declared) -> str:
        sp = {h: g for h, g in self.splits().items() if h in declared}
        return f", split={sp!r}" if sp else ""

    def finish(self, res: list[str], rets):
        """The entry's return: each result moved back to its declared layout, outs in out_dtype, states in ew."""
        decl = {a.name: a.dims for a in self.p.outs + self.p.states}
        fp32 = self.p.fp32_outs()  # a derived backward's decay cotangents
        out = []
        for e, (k, name, _, dims) in zip(res, rets):
            full = self.result_dims(dims, decl[name])
            # a result constant along some declared dims is broadcast along them (full: its dims with those)
            bcast = f", full={','.join(full)!r}, sizes={self.sizes}" if set(full) - set(dims) else ""
            dtype = "out_dtype" if k == "out" and name not in fp32 else "ew"
            if tuple(dims) == tuple(decl[name]):  # already as declared
                out.append(f"jnp.asarray({e}, {dtype})")
            else:
                out.append(f"rt.from_ir({e}, {','.join(dims)!r}, {','.join(decl[name])!r}, {dtype}"
                           f"{self.split_arg(decl[name])}{bcast})")
        self.w("# the results in their declared layouts")
        if len(out) == 1:
            self.w(f"return {out[0]},")
            return
        with self.w.block("return ("):
            for o in out:
                self.w(f"{o},")
        self.w(")")

    def step_values(self) -> dict[str, bool]:
        """Sequential form: which values the scan body computes (per step, without the scan dim): everything that
        depends on a state, and state-free values bigger than any input (an outer product like dt*B⊗x hoisted
        over time would be one state-sized array per step)."""
        input_dims = [set(i.dims) for i in self.p.instrs if i.op in ("input", "state", "window")]
        inner: dict[str, bool] = {}
        for i in self.p.instrs:
            inner[i.name] = i.op == "state" or any(inner[a] for a in i.args) or (
                i.op not in ("input", "out", "update") and not any(set(i.dims) <= d for d in input_dims))
        return inner

    def returns(self):
        out = []
        inner = {} if self.chunked else self.step_values()
        for o in self.p.outs:
            v = self.by[f"out.{o.name}"].args[0]
            dims = self.by[v].dims
            if inner.get(v):  # the scan stacks a step's value along the scan dim, even one that lacks it
                dims = self.p.order(set(dims) | {self.scan})
            out.append(("out", o.name, v, dims))
        for s in self.p.states:
            sink = self.by.get(f"final.{s.name}") or self.by[f"update.{s.name}"]
            dims = self.by[sink.args[0]].dims
            out.append(("state", s.name, sink.args[0], tuple(d for d in dims if d != self.scan)))
        return out

    def body(self, rets):
        p, w = self.p, self.w
        if self.chunked:
            # the semantic check guarantees an input with the scan dim
            tsrc = next(i for i in p.instrs if i.op == "input" and self.scan in i.dims)
            w(f"T = {self.pn(tsrc.name)}.shape[{self.ax(tsrc.dims, self.scan)}]  # sequence length")
            self.chunked_body(rets)
        else:
            self.sequential_body(rets)

    # ---- sequential: lax.scan over the step function -----------------------------------------------------
    def sequential_body(self, rets):
        p, w = self.p, self.w
        inner = dep = self.step_values()
        if self.batch:
            tsrc = next(i for i in p.instrs if i.op == "input" and self.scan in i.dims)
            w(f"T = {self.pn(tsrc.name)}.shape[{self.ax(tsrc.dims, self.scan)}]  # sequence length")
            w("pk = rt.packing(cu_seqlens, T, 1)  # packed sequences: their steps and boundaries (None: one sequence)")
        w("# stage prologue: state-free per-step values no larger than an input, vectorised over time")
        for i in p.instrs:
            if not inner[i.name] and i.op not in ("input", "out", "update"):
                self.instr(i)
        step = [i for i in p.instrs if inner[i.name] and i.op not in ("state", "update", "out")]
        updates = {i.attr("state"): i.args[0] for i in p.instrs if i.op == "update"}
        used = []  # state-free values over time that the step reads, one step at a time (an update may be one)
        for a in [a for i in step for a in i.args] + list(updates.values()):
            if not inner[a] and self.scan in self.by[a].dims and a not in used and self.by[a].op != "const":
                used.append(a)
        states = [i for i in p.instrs if i.op == "state"]
        outs = list(dict.fromkeys(v for k, name, v, _ in rets if k == "out" and dep[v]))  # stacked by the scan
        for a in used + [i.name for i in step] + [s.name for s in states]:
            self.local_dims[a] = tuple(d for d in self.by[a].dims if d != self.scan)
        w()
        w("# stage step: one step of the recurrence per position of the scan dim")
        carry = ", ".join(self.pn(s.name) for s in states) + ("," if states else "")  # a tuple, maybe empty
        with w.block("def step(carry, xs):"):
            if states:
                w(f"{carry} = carry")
            if used:
                w(f"{', '.join(self.pn(a) for a in used)}, = xs")
            self.mm = "jnp.float32"
            for i in step:
                self.instr(i)
            self.mm = "mm"
            new = []
            for s in states:
                v = updates[s.attr("state")]
                same = set(self.dims(v)) == set(s.dims)
                new.append(self.pn(v) if same else f"jnp.broadcast_to({self.b(v, s.dims)}, {self.pn(s.name)}.shape)")
            ys = ", ".join(self.pn(v) for v in outs)
            w(f"return ({', '.join(new)}{',' if new else ''}), ({ys}{',' if outs else ''})")
        xs = ", ".join(f"jnp.moveaxis({self.pn(a)}, {self.ax(self.by[a].dims, self.scan)}, 0)" for a in used)
        if not used:  # nothing to walk along time but the steps themselves: their count comes from an input
            tsrc = next(i for i in p.instrs if i.op == "input" and self.scan in i.dims)
            length = f", length={self.pn(tsrc.name)}.shape[{self.ax(tsrc.dims, self.scan)}]"
        else:
            length = ""
        finals = ", ".join(self.pn.local(s.name, "final") for s in states) + ("," if states else "")
        ys_names = ", ".join(self.pn(v) for v in outs)
        scan = f"lax.scan(step, ({carry}), ({xs}{',' if used else ''}){length})"
        if self.batch:  # packed sequences: each walks from its own initial state (targets/packed.py)
            baxes = tuple(s.dims.index(self.batch) for s in states)
            scan = (f"({scan} if pk is None else\n    rt.scan_steps(step, ({carry}), ({xs}{',' if used else ''}), T, "
                    f"{baxes!r}, pk))")
        w(f"({finals}), ({ys_names}{',' if outs else ''}) = {scan}")
        for v in outs:
            to = self.p.order(set(self.by[v].dims) | {self.scan})
            w(f"{self.pn(v)} = jnp.moveaxis({self.pn(v)}, 0, {self.ax(to, self.scan)})")
        self.local_dims.clear()
        res = []
        finals = {s.attr("state"): self.pn.local(s.name, "final") for s in states}  # conv windows are not carried
        for k, name, v, _ in rets:
            res.append(finals.get(name, self.pn(v)) if k == "state" else self.pn(v))
        self.finish(res, rets)

    # ---- chunked: the four stages -----------------------------------------------------------------------
    def chunked_body(self, rets):
        p, w, Q = self.p, self.w, self.Q
        w(f"Q = {Q}  # chunk length")
        if self.batch:
            w("pk = rt.packing(cu_seqlens, T, Q)  # packed sequences: each moved to start a chunk (None: one sequence)")
            w("Tp = rt.aligned_length(T, Q, pk)  # whole chunks; padded steps get log-decay 0 and update 0")
        else:
            w("Tp = -(-T // Q) * Q  # padded to whole chunks; padded steps get log-decay 0 and update 0")
        w("nc = Tp // Q")
        for i in p.instrs:
            if i.op == "input" and self.scan in i.dims:
                pk = ", pk" if self.batch else ""
                w(f"{self.pn(i.name)} = rt.pad_time({self.pn(i.name)}, {self.ax(i.dims, self.scan)}, Tp{pk})")
        w(f"valid = {'rt.valid_steps(T, Tp, pk)' if self.batch else '(jnp.arange(Tp) < T).astype(jnp.float32)'}")
        stage = None
        for i in p.instrs:
            if i.op in ("input", "state", "out", "final"):
                continue
            s = i.attr("stage")
            if s != stage:
                w()
                w(f"# stage {s}")
                stage = s
            self.instr(i)
        res = []
        for k, name, v, dims in rets:
            pk = ", pk" if self.batch else ""
            res.append(f"rt.crop({self.pn(v)}, {self.ax(dims, self.scan)}, T{pk})" if self.scan in dims
                       else self.pn(v))
        w()
        self.finish(res, rets)

    # ---- instructions ------------------------------------------------------------------------------------
    def instr(self, i: Instr):
        getattr(self, "op_" + i.op.replace(".", "_"), self.op_elementwise)(i)

    def assign(self, i: Instr, expr: str, comment: str = ""):
        self.w(f"{self.pn(i.name)} = {expr}{'  # ' + comment if comment else ''}")

    def op_elementwise(self, i: Instr):
        d = self.dims(i.name)
        args = [self.b(a, d) for a in i.args]
        if i.op in UNARY:
            self.assign(i, UNARY[i.op].format(*args))
        elif i.op in BINARY:
            self.assign(i, BINARY[i.op].format(*args))
        elif i.op == "clamp":
            self.assign(i, f"jnp.clip({args[0]}, {args[1]}, {args[2]})")
        else:
            raise NotImplementedError(f"xla target: no emitter for op '{i.op}'")

    def op_const(self, i: Instr):
        pass  # constants are inlined at their uses

    def op_window(self, i: Instr):
        pass  # a conv window leaf is a parameter of the generated function

    def op_final(self, i: Instr):
        pass  # final states are returned by name

    def op_conv(self, i: Instr):
        x, w, win = i.args
        xd, wd, k = self.dims(x), self.dims(w), i.attr("k")
        # the weight aligned to x (size-1 axes where it is shared, the scan axis included), window axis last
        idx = [":" if d in wd else "None" for d in xd] + [":"]
        wk = self.n(w) if wd[-1] == k else f"jnp.moveaxis({self.n(w)}, {self.ax(wd, k)}, -1)"
        wk += f"[{', '.join(idx)}]"
        pk = f", pk, {self.ax(xd, self.batch)}" if self.batch else ""
        self.assign(i, f"rt.causal_conv({self.n(x)}, {self.ax(xd, self.scan)}, {self.n(win)}, {wk}{pk})",
                    f"causal conv over {self.scan}, window {k}")

    def op_conv_window(self, i: Instr):
        x, win = i.args
        T = "T" if self.chunked else "None"  # chunked: x is padded past the sequence length T
        pk = f", pk, {self.ax(self.dims(x), self.batch)}" if self.batch else ""
        self.assign(i, f"rt.conv_window({self.n(x)}, {self.ax(self.dims(x), self.scan)}, {self.n(win)}, {T}{pk})",
                    "the last inputs, carried to the next call")

    def op_contract(self, i: Instr):
        ins = ",".join("".join(self.letter[d] for d in self.dims(a)) for a in i.args)
        out = "".join(self.letter[d] for d in self.dims(i.name))
        self.assign(i, f'rt.einsum("{ins}->{out}", {", ".join(self.n(a) for a in i.args)}, mm={self.mm})')

    def op_reduce(self, i: Instr):
        src = self.dims(i.args[0])
        axes = tuple(self.ax(src, d) for d in i.attr("over"))
        fn = "jnp.sum" if i.attr("kind") == "sum" else "jnp.mean"
        self.assign(i, f"{fn}({self.n(i.args[0])}, axis={axes!r})")

    def op_rmsnorm(self, i: Instr):
        src = self.dims(i.args[0])
        axes = tuple(self.ax(src, d) for d in i.attr("over"))
        x = self.n(i.args[0])
        self.assign(i, f"{x} * lax.rsqrt(jnp.mean(jnp.square({x}), axis={axes!r}, keepdims=True) + {i.attr('eps')!r})",
                    "rmsnorm over " + ",".join(i.attr("over")))

    def op_expand(self, i: Instr):  # only in index mode; XLA uses split mode, where expands are gone
        raise NotImplementedError("xla target expects expand-groups{mode=split}")

    # chunk stages -----------------------------------------------------------------------------------------
    def view(self, ssa: str, tl: str | None = None):
        """(expression, letters) of a value for an einsum over chunked time; `tl` names its in-chunk position."""
        dims = self.by[ssa].dims
        tl = tl or self.letter[self.scan]
        letters = ""
        for d in dims:
            letters += (self.letter[self.cd] + tl) if d == self.scan else self.letter[d]
        if self.scan not in dims or ssa in self.stored_chunked:
            return self.n(ssa), letters
        return f"rt.chunk({self.n(ssa)}, {self.ax(dims, self.scan)}, Q)", letters

    def chunked_dims(self, dims):
        """Axis order of a stored-chunked value: the scan dim becomes (chunk index, position)."""
        out = []
        for d in dims:
            out += [self.cd, self.scan] if d == self.scan else [d]
        return out

    def masked(self, ssa: str, fill: str, dims) -> str:
        """`ssa` where the step is inside the sequence, else `fill`; full rank over `dims` (size-1 axes where
        `ssa` is constant) so the scan axis can be chunked by position."""
        valid = f"valid{self.b_dims((self.scan,), dims, full=True)}"
        src = self.dims(ssa)
        val = self.n(ssa) + (self.b_dims(src, dims, full=True) if src else "")
        return f"jnp.where({valid} > 0, {val}, {fill})"

    def op_chunk_cumsum(self, i: Instr):
        dims = i.dims
        ax = self.ax(dims, self.scan)
        ell = self.masked(i.args[0], "0.0", dims)
        self.assign(i, f"jnp.cumsum(rt.chunk({ell}, {ax}, Q), axis={ax + 1})",
                    "log-decay summed within each chunk")
        self.stored_chunked.add(i.name)

    def op_chunk_cumsign(self, i: Instr):
        dims = i.dims
        ax = self.ax(dims, self.scan)
        sgn = self.masked(i.args[0], "1.0", dims)
        L = self.n(next(x.name for x in self.p.instrs if x.op == "chunk.cumsum" and x.attr("state") == i.attr("state")))
        self.assign(i, f"rt.cumsign(jnp.broadcast_to(rt.chunk({sgn}, {ax}, Q), {L}.shape), {ax + 1})",
                    "sign of the decay product so far (a zero decay counts as positive: its log is the reset)")
        self.stored_chunked.add(i.name)

    @staticmethod
    def clamped(x: str, bounded: bool) -> str:
        """An in-chunk exponent: clamped to <= 0 only where |a| <= 1 is proven (rounding), else exact."""
        return f"jnp.minimum({x}, 0.0)" if bounded else x

    def decay_between(self, La: str, Lb: str, sa: str | None, sb: str | None, bounded: bool) -> str:
        e = f"jnp.exp({self.clamped(f'{La} - {Lb}', bounded)})"
        return e if sa is None else f"{e} * {sa} * {sb}"

    def valid_view(self, tl: str):
        return "valid.reshape(nc, Q)", self.letter[self.cd] + tl

    def op_chunk_states(self, i: Instr):
        a = decode(i)
        if i.attr("form") == "scan":
            return self.walk(i, a, zero_start=True)
        L = self.n(a.L)
        ax = self.ax(self.by[a.L].dims, self.scan) + 1
        sig = self.n(a.sigma) if a.sigma else None
        w_expr = self.decay_between(f"rt.last({L}, {ax})", L, sig and f"rt.last({sig}, {ax})", sig,
                                    i.attr("bounded", False))
        wname = self.pn.local(i.name, "w")
        self.w(f"{wname} = {w_expr}  # decay from each step to the chunk's end")
        _, wl = self.view(a.L)
        out = "".join(self.letter[d] for d in i.dims)
        terms = []
        for coef, prod in zip(a.ucoef, a.u):
            views = [(wname, wl)] + [self.view(f) for f in prod] + [self.valid_view(self.letter[self.scan])]
            views = self.fold_scales(views)
            ins = ",".join(v[1] for v in views)
            e = f'rt.einsum("{ins}->{out}", {", ".join(v[0] for v in views)}, mm=mm)'
            terms.append(e if coef == 1.0 else f"{coef!r} * {e}")
        # no input term (z = z * f): every chunk ends where it started, at zero
        zeros = f"rt.zeros_per_chunk({self.n(self.state_leaf(i.attr('state')))}, {i.dims.index(self.cd)}, nc)"
        self.assign(i, " + ".join(terms) or zeros, "each chunk's final state, starting from zero")

    @staticmethod
    def fold_scales(views):
        """Multiply operands whose letters all lie within the largest operand into it first (one fused
        elementwise pass), so the contraction that follows is a plain matmul and no broadcast product of two
        small operands is ever materialised at full size."""
        big = max(views, key=lambda v: len(v[1]))
        scales = [v for v in views if v is not big and set(v[1]) <= set(big[1])]
        if not scales:
            return views
        folded = (f'rt.mul("{big[1]}", ' + ", ".join(f"({x}, {lt!r})" for x, lt in [big] + scales) + ")", big[1])
        return [folded] + [v for v in views if v is not big and v not in scales]

    def chunk_decay_of(self, a) -> str:
        """exp of the whole chunk's log-decay (times its sign), dims: decay dims with t -> t#."""
        key = a.L
        if key not in self.chunk_decay:
            L = self.n(a.L)
            ax = self.ax(self.by[a.L].dims, self.scan) + 1
            e = f"jnp.exp(rt.last({L}, {ax}))"
            if a.sigma:
                e += f" * rt.last({self.n(a.sigma)}, {ax})"
            name = self.pn.local(a.L, "chunk")
            self.w(f"{name} = jnp.squeeze({e}, {ax})  # decay across each whole chunk")
            self.chunk_decay[key] = name
        return self.chunk_decay[key]

    def op_chunk_pass(self, i: Instr):
        a = decode(i)
        dec = self.chunk_decay_of(a)
        ddims = [d for d in self.chunked_dims(self.by[a.L].dims) if d != self.scan]
        sdims = [d for d in i.dims if d != self.cd]
        cax = self.ax(i.dims, self.cd)
        dax = ddims.index(self.cd)
        S0 = self.n(a.init)
        bdec = "a" + self.b_dims([d for d in ddims if d != self.cd], sdims)
        fn = self.pn.local(i.name, "step")
        with self.w.block(f"def {fn}(S, inp):"):
            self.w("a, s = inp")
            self.w(f"return {bdec} * S + s, S")
        xs = self.pn.local(i.name, "xs")
        self.w(f"{xs} = (jnp.moveaxis({dec}, {dax}, 0), jnp.moveaxis({self.n(a.chunks)}, {cax}, 0))")
        if self.batch:  # packed sequences: restart at each sequence's first chunk (targets/packed.py)
            self.w(f"{self.pn(i.name)} = rt.pass_states({fn}, {S0}, {xs}, across, {sdims.index(self.batch)}, pk)")
        else:
            S0 = f"rt.entering({fn}, {S0}, {xs}, across)"  # the initial state, or this device's part's (ssmc.shard)
            self.w(f"_, {self.pn(i.name)} = lax.scan({fn}, {S0}, {xs})")
        self.assign(i, f"jnp.moveaxis({self.pn(i.name)}, 0, {cax})", "state entering each chunk")

    def op_chunk_final(self, i: Instr):
        a = decode(i)
        dec = self.chunk_decay_of(a)
        ddims = [d for d in self.chunked_dims(self.by[a.L].dims) if d != self.scan]
        cax = self.ax(self.by[a.chunks].dims, self.cd)
        dax = ddims.index(self.cd)
        bdec = f"jnp.take({dec}, -1, axis={dax})" + self.b_dims([d for d in ddims if d != self.cd], i.dims)
        last = (f"{bdec} * jnp.take({self.n(a.enter)}, -1, axis={cax}) + "
                f"jnp.take({self.n(a.chunks)}, -1, axis={cax})")
        if self.batch:  # packed sequences: each one's state leaving its last chunk
            cdims = self.by[a.chunks].dims
            every = f"{dec}{self.b_dims(ddims, cdims)} * {self.n(a.enter)} + {self.n(a.chunks)}"
            init = decode(self.by[a.enter]).init
            last = (f"({last} if pk is None else\n    rt.finals({every}, {cax}, {self.n(init)}, "
                    f"{i.dims.index(self.batch)}, pk))")
        self.assign(i, last, "state after the last step")

    def op_chunk_across(self, i: Instr):
        """Σ over the state dims of an input indexed by chunk times the state entering the chunk, for every step
        of the chunk (passes/chunk_ops.py)."""
        x, e = i.args
        tl, cl = self.letter[self.scan], self.letter[self.cd]
        xl = "".join(self.letter[d] for d in self.by[x].dims)
        el = "".join(self.letter[d] for d in self.by[e].dims)
        zl = "".join(self.letter[d] for d in self.by[e].dims if d in i.dims or d == self.cd)
        out = "".join((cl + tl) if d == self.scan else self.letter[d] for d in i.dims)
        summed = tuple(k for k, c in enumerate(el) if c not in zl)
        z = f'jnp.sum(rt.mul("{el}", ({self.n(x)}, "{xl}"), ({self.n(e)}, "{el}")), axis={summed})'
        self.assign(i, f'rt.unchunk(rt.mul("{out}", ({z}, "{zl}"), (jnp.ones((Q,), ew), "{tl}")), '
                       f'{out.index(cl)})', "<input, state entering the chunk>, at every step of the chunk")

    def op_chunk_output(self, i: Instr):
        a = decode(i)
        if i.attr("form") == "scan":
            return self.walk(i, a, zero_start=False)
        prev = i.attr("when") == "prev"
        Ldims = self.by[a.L].dims
        ax = self.ax(Ldims, self.scan) + 1  # position axis in the chunked layout
        npost = len(Ldims) - self.ax(Ldims, self.scan) - 1
        L = self.n(a.L)
        base = functools.partial(self.pn.local, i.name)  # base("D") etc.: this output's locals
        Lt = L
        if prev:  # readout before the update: decay up to t-1
            ell = self.masked(a.ell, "0.0", Ldims)
            Lt = base("Lx")
            self.w(f"{Lt} = {L} - rt.chunk({ell}, {ax - 1}, Q)  # log-decay through t-1")
        sig = sig_t = self.n(a.sigma) if a.sigma else None
        if sig and prev and a.sgn:  # the target's sign through t-1: sigma_t / sign(a_t)
            sig_t = base("sgt")
            sgn = self.masked(a.sgn, "1.0", Ldims)
            self.w(f"{sig_t} = jnp.where(rt.chunk({sgn}, {ax - 1}, Q) < 0, -{sig}, {sig})  # decay's sign through t-1")
        _, Ll = self.view(a.L)
        tl = self.letter[self.scan]
        Dl = Ll.replace(tl, tl + "s")
        out = "".join((self.letter[self.cd] + tl) if d == self.scan else self.letter[d] for d in i.dims)
        dstate = f"jnp.exp({Lt})" + (f" * {sig_t}" if sig else "")
        ev, el = self.n(a.enter), "".join(self.letter[d] for d in self.by[a.enter].dims)
        sdims = set(self.by[a.enter].dims) - {self.cd}
        K = (union_dims(self.by, a.q) | sdims) - set(i.dims)
        joint = bool(K & set(Ldims))  # the decay varies along the contracted dims (key-wise)
        part = i.attr("part")  # None: the whole value; "state" / "straddle": one part of it (passes/chunk_ops.py)
        if part is not None:
            self.check_part(i, a, part, K)
        sub = None if part else self.sub_chunks(i, K, Ldims, L, Lt, (sig_t, sig), ax, prev, base)
        if sub is None and part != "state":
            # the whole [Q, Q, decay dims] decay tensor (scalar decays; chunks of one sub-chunk)
            diff = f"jnp.expand_dims({Lt}, {ax + 1}) - jnp.expand_dims({L}, {ax})"
            mask = f"rt.causal(Q, {prev}, {npost})"
            D = f"jnp.exp({self.clamped(f'jnp.where({mask}, {diff}, -jnp.inf)', i.attr('bounded', False))})"
            if sig:
                D += f" * jnp.expand_dims({sig_t}, {ax + 1}) * jnp.expand_dims({sig}, {ax})"
            self.w(f"{base('D')} = {D}  # decay from source s to target t in the chunk, masked s "
                   f"{'<' if prev else '<='} t")
        self.output_ssd(a, base, K, Ldims, Dl, Ll, out, dstate, ev, el, prev, joint, sub, part)
        coef = "" if a.qcoef == 1.0 else f"{a.qcoef!r} * "
        oax = self.ax(i.dims, self.scan)
        value = {None: f"{base('in')} + {base('st')}", "state": base("st"), "in": base("in"),
                 "straddle": base("straddle")}[part]
        self.assign(i, f"{coef}rt.unchunk({value}, {oax})")

    def check_part(self, i: Instr, a, part: str, K: set):
        """A chunk.output `part` this emitter computes (chunk_ops.part_problem), else a TargetError naming what is
        missing; a straddle's decay is a per-step scalar per out index (not along a contracted dim) and its out
        dims are the decay's dims and the scan dim, every other dim contracted."""
        where = f"xla: chunk.output {i.name} (state {i.attr('state')}) part={part}"
        problem = part_problem(i, a, self.p.instrs)
        if problem:
            raise TargetError(f"{where}: {problem}")
        if part != "straddle":
            return
        small = set(self.by[a.L].dims) - {self.scan}
        if K & small:
            raise TargetError(f"{where}: needs a scalar positive decay (identity, constant or scalar class, no "
                              f"sign): its decay varies along contracted dims {sorted(K & small)}")
        # every factor either carries a contracted dim or is a per-step scale (within the decay's dims): nothing
        # is kept along the out beyond the decay's dims (output_ssd's qR / uR are empty)
        rest = [f for f in a.q + tuple(f for prod in a.u for f in prod)
                if not set(self.by[f].dims) & K and not set(self.by[f].dims) - {self.scan} <= small]
        if rest or not small <= set(i.dims):
            raise TargetError(f"{where}: needs out dims that are the decay's dims and the scan dim, every other dim "
                              f"contracted; out {list(i.dims)}, decay {list(self.by[a.L].dims)}"
                              + (f", factors kept along the out: {rest}" if rest else ""))

    def sub_chunks(self, i, K, Ldims, L, Lt, sig, ax, prev, base):
        """Key-wise / value-wise decay with sub-chunks of C < Q steps (the op's `sub`): write the decay factors
        (xla_runtime's sub_*: target side exp(Lt_t - r_i), source side exp(r_i - L_s) for sources before sub-chunk
        i, the diagonal blocks exp(Lt_t - L_s)) and return what output_ssd needs to use them; None for the
        [Q, Q, decay dims] form (no sub-chunks, or a decay along both contracted and kept dims)."""
        C = i.attr("sub")
        if not C or C >= self.Q:
            return None
        dd = set(Ldims) - {self.scan}
        if not (dd & K) and not (dd - K):
            return None
        q = decode(i).q
        if not (dd & K) and not any(self.scan in self.by[f].dims and set(self.by[f].dims) & K for f in q):
            return None  # value-wise scores without the target position (a query constant in time): [Q, Q] form
        taken = set(self.letter.values()) | {"s"}
        I, X, Y = [c for c in "ijxyzIJXYZ" + "".join(map(chr, range(97, 123))) if c not in taken][:3]
        bounded = i.attr("bounded", False)
        w = self.w
        _, Ll = self.view(self.by_L(i))
        tl = self.letter[self.scan]
        ref, tgt, src, dg = (base(x) for x in ("ref", "tgt", "src", "diag"))
        sig_t, sig = sig
        st = f", sig={sig_t}" if sig else ""
        ss = f", sig={sig}" if sig else ""
        sd = f", sig={sig_t}, sig_s={sig}" if sig else ""
        w(f"# sub-chunks of {C} steps: between sub-chunks a matmul whose operands carry exp(L_t - r) and exp(r - L_s) "
          f"(r: L at the end of the sub-chunk before the target's, both <= 0 for |a| <= 1), diagonal blocks direct")
        w(f"{ref} = rt.sub_ref({L}, {ax}, {C})  # r: L at the last step before each sub-chunk")
        w(f"{tgt} = rt.sub_target({Lt}, {ref}, {ax}, {C}, {bounded}{st})  # exp(L_t - r), t in the sub-chunk")
        w(f"{src} = rt.sub_source({L}, {ref}, {ax}, {C}, {bounded}{ss})  # exp(r - L_s), s before the sub-chunk")
        w(f"{dg} = rt.sub_diag({Lt}, {L}, {ax}, {C}, {prev}, {bounded}{sd})  # exp(L_t - L_s), s "
          f"{'<' if prev else '<='} t in one sub-chunk")
        return dict(C=C, I=I, X=X, Y=Y, tgt=(tgt, Ll.replace(tl, I + X)), src=(src, Ll.replace(tl, I + "s")),
                    diag=(dg, Ll.replace(tl, I + X + Y)), joint=bool(dd & K))

    def by_L(self, i):
        return decode(i).L

    def sub_view(self, v, I, X, C, pos=None):
        """A chunked view (expression, letters) split into sub-chunks: position `pos` (default the target's t)
        -> (sub-chunk I, step X)."""
        e, lt = v
        tl = pos or self.letter[self.scan]
        if tl not in lt:
            return v
        return f"rt.chunk({e}, {lt.index(tl)}, {C})", lt.replace(tl, I + X)

    @staticmethod
    def mul_sum(out, ops):
        """rt.mul_sum of (expression, letters) operands: their product summed down to the letters `out`."""
        lt = "".join(dict.fromkeys(c for _, x in ops for c in x))
        return f'rt.mul_sum("{out}", "{lt}", {", ".join(f"({e}, {x!r})" for e, x in ops)})'

    @staticmethod
    def product(views, letters=None):
        """One (expression, letters) for the product of views (rt.mul when more than one; None for none)."""
        views = [v for v in views if v is not None]
        if not views:
            return None
        if len(views) == 1:
            return views[0]
        lt = letters or "".join(dict.fromkeys(c for _, x in views for c in x))
        return f'rt.mul("{lt}", {", ".join(f"({x}, {y!r})" for x, y in views)})', lt

    def sub_scores(self, sub, qKv, uKv, Kl, name, off, dia):
        """Key-wise scores Σ_K q_t k_s exp(L_t - L_s) by sub-chunks: the blocks before the target's sub-chunk as one
        matmul per target sub-chunk over [C, K] x [K, Q] (exponents folded into the operands), the diagonal blocks
        [C, C, K] elementwise; returns the scores' letters (as the [Q, Q] form's)."""
        w, C, I, X, Y = self.w, sub["C"], sub["I"], sub["X"], sub["Y"]
        qs = self.product([self.sub_view(v, I, X, C) for v in qKv])
        us = self.product([self.sub_view(v, I, Y, C, "s") for v in uKv])
        tgt, src, dg = sub["tgt"], sub["src"], sub["diag"]
        qt = self.product([qs, tgt])
        us_src = self.product([src] + uKv)  # every source s, per target sub-chunk I
        offl = "".join(dict.fromkeys(c for c in qt[1] + us_src[1] if c not in Kl))
        diagl = offl.replace("s", Y)
        w(f'{off} = rt.einsum("{qt[1]},{us_src[1]}->{offl}", {qt[0]}, {us_src[0]}, mm=mm)  # (q ⊙ exp(L_t - r)) '
          f'· (k ⊙ exp(r - L_s)), s before the sub-chunk')
        ops = [v for v in (dg, qs, us) if v is not None]
        w(f'{dia} = {self.mul_sum(diagl, ops)}  # diagonal blocks')
        w(f"{name} = rt.unchunk(rt.add_diag({off}, {dia}, {offl.index(I)}, {offl.index('s')}), "
          f"{offl.index(I)})  # q_t · decay · k_s")
        return offl.replace(I + X, self.letter[self.scan])

    def sub_apply(self, sub, W, Wl, qv, uv, out, off, dia):
        """Value-wise: Σ_s W_ts exp(L_t - L_s) v_s, the decay along kept dims: per target sub-chunk a matmul of W's
        rows with v ⊙ exp(r - L_s) over the sources before it, the rows scaled by exp(L_t - r); the diagonal blocks
        [C, C, V] elementwise. qv / uv: the target's / source's factors (time dims as chunked views)."""
        w, C, I, X, Y = self.w, sub["C"], sub["I"], sub["X"], sub["Y"]
        tl = self.letter[self.scan]
        Ws = self.sub_view((W, Wl), I, X, C)
        vsrc = self.product([sub["src"]] + uv)
        outs = out.replace(tl, I + X)
        inner = "".join(c for c in outs if c in Ws[1] + vsrc[1])
        w(f'{off} = rt.einsum("{Ws[1]},{vsrc[1]}->{inner}", {Ws[0]}, {vsrc[0]}, mm=mm)  # W · (v ⊙ exp(r - L_s)), '
          f's before the sub-chunk')
        tgt = sub["tgt"]
        Wd = (f"rt.diag_blocks({Ws[0]}, {Ws[1].index(I)}, {Ws[1].index('s')}, {C})", Ws[1].replace("s", Y))
        vd = self.product([self.sub_view(v, I, Y, C, "s") for v in uv])
        ops = [sub["diag"], Wd] + ([vd] if vd else [])
        dl = "".join(c for c in outs if c in "".join(x for _, x in ops))
        w(f'{dia} = {self.mul_sum(dl, ops)}  # diagonal blocks')
        qs = [self.sub_view(v, I, X, C) for v in qv]
        res = f'rt.mul("{outs}", ({off}, {inner!r}), ({tgt[0]}, {tgt[1]!r})) + rt.mul("{outs}", ({dia}, {dl!r}))'
        if qs:
            res = f'rt.mul("{outs}", ({res}, {outs!r}), {", ".join(f"({e}, {x!r})" for e, x in qs)})'
        return f"rt.unchunk({res}, {outs.index(I)})"

    def output_ssd(self, a, base, K, Ldims, Dl, Ll, out, dstate, ev, el, prev, joint, sub=None, part=None):
        """The SSD order: scores = q_t · k_s over the contracted dims (a matmul), then one elementwise pass
        W = scores ⊙ decay ⊙ per-step scales, selected by the causal mask, then W · v over the source positions (a
        matmul) - no tensor larger than [Q, Q, decay dims] per chunk. When the decay varies along the contracted
        dims (joint: key-wise), it enters the scores contraction itself. The mask is a select after every factor,
        so a NaN or inf at a later step (a padded tail) never reaches an earlier row. part: "state" writes only the
        state part, "in" only the in-chunk part, "straddle" only the straddling pairs (straddle_ssd) instead of the in-chunk and state parts."""
        w = self.w
        cl, tl = self.letter[self.cd], self.letter[self.scan]
        small = set(Ldims) - {self.scan}

        def split(names):  # -> carrying contracted dims, per-step scales (fit in the decay's dims), the rest
            ks = [f for f in names if set(self.by[f].dims) & K]
            sc = [f for f in names if f not in ks and set(self.by[f].dims) - {self.scan} <= small]
            return ks, sc, [f for f in names if f not in ks and f not in sc]

        qK, qS, qR = split(a.q)
        qKv, qSv, qRv = ([self.view(f) for f in g] for g in (qK, qS, qR))
        Kl = {self.letter[d] for d in K}
        parts = []
        for k, (coef, prod) in enumerate(zip(() if part == "state" else a.ucoef, a.u)):
            uK, uS, uR = split(prod)
            uKv, uSv, uRv = ([self.view(f, "s") for f in g] for g in (uK, uS, uR))
            sname = base(f"scores{k or ''}")
            if sub and sub["joint"]:
                sl = self.sub_scores(sub, qKv, uKv, Kl, sname, base(f"off{k or ''}"), base(f"blocks{k or ''}"))
            else:
                kin = qKv + ([(base("D"), Dl)] if joint else []) + uKv
                sl = "".join(dict.fromkeys(c for v in kin for c in v[1] if c not in Kl))
                w(f'{sname} = rt.einsum("{",".join(v[1] for v in kin)}->{sl}", {", ".join(v[0] for v in kin)}, '
                  f'mm=mm)  # q_t · {"decay · " if joint else ""}k_s')
            if sub and not sub["joint"]:  # value-wise: the decay enters with the values, by sub-chunks
                wname = base(f"W{k or ''}")
                w(f'{wname} = rt.causal_select({sname}, "{sl}", "{cl}{tl}s", {prev}, valid)  # s '
                  f'{"<" if prev else "<="} t')
                e = self.sub_apply(sub, wname, sl, qSv + qRv, uSv + uRv, out, base(f"off{k or ''}"),
                                   base(f"blocks{k or ''}"))
                parts.append(e if coef == 1.0 else f"{coef!r} * {e}")
                continue
            scale = [(sname, sl)] + ([] if joint else [(base("D"), Dl)]) + list(qSv + uSv)
            Wl = "".join(dict.fromkeys(c for _, lt in scale for c in lt))
            wname = base(f"W{k or ''}")
            prod = scale[0][0] if len(scale) == 1 else \
                f'rt.mul("{Wl}", {", ".join(f"({x}, {lt!r})" for x, lt in scale)})'
            w(f'{wname} = rt.causal_select({prod}, "{Wl}", "{cl}{tl}s", {prev}, valid)  # decay-weighted, s '
              f'{"<" if prev else "<="} t')
            if part == "straddle":  # W is the summand M[t, s] itself (check_part: nothing kept along the out)
                parts.append((coef, wname, Wl))
                continue
            rest = [(wname, Wl)] + list(qRv + uRv)
            e = f'rt.einsum("{",".join(lt for _, lt in rest)}->{out}", {", ".join(x for x, _ in rest)}, mm=mm)'
            parts.append(e if coef == 1.0 else f"{coef!r} * {e}")
        if part == "straddle":
            return self.straddle_ssd(parts, base, out)
        if part in (None, "in"):
            w(f"{base('in')} = {' + '.join(parts) if parts else '0.0'}  # in-chunk part: W · v over the sources")
        if part == "in":
            return
        if joint:  # the decay from the chunk's start varies along the contracted dims: into q first
            views = self.fold_scales([self.view(f) for f in a.q] + [(dstate, Ll), (ev, el)])
            w(f'{base("st")} = rt.einsum("{",".join(v[1] for v in views)}->{out}", {", ".join(v[0] for v in views)}, '
              f'mm=mm)  # state part')
            return
        ins = ",".join([v[1] for v in qKv + qRv] + [el])
        sto = "".join(c for c in out if c in ins)  # a q without the scan dim leaves t to the decay
        st = f'rt.einsum("{ins}->{sto}", {", ".join([v[0] for v in qKv + qRv] + [ev])}, mm=mm)'
        scale = [(st, sto), (dstate, Ll)] + list(qSv)
        w(f'{base("st")} = rt.mul("{out}", {", ".join(f"({x}, {lt!r})" for x, lt in scale)})  # state part')

    def straddle_ssd(self, parts, base, out):
        """part=straddle: out_i = Σ_{t >= i} Σ_{s < i} M[t, s] within each chunk, M = Σ_k coef_k W_k the in-chunk
        summands (masked s <= t, s valid, by causal_select), t valid too. A pair counts for [s < i] - [t < i]:
        out_i = Σ_{j < i} (colsum_j - rowsum_j), as the kernel targets compute it (kernel_body.straddle_pairs); the
        subtraction cancels only in-chunk pairs, each the same number on both sides."""
        w = self.w
        cl, tl = self.letter[self.cd], self.letter[self.scan]
        Ml = parts[0][2] if parts else out.replace(tl, tl + "s")  # the summands' letters: the out's and s
        terms = []
        for coef, W, Wl in parts:
            if set(Wl) != set(out) | {"s"}:
                raise TargetError(f"xla: part=straddle: the in-chunk summands' letters {Wl} are not the out's "
                                  f"({out}) and s")
            e = W if Wl == Ml else f'rt.mul("{Ml}", ({W}, {Wl!r}))'
            terms.append(e if coef == 1.0 else f"{coef!r} * {e}")
        M, d = base("M"), base("d")
        cs, rs = Ml.replace(tl, ""), Ml.replace("s", "")  # letters of the column sums (over t), row sums (over s)
        w(f'{M} = jnp.where(rt.align(valid.reshape(nc, Q) > 0, "{cl}{tl}", "{Ml}"), {" + ".join(terms) or "0.0"}, '
          f'0.0)  # in-chunk summands M[t, s], s <= t, both steps valid')
        w(f'{d} = jnp.sum({M}, axis={Ml.index(tl)}) - rt.align(jnp.sum({M}, axis={Ml.index("s")}), '
          f'"{rs.replace(tl, "s")}", "{cs}")  # per step j: pairs from j minus pairs into j')
        w(f'{base("straddle")} = rt.align(jnp.sum(jnp.where(rt.align(rt.causal(Q, True, 0), "{tl}s", "{Ml}"), '
          f'rt.align({d}, "{cs}", "{Ml}"), 0.0), axis={Ml.index("s")}), "{rs}", "{out}")  # Σ_(j < i): the '
          f'pairs s < i <= t')

    def walk(self, i: Instr, a, zero_start: bool):
        """Elementwise decay: walk each chunk's steps with the state of every chunk at once (form=scan)."""
        w = self.w
        base = self.pn(i.name)
        sdims = [d for d in (i.dims if zero_start else self.by[a.enter].dims)]
        steps_in = [a.ell] + ([a.sgn] if a.sgn else []) + [f for prod in a.u for f in prod] + list(a.q)
        steps_in = list(dict.fromkeys(s for s in steps_in if self.by[s].op != "const"))
        local = {}
        for s in steps_in:
            d = self.by[s].dims
            local[s] = tuple(self.cd if x == self.scan else x for x in d)
        exprs = []
        for s in steps_in:
            d = self.by[s].dims
            if self.scan in d:
                exprs.append(f"rt.steps({self.n(s)}, {self.ax(d, self.scan)}, Q)")
            else:
                exprs.append(None)
        per_step = [s for s, e in zip(steps_in, exprs) if e is not None]
        saved = dict(self.local_dims)
        self.local_dims.update(local)
        cax = sdims.index(self.cd)
        prev = i.attr("when") == "prev"
        fn = self.pn.local(i.name, "step")
        with w.block(f"def {fn}(S, xs):"):
            w(f"{', '.join(self.n(s) for s in per_step)}, valid = xs  # this step of every chunk")
            u_terms = []
            for coef, prod in zip(a.ucoef, a.u):
                e = " * ".join(self.b(f, sdims) for f in prod) or "1.0"
                u_terms.append(e if coef == 1.0 else f"{coef!r} * {e}")
            vb = "valid" + self.b_dims([self.cd], sdims)
            # padded steps (v = 0) neither decay nor update the state
            decay = f"jnp.exp({vb} * {self.b(a.ell, sdims)})"
            if a.sgn:  # a_t may be negative: exp(ell) is |a_t|
                decay += f" * jnp.where({vb} > 0, {self.b(a.sgn, sdims)}, 1.0)"
            upd = f"{decay} * S + {vb} * ({' + '.join(u_terms) or '0.0'})"
            if zero_start:
                w(f"return {upd}, None")
            else:
                out = "".join(self.letter[self.cd] if d == self.scan else self.letter[d] for d in i.dims)
                ins = ",".join("".join(self.letter[x] for x in self.local_dims.get(f, self.by[f].dims))
                               for f in a.q) + "," + "".join(self.letter[d] for d in sdims)
                y = f'rt.einsum("{ins}->{out}", {", ".join(self.n(f) for f in a.q)}, S, mm=jnp.float32)'
                if prev:
                    w(f"y_t = {y}")
                    w(f"return {upd}, y_t")
                else:
                    w(f"S = {upd}")
                    w(f"return S, {y}")
        self.local_dims = saved
        xs = ", ".join([e for e in exprs if e is not None] + ["rt.steps(valid, 0, Q)"])
        if zero_start:
            init = self.n(self.state_leaf(i.attr('state')))
            if self.batch:  # packed sequences: the chunks hold a batch of one
                init = f"rt.one_row({init}, {[d for d in sdims if d != self.cd].index(self.batch)}, pk)"
            init = f"rt.zeros_per_chunk({init}, {cax}, nc)"
            w(f"{base}, _ = lax.scan({fn}, {init}, ({xs}))")
            w(f"# {base}: each chunk's final state from zero, walking its steps")
        else:
            oax = self.ax(i.dims, self.scan)
            coef = "" if a.qcoef == 1.0 else f"{a.qcoef!r} * "
            w(f"_, {base} = lax.scan({fn}, {self.n(a.enter)}, ({xs}))")
            w(f"{base} = {coef}rt.unsteps({base}, {oax})  # readout at every step, each chunk from its entering state")

    def state_leaf(self, state: str) -> str:
        return next(i.name for i in self.p.instrs if i.op == "state" and i.attr("state") == state)
