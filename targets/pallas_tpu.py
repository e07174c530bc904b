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


from contextlib import contextmanager

from ssmc.ops import spellings

from .kernel_body import Dialect, TileEmitter
from .kernel_launch import KernelTarget, LauncherWriter
from .kernel_plan import SEG, SEG_CHUNKS
from .kernel_walk import KernelWalk
from .pallas_runtime import kernel_layout


class PallasDialect(Dialect):
    """jax.numpy spellings (the defaults), with what Mosaic lowers for matmuls, causal masks and cumsum."""
    UNARY = spellings("pallas", 1)  # ssmc/ops.py (jnp.sign spelled as comparisons: Mosaic)

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


class PallasEmitter(KernelWalk, LauncherWriter):
    target = "tpu"
    runtime = "pallas_runtime"
    imports = ("from jax.experimental import pallas as pl",)
    handle = "ref"
    FIXED = ("pl", "Q", "TB", "MM", "PREC", "chunk_id", "TRIL", "TRIL_STRICT", "valid", "valid_i", "step", "carry",
             "t_i", "_init", "_final", "packed_ref", "PACKED", "seq_id", "n_blocks", "_start")
    packed_calls = True

    def layout_of(self, name):
        k = self.plan
        return kernel_layout(k.grid, k.tile, k.scan, k.group_of, self.arrays()[name])

    def carried_layout(self, S):
        k = self.plan
        return kernel_layout(k.grid, k.tile, k.scan, k.group_of, k.decl[S])

    def kernel(self):
        k, w = self.plan, self.w
        self.body = PallasTiles(k, PallasDialect(), w, self.pn)
        ins = [self.ref_of(i) for i in k.leaves()] + (["packed_ref"] if self.batch else [])
        outs = [self.store_ref(kind, n) for kind, n, _ in k.stores]
        self.scratch = {s.attr("state"): self.pn.local(s.attr("state"), "scr") for s in k.states}
        meta = [self.size_name(d) for d in self.dims()] + [self.block_name(d) for d in k.tile]
        meta += [self.size_name(SEG_CHUNKS)] if k.segmented else []
        meta += ["Q" if k.form == "chunked" else "TB", "MM", "PREC"] + (["PACKED"] if self.batch else [])
        # sequential form: each time block is staged through fp32 VMEM (one step's row of a 16-bit block is not
        # addressable on its own); same order as the launcher's scratch shapes
        self.staged = {}
        if k.form == "sequential":
            self.staged = {self.ref_of(i): self.pn.local(i.name, "blk") for i in k.inputs if k.scan in i.dims}
            self.staged.update({self.store_ref(kind, n): self.pn.key(("blk", self.store_key(kind, n)),
                                                                     f"{self.store_stem(kind, n)}_blk")
                                for kind, n, v in k.stores if kind != "state" and k.scan in self.store_dims(kind, n, v)})
        scr = list(self.scratch.values()) + list(self.staged.values())
        w(f"def {self.kernel_name}(")  # one parameter a line
        w.level += 1
        for a in ins + outs + scr + ["*"] + meta:
            w(f"{a},")
        w.level -= 1
        with w.block("):"):
            if self.role_comment():
                w(f"# {self.role_comment()}")
            self.walk()

    # ---- program ids ------------------------------------------------------------------------------------
    def program_ids(self):
        k, w = self.plan, self.w
        what = "chunk" if k.form == "chunked" else "block of TB steps"
        w(f"# one program per ({', '.join(self.grid_names()) or 'whole problem'})"
          + (f" x block of ({', '.join(k.split)})" if k.split else "")
          + f"; the last grid axis walks the {'segment' if k.segmented else 'sequence'}, one {what} per step, "
            f"in order")
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
    ref_of = LauncherWriter.leaf_handle
    store_ref = LauncherWriter.store_handle

    def read(self, ref, lay, step: str | None = None, smem: bool = False) -> str:
        """A block (or, with `step`, one time step of it) as a value of the tile axes the body expects."""
        outer, inner, kind = lay
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

    def write(self, ref, lay, value, step: str | None = None):
        outer, inner, kind = lay
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

    def load(self, leaf, time=None, chunk: bool = False):
        """A leaf's block as fp32: once, one step of its time block, or (chunk: an input indexed by chunk, in VMEM)
        this chunk's block, which its BlockSpec picks by the time grid axis (pallas_runtime._index_map)."""
        body = self.body
        name = leaf.attr("array") or leaf.attr("state")
        if chunk:
            time = None
        ref = self.staged.get(self.ref_of(leaf), self.ref_of(leaf)) if time is not None else self.ref_of(leaf)
        smem = leaf.op == "input" and not chunk
        body.bind(leaf.name, f"{self.read(ref, self.layout_of(name), time, smem=smem)}"
                             f".astype(jnp.float32)", body.axes_of(leaf.dims))

    def store(self, kind, name, value, time=None):
        body = self.body
        dims = self.store_dims(kind, name, value)
        axes = body.axes_of(dims)
        e, ax = body.get(value)
        if ax != axes:
            e = body.reorder(e, ax, axes)
        ref = self.store_ref(kind, name)
        self.write(self.staged.get(ref, ref) if time is not None else ref, self.layout_of(self.store_key(kind, name)),
                   e, time)

    # ---- the walk's hooks: the state lives in VMEM scratch across the time grid axis ------------------------
    def begin(self):
        k, w = self.plan, self.w
        totals = [(kind, name) for kind, name, _ in k.stores if kind in ("decay", "negs")]
        if not k.states:
            return
        if self.batch:
            with w.block("if PACKED:"):
                self.packed_begin()
            with w.block("else:"):
                self.first_block(totals)
        else:
            self.first_block(totals)

    def packed_begin(self):
        """Packed sequences: block chunk_id holds steps of sequence seq_id only (packed_ref: per block its valid
        steps, whether it starts its sequence, the sequence); the state restarts at a sequence's first block."""
        k, w = self.plan, self.w
        w(f"n_blocks = pl.num_programs({self.time_axis()})")
        w("seq_id = packed_ref[2 * n_blocks + chunk_id]  # the sequence this block belongs to")
        w("@pl.when(chunk_id == 0)")
        with w.block("def _start():"):
            w("# an empty sequence ends where it starts: every final state begins as the initial one")
            for kind, name, _ in k.stores:
                if kind == "state":
                    s = next(x for x in k.states if x.attr("state") == name)
                    w(f"{self.store_ref(kind, name)}[...] = {self.ref_of(s)}[...].astype(jnp.float32)")
        w("@pl.when(packed_ref[n_blocks + chunk_id] != 0)")
        with w.block("def _init():"):
            w("# a sequence's first block: the state starts from that sequence's initial state")
            for s in k.states:
                w(f"{self.scratch[s.attr('state')]}[...] = {self.ref_of(s)}.at[seq_id][...].astype(jnp.float32)")

    def first_block(self, totals):
        k, w = self.plan, self.w
        w("@pl.when(chunk_id == 0)")
        with w.block("def _init():"):
            w({"input": "# the state starts from the initial state (zeros unless given), in fp32 VMEM scratch",
               "zeros": "# the segment's state starts from zero, in fp32 VMEM scratch; its totals from 0",
               "segment": "# the state starts from the state entering the segment (S_in), in fp32 VMEM scratch"}
              [k.state_from])
            for s in k.states:
                scr = self.scratch[s.attr("state")]
                w(f"{scr}[...] = " + (f"jnp.zeros({scr}.shape, jnp.float32)" if k.state_from == "zeros"
                                      else f"{self.ref_of(s)}[...].astype(jnp.float32)"))
            for kind, name in totals:  # sums over the segment's chunks, in their (resident) output blocks
                ref = self.store_ref(kind, name)
                w(f"{ref}[...] = jnp.zeros({ref}.shape, {ref}.dtype)")

    def start_states(self):
        for s in self.plan.states:
            self.state_var(s)

    def state_value(self, S) -> str:
        return self.read(self.scratch[S], self.carried_layout(S))

    def save_states(self):
        for s in self.plan.states:
            S = s.attr("state")
            self.write(self.scratch[S], self.carried_layout(S), self.body.state_var[S])

    @contextmanager
    def chunk_loop(self):
        k, w, body = self.plan, self.w, self.body
        w("TRIL = rt.tril(Q)  # [t, s]: s <= t")
        if any(i.op == "chunk.output" and i.attr("when") == "prev" for i in k.body):
            w("TRIL_STRICT = rt.tril(Q, strict=True)  # [t, s]: s < t")
        chunk = (f"({self.pn.dim('i', SEG)} * {self.size_name(SEG_CHUNKS)} + chunk_id)" if k.segmented
                 else "chunk_id")
        valid = f"{chunk} * Q + lax.iota(jnp.int32, Q) < {self.size_name(k.scan)}"
        if self.batch:  # packed: the block's own count of steps
            valid = f"(lax.iota(jnp.int32, Q) < packed_ref[chunk_id]) if PACKED else ({valid})"
        w(f"valid = {valid}  # steps past the end are padding")
        w("valid_i = valid.astype(jnp.int32)  # masks broadcast as int32 (Mosaic cannot reshape i1 vectors)")
        for s in k.states:
            S = s.attr("state")
            w(f"{body.state_var[S]} = {self.state_value(S)}  # the state entering this chunk")
        yield
        self.save_states()

    @contextmanager
    def step_loop(self):
        k, w, body = self.plan, self.w, self.body
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
            valid = f"chunk_id * TB + t_i < {self.size_name(k.scan)}"
            if self.batch:  # packed: the block's own count of steps
                valid = f"(t_i < packed_ref[chunk_id]) if PACKED else ({valid})"
            w(f"valid = {valid}  # steps past the end are padding")
            yield
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

    def step_update(self):
        w, body = self.w, self.body
        svars = [body.state_var[s.attr("state")] for s in self.plan.states]
        kept = {v: self.pn.key(("kept", v), f"{v}_kept") for v in svars}
        for v in svars:
            w(f"{kept[v]} = {v}")
        body.step_updates()
        for v in svars:
            w(f"{v} = jnp.where(valid, {v}, {kept[v]})  # padding leaves the state as it is")

    def add_totals(self):
        last = {f"{ssa}:total": lst for ssa, (_, lst, _) in zip(self.plan.totals, self.total_vars())}
        for kind, name, v in self.plan.stores:
            if kind in ("decay", "negs"):
                ref, lay = self.store_ref(kind, name), self.layout_of(name)
                self.w("# the segment's total so far, in its output block (resident across the segment's chunks)")
                self.write(ref, lay, f"{self.read(ref, lay)} + {last[v]}")

    def end(self):
        k, w = self.plan, self.w
        if not k.states:
            return
        finals = [(kind, name, v) for kind, name, v in k.stores if kind in ("state", "segment")]
        if not finals:
            return  # segment outputs: the scan across segments gives the final states
        if self.batch:
            with w.block("if PACKED:"):
                w("# this sequence's state so far: the write at its last block stays")
                for kind, name, v in finals:
                    w(f"{self.store_ref(kind, name)}.at[seq_id][...] = {self.scratch[name]}[...]")
            with w.block("else:"):
                self.last_block(finals)
        else:
            self.last_block(finals)

    def last_block(self, finals):
        k, w = self.plan, self.w
        w(f"@pl.when(chunk_id == pl.num_programs({self.time_axis()}) - 1)")
        with w.block("def _final():"):
            w("# stage output: final states" if not k.segmented else "# stage output: the segment's state")
            for kind, name, v in finals:
                S = v if kind == "segment" else name
                w(f"{self.store_ref(kind, name)}[...] = {self.scratch[S]}[...]")


class PallasTpuTarget(KernelTarget):
    emitter = PallasEmitter
    name = "tpu"
    scalar_chunk = 128
    chunk_multiple = 8  # chunks are the kernel's time blocks: a multiple of 8 rows (TPU sublanes)
    lockstep_interpreter = True  # pltpu.InterpretParams simulates the devices' DMAs and semaphores together
