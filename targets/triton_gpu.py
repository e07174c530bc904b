"""Triton GPU target: one @triton.jit kernel per program plus a JAX launcher (jax-triton on GPUs, Triton's
interpreter on CPU with interpret=True).

The kernel runs one program per index of the plan's grid dims (batch, heads) and per block of the blockable tile
dims. Chunked programs walk the chunks of the sequence in order with the state in registers: per chunk the IR's
stages run back to back (dt prologue, in-chunk cumulative decay, chunk output with the in-chunk quadratic part on
tensor cores, D skip / gate epilogue, the state update) - so nothing but inputs, outputs and final states touches
device memory. Sequential programs walk time step by step the same way.
"""
from __future__ import annotations


from contextlib import contextmanager, nullcontext

from ssmc.ops import spellings
from ssmc.passes.chunk import chunk_dim

from .kernel_body import Dialect, TileEmitter
from .kernel_launch import KernelTarget, LauncherWriter
from .kernel_plan import SEG, SEG_CHUNKS
from .kernel_walk import KernelWalk
from .writer import py_name


_F32 = ".to(tl.float32)"  # how a loaded tile is widened where it is used


class TritonDialect(Dialect):
    UNARY, BINARY = spellings("triton", 1), spellings("triton", 2)  # ssmc/ops.py

    def pow(self, a, b, b_const):
        if b_const is not None and float(b_const).is_integer() and 1 <= b_const <= 4:
            return " * ".join([f"({a})"] * int(b_const))
        return f"tl.exp(({b}) * tl.log({a}))"

    def where(self, c, a, b):
        return f"tl.where({c}, {a}, {b})"

    def minimum(self, a, b):
        return f"tl.minimum({a}, {b})"

    def sum(self, x, axis):
        return f"tl.sum({x}, axis={axis})"

    def cumsum0(self, x, ndim):
        return f"tl.cumsum({x}, axis=0)"

    def floor(self, x):
        return f"tl.floor({x})"

    def dot(self, a, b, ca, cb):
        a, b = (x[:-len(_F32)] if x.endswith(_F32) else x for x in (a, b))  # a loaded tile: no fp32 round trip
        A = f"({a})" if ca == 1 else f"tl.trans({a})"
        B = f"({b})" if cb == 0 else f"tl.trans({b})"
        return f"tl.dot({A}.to(MM), {B}.to(MM), input_precision=PREC)"

    guarded_subchunks = True  # scalar `if` in kernels: key-/value-wise chunks as matmuls under a guard

    def static_range(self, n):
        return f"tl.static_range({n})"

    def max(self, x, axis):
        return f"tl.max({x}, axis={axis})"

    def bdot(self, a, b, ca, cb):  # tl.dot on 3-D tiles is batched over the leading axis
        A = f"({a})" if ca == 2 else f"tl.permute({a}, (0, 2, 1))"
        B = f"({b})" if cb == 1 else f"tl.permute({b}, (0, 2, 1))"
        return f"tl.dot({A}.to(MM), {B}.to(MM), input_precision=PREC)"

    def reshape(self, x, shape):
        return f"tl.reshape({x}, ({', '.join(map(str, shape))},))"

    def iota(self, shape, dim):  # a 1-D range, broadcast by indexing
        idx = ", ".join(":" if k == dim else "None" for k in range(len(shape)))
        return f"tl.arange(0, {shape[dim]})[{idx}]"

    def permute(self, x, perm):
        return f"tl.trans({x})" if list(perm) == [1, 0] else f"tl.permute({x}, {tuple(perm)})"

    def broadcast_to(self, x, shape):  # x may be a Python float (a spec constant)
        return f"(tl.zeros(({', '.join(shape)},), tl.float32) + {x})"

    def positions(self):
        return "in_chunk"

    def causal(self, strict):
        return f"(in_chunk[:, None] {'>' if strict else '>='} in_chunk[None, :])"

    def needs_mask(self, d):
        return True

    def mask(self, offsets, size):
        return f"({offsets} < {size})"


class TritonEmitter(KernelWalk, LauncherWriter):
    target = "triton"
    runtime = "triton_runtime"
    imports = ("import triton", "import triton.language as tl")
    FIXED = ("triton", "tl", "Q", "MM", "PREC", "pid", "c", "tt", "ttc", "valid", "t_i", "in_chunk",
             "cu_seqlens_ptr", "PACKED", "seq_start", "seq_len", "row", "I64", "seg_end", "GIVEN_STATES", "i_enter")
    strides = True
    row_kernels = True
    handle = "ptr"
    packed_calls = True
    reverse_scan = True  # a reverse-time program's walk reads step NT-1-t at its step t (address)

    def kernel(self):
        k, w = self.plan, self.w
        self.body = TileEmitter(k, TritonDialect(), w, self.pn)
        # runtime sizes sit between the input and output pointers: jax-triton passes scalars where they stand
        # among the inputs and appends the output pointers
        runtime = self.runtime_args()
        args = ([self.ptr_of(i) for i in k.leaves()] + (["cu_seqlens_ptr"] if self.batch else []) + runtime
                + [self.store_ptr(kd, n) for kd, n, _ in k.stores])
        consts = self.constexprs() + ["I64"] + (["PACKED"] if self.batch else []) + (
            ["GIVEN_STATES"] if self.plan.role == "segment_outputs" else [])
        # no specialisation on the runtime sizes' values (divisibility by 16, == 1): one compile serves all lengths
        w(f"@triton.jit(do_not_specialize={runtime!r})" if runtime else "@triton.jit")
        w(f"def {self.kernel_name}(")  # one parameter a line
        w.level += 1
        for a in args + [f"{c}: tl.constexpr" for c in consts]:
            w(f"{a},")
        w.level -= 1
        with w.block("):"):
            if self.role_comment():
                w(f"# {self.role_comment()}")
            strides = self.computed_strides()
            if strides:
                w("# strides spanning a runtime size (batch, heads, length): computed, not compiled in")
            for name, e in strides:
                if self.batch and f"{self.size_name(self.batch)} *" in e and self.timed(name):
                    # packed sequences: arrays with the scan dim hold a batch of one
                    with w.block("if PACKED:"):
                        w(f"{name} = {e.replace(self.size_name(self.batch) + ' *', '1 *')}")
                    with w.block("else:"):
                        w(f"{name} = {e}")
                else:
                    w(f"{name} = {e}")
            self.walk()

    def timed(self, stride: str) -> bool:
        """Whether a computed stride belongs to an array with the scan dim."""
        return any(self.stride_name(a, d) == stride for a, ds in self.arrays().items() if self.plan.scan in ds
                   for d in ds)

    ptr_of = LauncherWriter.leaf_handle
    store_ptr = LauncherWriter.store_handle

    # ---- program ids and offsets ------------------------------------------------------------------------
    def program_ids(self):
        k, w = self.plan, self.w
        if k.group_tile:
            (h, g), = k.group_tile.items()
            w(f"# the epilogue after the main kernel: {self.size_name(h)} is the number of heads per group {g}")
        w(f"# one program per ({', '.join(self.grid_names()) or 'whole problem'})"
          + (f" x block of ({', '.join(k.split)})" if k.split else ""))
        pn, N = self.pn, self.size_name
        # one axis of programs, decomposed fastest first: the blocks of the split dims, the grid dims from the last
        # (heads) to the first, the segment (or chunk) slowest. Programs running at once then read the same
        # chunk's rows: B and C once for every head from L2, each time row's heads side by side.
        order = [("j", d) for d in reversed(k.split)] + [("i", d) for d in reversed(k.grid) if d != SEG]
        order += [("i", SEG)] if SEG in k.grid else []
        if order:
            w("pid = tl.program_id(0)")
            with w.block("if I64:"):
                w("pid = pid.to(tl.int64)  # 64-bit offsets: an array holds 2^31 entries or more")
            rest = "pid"
            for n, (kind, d) in enumerate(order):
                name = pn.dim(kind, d)
                if n == len(order) - 1:
                    w(f"{name} = {rest}")
                    continue
                size = f"(({N(d)} + {self.block_name(d)} - 1) // {self.block_name(d)})" if kind == "j" else N(d)
                w(f"{name} = {rest} % {size}")
                nxt = pn.temp(f"{rest}_{'seg' if d == SEG else py_name(d)}")
                w(f"{nxt} = {rest} // {size}")
                rest = nxt
        for g, h in k.group_of.items():
            if any(g in ds for ds in self.arrays().values()) and h in k.grid:
                w(f"{pn.dim('i', g)} = {pn.dim('i', h)} // ({N(h)} // {N(g)})  # head {h} reads group {g}")
        if self.batch:
            i_b = pn.dim("i", self.batch)
            with w.block("if PACKED:"):
                w(f"# packed sequences: this program walks sequence {i_b}, steps cu[{i_b}] .. cu[{i_b}+1]-1 of the "
                  "batch of one")
                w(f"seq_start = tl.load(cu_seqlens_ptr + {i_b}) + pid * 0  # pid's width (I64)")
                w(f"seq_len = tl.load(cu_seqlens_ptr + {i_b} + 1) - seq_start")
                w("row = 0  # the batch entry of the arrays with the scan dim")
            with w.block("else:"):
                w("seq_start = pid * 0  # pid's width (I64)")
                w(f"seq_len = {N(k.scan)}")
                w(f"row = {i_b}")

    def offsets(self):
        k, w = self.plan, self.w
        for d in k.tile:
            B = self.block_name(d)
            start = f"{self.pn.dim('j', d)} * {B} + " if d in k.split else ""
            w(f"{self.pn.dim('o', d)} = {start}tl.arange(0, {B})  # entries past {self.size_name(d)} are padding: "
              f"loaded as 0, never stored")
        if k.form == "chunked":
            # not o_<dim> like the tile offsets: a dim may be called t
            w("in_chunk = tl.arange(0, Q)  # positions within a chunk")

    # ---- loads and stores -------------------------------------------------------------------------------
    def address(self, arr: str, ptr: str, dims, axes, time: str | None) -> str:
        """Pointer tile of array `arr` (declared dims) at this program's grid index, over `axes`."""
        terms = [ptr]
        k = self.plan
        pn = self.pn
        for d in dims:
            st = self.stride_name(arr, d)
            if d == k.scan:
                if k.p.reverse:  # a reverse-time program: its step t is the sequence's step NT-1-t
                    time = f"({'seq_len' if self.batch else self.size_name(k.scan)} - 1 - {time})"
                idx = time
                if self.batch:
                    idx = f"(seq_start + {time})"
                    if k.scan in axes and k.form == "chunked":
                        idx = self.body.bc(idx, (k.scan,), axes)
                elif k.scan in axes and k.form == "chunked":  # the scan dim, whatever the spec calls it
                    idx = self.body.bc(time, (k.scan,), axes)
            elif self.batch and d == self.batch and k.scan in dims:
                idx = "row"
            elif d == chunk_dim(k.scan):  # an out / input indexed by chunk: this chunk's index (chunk_loop)
                idx = pn.dim("i", d)
            elif d == SEG and self.per_chunk:  # the states entering each chunk: this chunk's (chunk_loop)
                idx = "i_enter"
            elif d == SEG and k.p.reverse:  # a reverse walk's k-th segment is entry N-1-k: forward-time order
                idx = f"({self.size_name(SEG)} - 1 - {pn.dim('i', SEG)})"
            elif d in k.group_tile:  # the tile spans the heads of group i_g
                g = k.group_tile[d]
                idx = self.body.bc(f"({pn.dim('i', g)} * {self.size_name(d)} + {pn.dim('o', d)})", (d,), axes)
            elif d in k.tile:  # unclamped offsets keep the loads contiguous (vectorised); padding is masked
                idx = self.body.bc(pn.dim("o", d), (d,), axes)
            else:
                idx = pn.dim("i", d)
            terms.append(f"{idx} * {st}")
        return " + ".join(terms)

    def load(self, leaf, time, chunk: bool = False):
        """A leaf's tile: once (time None), at this chunk's / step's rows (time), or (chunk: an input indexed by
        chunk) this chunk's entry along t#."""
        k, body = self.plan, self.body
        name = leaf.attr("array") or leaf.attr("state")
        axes = body.axes_of(leaf.dims)
        addr = self.address(name, self.ptr_of(leaf), k.decl[name], axes, None if chunk else time)
        mask = [body.bc(body.mask(d), (d,), axes) for d in axes if d in k.tile]
        m = f", mask={' & '.join(mask)}, other=0.0" if mask else ""
        # the tile stays in its own dtype (a bf16 tile takes half the registers); a use converts it to fp32 where
        # it is used (elementwise math), a dot takes it as it is (Dialect.dot drops the conversion)
        var = body.bind(leaf.name, f"tl.load({addr}{m})", axes)
        body.vals[leaf.name] = (f"{var}{_F32}", body.vals[leaf.name][1])
        body.zero_padded.add(body.get(leaf.name)[0])  # padded entries read as 0: no mask needed in sums

    def store(self, kind, name, value, time):
        k, body, w = self.plan, self.body, self.w
        dims = self.store_dims(kind, name, value)
        axes = body.axes_of(dims)
        e, ax = body.get(value)
        if ax != axes:
            e = body.reorder(e, ax, axes)
        mask = [body.bc(body.mask(d), (d,), axes) for d in axes if d in k.tile]
        if k.scan in axes:
            mask.insert(0, body.bc("valid", (k.scan,), axes))
        elif time is not None and k.scan in dims:
            mask.insert(0, "valid")
        for g, h in k.group_of.items():  # a group-indexed result: every head of the group computes it, the first stores
            if g in dims and h in k.grid:
                N = self.size_name
                mask.insert(0, f"({self.pn.dim('i', h)} % ({N(h)} // {N(g)}) == 0)")
        ptr = self.store_ptr(kind, name)
        addr = self.address(self.store_key(kind, name), ptr, dims, axes, time)
        m = f", mask={' & '.join(mask)}" if mask else ""
        w(f"tl.store({addr}, ({e}).to({ptr}.dtype.element_ty){m})")

    # ---- the walk's hooks ----------------------------------------------------------------------------------
    def zeros(self, axes) -> str:
        return f"tl.zeros(({', '.join(self.body.block(a) for a in axes)},), tl.float32)" if axes else "0.0"

    per_chunk = False  # while loading the state entering this chunk (GIVEN_STATES), not the segment's

    def takes_given_states(self) -> bool:
        """Segment outputs (c) from incoming states: with GIVEN_STATES each chunk loads the state entering it."""
        k = self.plan
        return bool(k.states) and k.state_from != "zeros" and k.role == "segment_outputs"

    def start_states(self):
        k, w = self.plan, self.w
        if k.states:
            w("# the state, held on chip for the whole " + ("segment" if k.segmented else "sequence") + " (fp32)")
        given = self.takes_given_states()
        with w.block("if not GIVEN_STATES:  # (else: loaded at each chunk)") if given else nullcontext():
            self.load_states()
        for var, _, axes in self.total_vars():
            w(f"{var} = {self.zeros(axes)}  # summed over the segment's chunks")

    def load_states(self):
        k, w, body = self.plan, self.w, self.body
        for s in k.states:
            var = self.state_var(s)
            if k.state_from == "zeros":
                w(f"{var} = {self.zeros(body.state_axes(s.attr('state')))}  # from a zero state")
                continue
            self.load(s, None)
            w(f"{var} = {body.get(s.name)[0]}")  # fp32, whatever the initial state's dtype
            body.vals[s.name] = (var, body.state_axes(s.attr("state")))

    @contextmanager
    def chunk_loop(self):
        k, w = self.plan, self.w
        NT = "seq_len" if self.batch else self.size_name(k.scan)
        chunks = f"({NT} + Q - 1) // Q"
        if k.segmented:
            first = f"{self.pn.dim('i', SEG)} * {self.size_name(SEG_CHUNKS)}"
            w(f"seg_end = tl.minimum({first} + {self.size_name(SEG_CHUNKS)}, {chunks})  # one past the segment's "
              f"last chunk")
            header = f"for c in range({first}, seg_end):"
        else:
            header = f"for c in range(0, {chunks}):"
        with w.block(header):
            w("tt = c * Q + in_chunk")
            w(f"valid = tt < {NT}")
            w(f"ttc = tl.minimum(tt, {NT} - 1)")
            with w.block("if I64:"):
                w("ttc = ttc.to(tl.int64)")
            if self.chunk_index_used():  # outs / inputs indexed by chunk: this chunk's entry along t#
                cd = chunk_dim(k.scan)
                i_c = self.pn.dim("i", cd)
                if k.p.reverse:  # the walk's k-th chunk (from the last step) is chunk nc-1-k
                    w(f"{i_c} = {self.size_name(cd)} - 1 - c  # the walk's chunk c covers the steps of chunk "
                      f"{self.size_name(cd)}-1-c")
                else:
                    w(f"{i_c} = c  # this chunk's index along {cd}" + (" (c counts from the sequence's start)"
                                                                       if k.segmented else ""))
                with w.block("if I64:"):
                    w(f"{i_c} = tl.cast({i_c}, tl.int64)")
            if self.takes_given_states():
                # the states entering every chunk are given (from `entering`, or segments of one chunk): each
                # chunk loads its own, which the loop can fetch ahead (no walk from one chunk to the next)
                with w.block("if GIVEN_STATES:"):
                    w(f"i_enter = {'(' + chunks + ') - 1 - c' if k.p.reverse else 'c'}  # this chunk's entry "
                      f"(forward-time order)")
                    with w.block("if I64:"):
                        w("i_enter = tl.cast(i_enter, tl.int64)")
                    self.per_chunk = True
                    try:
                        self.load_states()
                    finally:
                        self.per_chunk = False
            yield

    def chunk_time(self):
        return "ttc"

    @contextmanager
    def update_guard(self, updates: bool):
        """(c) stores no state: the update after a segment's last chunk is dead (with the states entering every
        chunk given, as from `entering`, every update is)."""
        if updates and self.plan.role == "segment_outputs":
            # GIVEN_STATES (each chunk loads its entering state): compiled out, its registers never held
            with self.w.block("if not GIVEN_STATES:"), self.w.block(
                    "if c + 1 < seg_end:  # the state entering the segment's next chunk"):
                yield
        else:
            yield

    @contextmanager
    def step_loop(self):
        NT = "seq_len" if self.batch else self.size_name(self.plan.scan)
        with self.w.block(f"for t_i in range(0, {NT}):"):
            self.w("valid = True")
            for s in self.plan.states:
                self.body.vals[s.name] = (self.body.state_var[s.attr("state")], self.body.state_axes(s.attr("state")))
            yield

    def add_totals(self):
        for var, last, _ in self.total_vars():
            self.w(f"{var} = {var} + {last}  # the segment's total so far")

    def end(self):
        k, body = self.plan, self.body
        finals = [x for x in k.stores if x[0] in ("state", "segment")]
        self.w({"state": "# stage output: final states", "segment": "# stage output: the segment's state and "
                "totals"}.get(finals[0][0], "") if finals else "# stage output")
        for kind, name, v in k.stores:
            if kind in ("state", "segment"):
                S = v if kind == "segment" else name
                body.vals[v] = (body.state_var[S], body.state_axes(S))
                self.store(kind, name, v, None)
            elif kind in ("decay", "negs"):
                self.store(kind, name, v, None)


class TritonTarget(KernelTarget):
    emitter = TritonEmitter
    name = "triton"
    reverse_scan = TritonEmitter.reverse_scan
    # GLA on an H200 (bench/schedule_sweep.py, segmented): chunks of 32 ran b4 L4096 h8 dk=dv=128 in 0.85 ms against
    # 1.64 ms at 64, and h16 dk=dv=64 equally (0.55 ms)
    keywise_chunk = 32

    def prepare(self, interpret: bool):
        if interpret:
            from .triton_runtime import prepare_interpret
            prepare_interpret()
