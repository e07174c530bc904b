"""The walk of one kernel program over the sequence, written once for every kernel target.

What a program does is the same on Triton and Pallas TPU: load the inputs without the scan dim and compute the
values that need no time step (once), set up the running state, then per chunk (or per step) load the timed
inputs, run the IR's stages in order, store the timed results and update the state, and at the end store the final
state. The targets differ in how each of these is spelled, which are the hooks below: program ids, loads and
stores (pointer arithmetic vs BlockSpec'd refs), the loop (a Triton `for` over chunks vs Pallas' time grid axis,
whose running state lives in VMEM scratch between grid steps), and where the state starts and ends.

Roles (kernel_plan.Schedule): `walk` walks the whole sequence from the initial states; `segment_states` (a) walks
its segment's chunks from a zero state computing only what the state update needs, plus the segment's total
log-decay (and count of negative decay factors) per state; `segment_outputs` (c) walks its segment from the
incoming state S_in the scan across segments gave it, writing the outputs; `rows` is the post-kernel norm.

Outs indexed by chunk (dim `t#`, targets/base.py chunk_outs: the state entering each chunk) are stored inside the
chunk loop before the chunk's state update, from the on-chip state variable, at the chunk's index (`chunk_stores`):
by the walk and by the segment outputs walk (c), at the global chunk index; segment states walk (a) stores none.
Inputs indexed by chunk (`chunk_inputs`: dim `t#`, e.g. the forward's states entering each chunk) are neither
loaded once nor per step: each chunk loads its own tile at its start (`chunk_loads`), at the same chunk index as
the stores (a reverse-time program's k-th chunk reads entry nc-1-k); the values computed from them are per chunk.
"""
from __future__ import annotations

from contextlib import contextmanager

from ssmc.passes.chunk import chunk_dim


class KernelWalk:
    """Mixin of a target's kernel writer: `walk()` writes a kernel's body through the target's hooks."""

    plan = body = w = pn = None  # set by the writer

    # ---- hooks (each target) --------------------------------------------------------------------------------
    def program_ids(self):
        raise NotImplementedError

    def offsets(self):
        """Index tiles of the tile dims (Triton's aranges); nothing where blocks place the tiles."""

    def begin(self):
        """Before anything else runs in a program: where the running state is set up outside the walk."""

    def load(self, leaf, time):
        raise NotImplementedError

    def store(self, kind, name, value, time):
        raise NotImplementedError

    def start_states(self):
        """Bind every state's on-chip variable (body.state_var) before the loop."""
        raise NotImplementedError

    @contextmanager
    def chunk_loop(self):
        """The loop over chunks: code inside runs once per chunk with `valid` set (steps past the end are off)."""
        raise NotImplementedError
        yield

    @contextmanager
    def step_loop(self):
        raise NotImplementedError
        yield

    def chunk_time(self):
        """The time index expression of a chunk's loads and stores (None: the block is the chunk)."""
        return None

    @contextmanager
    def update_guard(self, updates: bool):
        """Around a chunk's state update: a target may skip it where nothing reads the state after it."""
        yield

    def add_totals(self):
        """segment_states: add this chunk's log-decay (and negative factors) to the segment's totals."""
        raise NotImplementedError

    def step_update(self):
        self.body.step_updates()

    def end(self):
        """After the loop: final states (walk), the segment's state and totals (segment_states)."""
        raise NotImplementedError

    # ---- the walk -------------------------------------------------------------------------------------------
    def walk(self):
        k, w, body = self.plan, self.w, self.body
        self.program_ids()
        self.offsets()
        self.begin()
        cd = chunk_dim(k.scan)
        static = [i for i in k.inputs if k.scan not in i.dims and cd not in i.dims]
        if static and k.form != "rows":
            w("# inputs without the scan dim: loaded once")
        for leaf in static:
            self.load(leaf, None)
        for i in k.hoisted:
            body.instr(i)
        for kind, name, v in k.stores:  # results without the scan dim (values of the post-kernel code, outs)
            if kind in ("out", "tmp") and k.scan not in self.store_dims(kind, name, v) and v in body.vals:
                self.store(kind, name, v, None)
        if k.form == "rows":
            return
        self.start_states()
        if k.form == "chunked":
            with self.chunk_loop():
                self.chunk_stages(self.chunk_time())
        else:
            with self.step_loop():
                for leaf in self.timed_inputs():
                    self.load(leaf, "t_i")
                self.w("# stage step")
                for i in k.body:
                    body.instr(i)
                self.timed_stores("t_i")
                self.step_update()
        self.end()

    def timed_inputs(self):
        return [i for i in self.plan.inputs if self.plan.scan in i.dims]

    def chunk_inputs(self):
        """Inputs indexed by chunk (dim t#): one tile per chunk, loaded at the chunk's start."""
        cd = chunk_dim(self.plan.scan)
        return [i for i in self.plan.inputs if cd in i.dims]

    def chunk_index_used(self) -> bool:
        """Whether the chunk loop needs this chunk's index along t# (stores or loads indexed by chunk)."""
        return bool(self.chunk_index_stores() or self.chunk_inputs())

    def chunk_loads(self, time):
        """Inputs indexed by chunk: this chunk's tile (the target's load addresses it by the chunk index); and
        the values of the state entering this chunk (chunk.pass: its on-chip variable until the chunk's update)."""
        k, body = self.plan, self.body
        loads = self.chunk_inputs()
        if loads:
            self.w("# inputs indexed by chunk: this chunk's tile")
        for leaf in loads:
            self.load(leaf, time, chunk=True)
        for i in k.body:
            if i.op == "chunk.pass" and i.attr("state") in body.state_var:
                S = i.attr("state")
                body.vals[i.name] = (body.state_var[S], body.state_axes(S))

    def timed_store_list(self) -> list[tuple[str, str, str]]:
        k = self.plan
        return [(kind, name, v) for kind, name, v in k.stores
                if kind in ("out", "tmp") and k.scan in self.store_dims(kind, name, v)]

    def timed_stores(self, time):
        for kind, name, v in self.timed_store_list():
            self.store(kind, name, v, time)

    def chunk_stages(self, time):
        """One chunk: its loads, the IR's stages in order with each timed out stored as soon as it is computed,
        then the fused state update. The order keeps few tiles live at once (registers): a chunk.across of a
        tile indexed by chunk and the entering state's store come first, an out's fp32 tile dies at its store."""
        k, w, body = self.plan, self.w, self.body
        timed = self.timed_store_list()

        def run(i):  # the instruction, then the stores of its value
            body.instr(i)
            for kind, name, v in timed:
                if v == i.name:
                    self.store(kind, name, v, time)
        self.chunk_loads(time)
        early = [i for i in k.body if i.op == "chunk.across" and all(a in body.vals for a in i.args)]
        for i in early:
            run(i)
        self.chunk_stores(time, entering=True)
        for leaf in self.timed_inputs():
            self.load(leaf, time)
        stage = None
        for i in k.body:
            if i in early:
                continue
            s = i.attr("stage")
            if s != stage:
                w(f"# stage {s}")
                stage = s
            run(i)
        done = {i.name for i in k.body}
        for kind, name, v in timed:
            if v not in done:  # a value not computed per chunk (an input or a hoisted value)
                self.store(kind, name, v, time)
        self.chunk_stores(time, entering=False)
        updates = [i for i in k.body if i.op == "chunk.states"]
        with self.update_guard(bool(updates)):
            for i in updates:
                w(f"# stage chunk_state + state_passing ({i.attr('state')})")
                body.state_update(i)
        if k.totals:
            self.add_totals()

    def chunk_index_stores(self) -> list[tuple[str, str, str]]:
        """The stores of outs indexed by chunk (dim t#): (kind, name, IR value), the value a chunk.pass."""
        cd = chunk_dim(self.plan.scan)
        return [(kind, name, v) for kind, name, v in self.plan.stores
                if kind == "out" and cd in self.store_dims(kind, name, v)]

    def chunk_stores(self, time, entering: bool):
        """Outs indexed by chunk, stored at this chunk's index along t# (the target's store addresses it):
        entering, the states entering this chunk (their on-chip variables, before the chunk's state update); else
        the per-chunk values the chunk computed."""
        k, body = self.plan, self.body
        stores = [(kind, name, v) for kind, name, v in self.chunk_index_stores()
                  if (k.by()[v].op == "chunk.pass") == entering]
        if stores:
            what = "the state entering this chunk" if entering else "values of this chunk"
            self.w(f"# outs indexed by chunk: {what}")
        for kind, name, v in stores:
            if k.by()[v].op == "chunk.pass":
                S = k.by()[v].attr("state")
                body.vals[v] = (body.state_var[S], body.state_axes(S))
            self.store(kind, name, v, time)  # else a per-chunk value the chunk computed

    # ---- what the hooks share -------------------------------------------------------------------------------
    def state_var(self, s) -> str:
        """The variable holding state leaf `s` on chip (registered with the tile body)."""
        S = s.attr("state")
        var = self.pn.key(("state", S), f"state_{self.pn(s.name)}")
        self.body.state_var[S] = var
        self.body.vals[s.name] = (var, self.body.state_axes(S))
        return var

    def total_vars(self) -> list[tuple[str, str, tuple]]:
        """(total's variable, the per-chunk value it sums, its axes) of each segment total."""
        out = []
        for ssa in self.plan.totals:
            axes = tuple(a for a in self.body.sort(self.body.axes_of(self.plan.by()[ssa].dims)) if a != self.plan.scan)
            var = self.pn.local(ssa, "total")
            self.body.vals[f"{ssa}:total"] = (var, axes)
            out.append((var, self.pn.local(ssa, "last"), axes))
        return out

    def role_comment(self) -> str:
        k = self.plan
        return {"segment_states": "schedule step (a): this segment's state from a zero state, and its total "
                                  "log-decay; no outputs",
                "segment_outputs": "schedule step (c): this segment's outputs, from the state entering it (S_in)",
                "rows": "the post-kernel norm over a group of heads"}.get(k.role, "")
