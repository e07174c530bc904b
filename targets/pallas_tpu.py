"""Pallas TPU target: one `pl.pallas_call` kernel per program plus a JAX launcher (Mosaic on TPUs, Pallas' TPU
interpreter on CPU with interpret=True).

The grid has one "parallel" axis per grid dim of the kernel plan (batch, heads) and, last, an "arbitrary" axis over
time blocks: the chunks of the chunk-parallel form, or blocks of steps that the sequential form walks one step at a
time in a `lax.fori_loop`. The running state lives in VMEM scratch across the time axis: set at the first block
(from the initial state, zeros unless given), written to the final-state output at the last. Each chunk runs the
IR's stages back to back on VMEM blocks (the same tile body as the Triton target, kernel_body.py): dt prologue,
in-chunk cumulative decay (a lower-triangular matmul), the in-chunk quadratic part and state contractions on the
MXU (`lax.dot_general` with fp32 accumulation), D skip / gate epilogue, the fused state update. A group-indexed
input (B, C of Mamba2) is read through its BlockSpec's index_map (head i reads group i // (H/G)), never repeated.
"""
from __future__ import annotations


from .kernel_body import Dialect, TileEmitter
from .kernel_launch import KernelTarget, LauncherWriter
from .pallas_runtime import kernel_layout


class PallasDialect(Dialect):
    """jax.numpy spellings (the defaults), with what Mosaic lowers for matmuls, causal masks and cumsum."""
    # jnp.sign's Mosaic lowering asks the attached TPU for its generation (no lowering without one): compare instead
    UNARY = {**Dialect.UNARY, "sign": "jnp.where({0} > 0, 1.0, jnp.where({0} < 0, -1.0, 0.0))"}

    def dot(self, a, b, ca, cb):
        return (f"lax.dot_general(({a}).astype(MM), ({b}).astype(MM), ((({ca},), ({cb},)), ((), ())), "
                f"precision=PREC, preferred_element_type=jnp.float32)")

    def bdot(self, a, b, ca, cb):
        return (f"lax.dot_general(({a}).astype(MM), ({b}).astype(MM), ((({ca},), ({cb},)), ((0,), (0,))), "
                f"precision=PREC, preferred_element_type=jnp.float32)")

    def cumsum0(self, x, ndim):
        return f"rt.cumsum0({x})"

    def causal(self, strict):
        return "TRIL_STRICT" if strict else "TRIL"

    def needs_mask(self, d):
        return False  # tile dims are whole blocks: nothing past the end inside a program


class PallasTiles(TileEmitter):
    """The shared tile body; boolean masks broadcast through int32 (Mosaic cannot reshape i1 vectors)."""

    # the boolean masks the body broadcasts, exactly as it spells them (valid, TRIL and TRIL_STRICT are reserved
    # names, so no spec value's expression can equal one; a prefix test would catch `valid_` or `TRIL_x`)
    MASKS = {"valid"} | {f"({m} & valid[None, :])" for m in ("TRIL", "TRIL_STRICT")}

    def bc(self, expr, src, to):
        res = TileEmitter.bc(expr, src, to)
        if res == expr or expr not in self.MASKS:
            return res
        if expr == "valid":
            return f"({TileEmitter.bc('valid_i', src, to)} != 0)"
        return f"({TileEmitter.bc(expr + '.astype(jnp.int32)', src, to)} != 0)"


class PallasEmitter(LauncherWriter):
    target = "tpu"
    runtime = "pallas_runtime"
    imports = ("from jax.experimental import pallas as pl",)
    FIXED = ("pl", "Q", "TB", "MM", "PREC", "chunk_id", "TRIL", "TRIL_STRICT", "valid", "valid_i", "step", "carry",
             "t_i", "_init", "_final")

    def layout_of(self, name):
        k = self.plan
        dims = self.arrays()[name]
        return kernel_layout(k.grid, k.tile, k.scan, k.group_of, dims)

    def kernel(self):
        k, w = self.plan, self.w
        body = PallasTiles(k, PallasDialect(), w, self.pn)
        self.body = body
        ins = [self.ref_of(i) for i in k.inputs + k.states]
        outs = [self.store_ref(kind, n) for kind, n, _ in k.stores]
        self.scratch = {s: self.pn.local(s, "scr") for kind, s, _ in k.stores if kind == "state"}
        dims = self.dims()  # the sizes LAYOUT names
        meta = [self.size_name(d) for d in dims] + [self.block_name(d) for d in k.tile]
        meta += ["Q" if k.form == "chunked" else "TB", "MM", "PREC"]
        # sequential form: each time block is staged through fp32 VMEM (one step's row of a 16-bit block is not
        # addressable on its own); same order as the launcher's scratch shapes
        self.staged = {}
        if k.form == "sequential":
            self.staged = {self.ref_of(i): self.pn.local(i.name, "blk") for i in k.inputs if k.scan in i.dims}
            self.staged.update({self.store_ref(kind, n): self.pn.key(("blk", self.store_key(kind, n)),
                                                                     f"{self.store_stem(kind, n)}_blk")
                                for kind, n, v in k.stores if kind != "state" and k.scan in self.store_dims(kind, n, v)})
        scr = list(self.scratch.values()) + list(self.staged.values())
        with w.block(f"def {self.kernel_name}({', '.join(ins + outs + scr)}, *, "
                     f"{', '.join(meta)}):"):
            self.program_ids()
            self.init_states()
            self.static_loads_and_values(body)
            if k.form == "chunked":
                self.chunk(body)
            else:
                self.steps(body)
            self.final_states()

    # ---- program ids ------------------------------------------------------------------------------------
    def program_ids(self):
        k, w = self.plan, self.w
        what = "chunk" if k.form == "chunked" else "block of TB steps"
        w(f"# one program per ({', '.join(k.grid) or 'whole problem'})"
          + (f" x block of ({', '.join(k.split)})" if k.split else "")
          + f"; the last grid axis walks the sequence, one {what} per step, in order")
        pn, N = self.pn, self.size_name
        for j, d in enumerate(k.grid):
            w(f"{pn.dim('i', d)} = pl.program_id({j})")
        for j, d in enumerate(k.split):  # blocks of a blockable tile dim: the BlockSpecs place them
            w(f"{pn.dim('j', d)} = pl.program_id({len(k.grid) + j})  # block of {self.block_name(d)} along {d}")
        # the time block id: a fixed name (reserved in FIXED), apart from the i_<dim> grid ids
        w(f"chunk_id = pl.program_id({self.time_axis()})  # the time block this grid step walks")
        for g, h in k.group_of.items():
            if any(g in i.dims for i in k.inputs):
                w(f"{pn.dim('i', g)} = lax.div({pn.dim('i', h)}, {N(h)} // {N(g)})  # head {h} reads group {g}")

    def time_axis(self) -> int:
        return len(self.plan.grid) + len(self.plan.split)

    # ---- loads and stores -------------------------------------------------------------------------------
    def ref_of(self, leaf) -> str:
        return self.pn.local(leaf.name, "ref")

    def store_ref(self, kind, name) -> str:
        return self.pn.key(("ref", self.store_key(kind, name)), f"{self.store_stem(kind, name)}_ref")

    def read(self, ref, name, step: str | None = None, smem: bool = False) -> str:
        """A block (or, with `step`, one time step of it) as a value of the tile axes the body expects."""
        outer, inner, kind = self.layout_of(name)
        if kind == "scalar" and smem:  # an input of per-program scalars: in SMEM, flattened over its grid dims
            idx, stride = [], ""
            for d in reversed(outer):
                idx.insert(0, f"{self.pn.dim('i', d)}{stride}")
                stride = f"{stride} * {self.size_name(d)}"
            return f"{ref}[{' + '.join(idx) or '0'}]"
        if kind == "scalar":  # a (1, 1) VMEM block
            return f"{ref}[0, 0]"
        if step is not None and self.plan.scan in inner:
            if kind == "tcol":
                return f"{ref}[{step}, 0]"
            return f"{ref}[{step}]"
        return {"tcol": f"{ref}[:, 0]", "row": f"{ref}[0, :]", "full": f"{ref}[...]"}[kind]

    def write(self, ref, name, value, step: str | None = None):
        outer, inner, kind = self.layout_of(name)
        if step is not None and self.plan.scan in inner:
            if kind == "tcol":
                self.w(f"{ref}[pl.ds({step}, 1), :] = jnp.broadcast_to({value}, (1, 1)).astype({ref}.dtype)")
            else:
                rest = ", :" * (len(inner) - 1)
                self.w(f"{ref}[pl.ds({step}, 1){rest}] = ({value})[None].astype({ref}.dtype)")
            return
        v = {"tcol": f"({value})[:, None]", "row": f"({value})[None, :]", "full": f"{value}",
             "scalar": f"jnp.broadcast_to({value}, (1, 1))"}[kind]
        self.w(f"{ref}[...] = {v}.astype({ref}.dtype)")

    def load(self, leaf, step=None):
        body = self.body
        name = leaf.attr("array") or leaf.attr("state")
        ref = self.staged.get(self.ref_of(leaf), self.ref_of(leaf)) if step is not None else self.ref_of(leaf)
        body.bind(leaf.name, f"{self.read(ref, name, step, smem=leaf.op == 'input')}.astype(jnp.float32)",
                  body.axes_of(leaf.dims))

    def store(self, kind, name, value, step=None):
        body = self.body
        dims = self.store_dims(kind, name, value)
        axes = body.axes_of(dims)
        e, ax = body.get(value)
        if ax != axes:
            e = body.reorder(e, ax, axes)
        ref = self.store_ref(kind, name)
        self.write(self.staged.get(ref, ref) if step is not None else ref, self.store_key(kind, name), e, step)

    # ---- state ------------------------------------------------------------------------------------------
    def init_states(self):
        k, w = self.plan, self.w
        if not k.states:
            return
        w("@pl.when(chunk_id == 0)")
        with w.block("def _init():"):
            w("# the state starts from the initial state (zeros unless given), in fp32 VMEM scratch")
            for s in k.states:
                S = s.attr("state")
                w(f"{self.scratch[S]}[...] = {self.ref_of(s)}[...].astype(jnp.float32)")

    def state_value(self, S) -> str:
        return self.read(self.scratch[S], self.store_key("state", S))

    def save_states(self):
        for s in self.plan.states:
            S = s.attr("state")
            self.write(self.scratch[S], self.store_key("state", S), self.body.state_var[S])

    def final_states(self):
        k, w = self.plan, self.w
        if not k.states:
            return
        w(f"@pl.when(chunk_id == pl.num_programs({self.time_axis()}) - 1)")
        with w.block("def _final():"):
            w("# stage output: final states")
            for kind, name, v in k.stores:
                if kind == "state":
                    w(f"{self.store_ref(kind, name)}[...] = {self.scratch[name]}[...]")

    def static_loads_and_values(self, body):
        k, w = self.plan, self.w
        static = [i for i in k.inputs if k.scan not in i.dims]
        if static:
            w("# inputs without the scan dim (their blocks stay resident across the sequence)")
        for leaf in static:
            self.load(leaf)
        for i in k.hoisted:
            body.instr(i)
        for kind, name, v in k.stores:  # values without the scan dim that the post-kernel code reads
            if kind == "tmp" and k.scan not in self.store_dims(kind, name, v) and v in body.vals:
                self.store(kind, name, v)
        for s in k.states:
            S = s.attr("state")
            body.state_var[S] = self.pn.key(("state", S), f"state_{self.pn(s.name)}")
            body.vals[s.name] = (body.state_var[S], body.state_axes(S))

    def timed_stores(self, step=None):
        k = self.plan
        for kind, name, v in k.stores:
            if kind != "state" and k.scan in self.store_dims(kind, name, v):
                self.store(kind, name, v, step)

    def chunk(self, body):
        k, w = self.plan, self.w
        w("TRIL = rt.tril(Q)  # [t, s]: s <= t")
        if any(i.op == "chunk.output" and i.attr("when") == "prev" for i in k.body):
            w("TRIL_STRICT = rt.tril(Q, strict=True)  # [t, s]: s < t")
        w(f"valid = chunk_id * Q + lax.iota(jnp.int32, Q) < {self.size_name(k.scan)}  # steps past the end are padding")
        w("valid_i = valid.astype(jnp.int32)  # masks broadcast as int32 (Mosaic cannot reshape i1 vectors)")
        for s in k.states:
            S = s.attr("state")
            w(f"{body.state_var[S]} = {self.state_value(S)}  # the state entering this chunk")
        for leaf in (i for i in k.inputs if k.scan in i.dims):
            self.load(leaf)
        stage = None
        for i in k.body:
            st = i.attr("stage")
            if st != stage:
                w(f"# stage {st}")
                stage = st
            body.instr(i)
        self.timed_stores()
        for i in k.body:
            if i.op == "chunk.states":
                w(f"# stage chunk_state + state_passing ({i.attr('state')})")
                body.state_update(i)
        self.save_states()

    def steps(self, body):
        k, w = self.plan, self.w
        svars = [body.state_var[s.attr("state")] for s in k.states]
        carry = ", ".join(svars) + ("," if len(svars) == 1 else "")
        ins = [(r, b) for r, b in self.staged.items() if r in {self.ref_of(i) for i in k.inputs}]
        if ins:
            w("# this block of TB steps in fp32 VMEM")
        for ref, blk in ins:
            w(f"{blk}[...] = {ref}[...].astype(jnp.float32)")
        with w.block("def step(t_i, carry):"):
            if svars:
                w(f"{carry} = carry")
            w(f"valid = chunk_id * TB + t_i < {self.size_name(k.scan)}  # steps past the end are padding")
            for leaf in (i for i in k.inputs if k.scan in i.dims):
                self.load(leaf, "t_i")
            w("# stage step")
            for i in k.body:
                body.instr(i)
            self.timed_stores("t_i")
            kept = {v: self.pn.key(("kept", v), f"{v}_kept") for v in svars}
            for v in svars:
                w(f"{kept[v]} = {v}")
            body.step_updates()
            for v in svars:
                w(f"{v} = jnp.where(valid, {v}, {kept[v]})  # padding leaves the state as it is")
            w(f"return ({carry})" if svars else "return carry")
        init = ", ".join(self.state_value(s.attr("state")) for s in k.states) + ("," if len(svars) == 1 else "")
        if svars:
            w(f"{carry} = lax.fori_loop(0, TB, step, ({init}))")
            self.save_states()
        else:
            w("lax.fori_loop(0, TB, step, 0)")
        for ref, blk in self.staged.items():
            if (ref, blk) not in ins:
                w(f"{ref}[...] = {blk}[...].astype({ref}.dtype)")


class PallasTpuTarget(KernelTarget):
    emitter = PallasEmitter
    name = "tpu"
    scalar_chunk = 128
    chunk_multiple = 8  # chunks are the kernel's time blocks: a multiple of 8 rows (TPU sublanes)
