"""The module every kernel target emits: header, the kernel (target-specific), and a JAX launcher.

The launcher takes the `in` arrays and initial states as declared (any float dtype: the kernel reads them as they
are and computes in fp32), describes the kernel's data layout in one LAYOUT literal that the target's runtime
turns into sizes, strides, blocks, the grid and output buffers, launches the kernel, and finishes with the `post`
instructions (a norm over a group of heads spans programs, so it runs over the kernel's output in XLA).
"""
from __future__ import annotations


from ssmc.errors import TargetError
from ssmc.ops import spellings

from .base import (ACROSS, CU_SEQLENS, ENTERING, KERNEL_OPTIONS, MODULE_IMPORT, MODULE_NAMES, ModuleInfo, Target,
                   chunk_inputs, chunk_outs, packed_batch_dim)
from .kernel_plan import SEG, SEG_CHUNKS, KernelPlan, Schedule
from .kernel_runtime import final_key, runtime_dims, runtime_strides
from .writer import Names, Writer, py_const, py_name

POST_UNARY, POST_BINARY = spellings("jnp", 1), spellings("jnp", 2)  # the launcher's jnp code (ssmc/ops.py)


class KernelTarget(Target):
    """What the kernel targets share: the pass pipeline (group reads stay index maps; elementwise decay walks time
    in a sequential kernel, having no matmul form) and emit = plan the kernel, then write the module."""
    name = ""
    kernels = True          # emits kernels; takes interpret=
    scalar_chunk = 64       # default chunk length of the SSD-like classes
    keywise_chunk = 64      # default chunk length of key-/value-wise decays (in sub-chunks of 16)
    chunk_multiple = 1      # chunk lengths round up to a multiple of this (1 still means sequential)
    emitter: type = None

    def pipeline(self, chunk_size: int | None) -> str:
        size = chunk_size or 0
        if size > 1:
            size = -(-size // self.chunk_multiple) * self.chunk_multiple
        return (f"expand-groups{{mode=index}},classify,chunk{{size={size},elementwise=sequential,"
                f"scalar={self.scalar_chunk},keywise={self.keywise_chunk}}},fuse,dce")

    def schedule(self, p):
        from .kernel_plan import plan_schedule
        hit = getattr(self, "_planned", None)
        if hit is None or hit[0] is not p:  # emit then annotate plan the same program: once
            hit = self._planned = (p, plan_schedule(p, self.name))
        return hit[1]

    def emit(self, p, pipeline: str = "") -> str:
        sch = self.schedule(p)
        if p.reverse and self.reverse_scan and sch.walk.pre:
            # the launcher's causal convs run over forward time before the kernel; a derived program has none
            raise TargetError(f"{p.name}: a reverse-time program with a causal conv has no {self.name} kernel")
        return self.emitter(sch.walk, pipeline, schedule=sch).emit()

    def annotate(self, p):
        """The IR with a note naming the kernel schedule (and how the segment count is chosen)."""
        return p.with_instrs(p.instrs, self.schedule(p).note())


class LauncherWriter:
    target = ""
    runtime = ""
    imports: tuple[str, ...] = ()
    # identifiers the module writes literally: imports and globals, the launcher's keyword options and locals,
    # and (FIXED of each target) the kernel's own; every other identifier comes from the name table
    LAUNCHER_FIXED = MODULE_NAMES + ("jax", "jnp", "lax", "rt", "LAYOUT", "POST_LAYOUT", "mm", "out_dtype",
                                     "interpret", "arrays", "sizes", "post_arrays", "SEGMENT_STATES_LAYOUT",
                                     "SEGMENT_OUTPUTS_LAYOUT", "segments", "nseg", "seg_sizes", "seg_arrays",
                                     "across", "entering", "cu_seqlens", "pk")
    LAYOUT_NAMES = {"walk": "LAYOUT", "rows": "POST_LAYOUT", "segment_states": "SEGMENT_STATES_LAYOUT",
                    "segment_outputs": "SEGMENT_OUTPUTS_LAYOUT"}
    KERNEL_SUFFIX = {"rows": "post", "segment_states": "segment_states", "segment_outputs": "segment_outputs"}
    FIXED: tuple[str, ...] = ()
    strides = False  # the kernel addresses memory through per-array strides (constexprs named in LAYOUT)
    row_kernels = False  # the post-kernel grouped norm runs as a kernel of its own (else in XLA)
    handle = ""  # what a kernel parameter for an array is called: ptr (Triton), ref (Pallas)
    packed_calls = False  # the walk kernel runs packed sequences (cu_seqlens), one program per sequence
    reverse_scan = False  # the kernels walk a reverse-time program in place (else the call flips its arrays); its
    # per-segment arrays then lie in forward-time order (segment k of the walk at entry N-1-k), like its outs indexed
    # by chunk, so the states entering each chunk stored by one walk are another's incoming states as they are

    def __init__(self, plan: KernelPlan, pipeline: str, module: Names | None = None, schedule: Schedule | None = None):
        self.plan, self.pipeline = plan, pipeline
        self.schedule = schedule or Schedule(walk=plan)
        self.w = Writer()
        # the module's table (globals: the launcher, the kernels; the spec's values), then one scope per function:
        # `pn` for this kernel's code, `lpn` for the launcher's
        self.module = module or Names((), self.LAUNCHER_FIXED + self.FIXED)
        self.entry = self.module.key("entry", plan.p.name)
        suffix = self.KERNEL_SUFFIX.get(plan.role, plan.form)
        self.kernel_name = self.module.key(("kernel", plan.role), f"{py_name(plan.p.name)}_{suffix}")
        self.layout_name = self.LAYOUT_NAMES[plan.role]
        self.pn = self.module.scope(plan.p.instrs)
        if plan.segmented:  # readable names for the segment index and sizes
            self.pn.get(("dim", "i", SEG), "i_seg")
            self.pn.get(("dim", "N", SEG), "n_segments")
            self.pn.get(("dim", "N", SEG_CHUNKS), "seg_chunks")
        self.lpn = self.module.scope([i for i in plan.p.instrs if i.op in ("input", "window", "state")])
        # the dim packed sequences lie along, where this kernel walks them (targets/packed.py); None: no packed calls
        batch = packed_batch_dim(plan.p) if self.packed_calls and plan.role == "walk" else None
        self.batch = batch if batch in plan.grid else None
        self.subs: dict[str, LauncherWriter] = {}
        if module is None:  # the schedule's other kernels: writers of their own, in this module and launcher
            for k in self.schedule.kernels()[1:]:
                if k.role == "rows" and not self.row_kernels:
                    continue  # the post-kernel norm runs in XLA on this target
                sub = type(self)(k, pipeline, self.module, self.schedule)
                sub.w, sub.lpn = self.w, self.lpn
                self.subs[k.role] = sub

    # ---- what the kernel reads and writes -------------------------------------------------------------------
    @staticmethod
    def store_key(kind, name) -> str:
        """The key of a stored array in LAYOUT: an out's name, a final state's final_key, or (an intermediate
        the post-kernel code reads) its SSA name; never an identifier of the generated code."""
        return final_key(name) if kind == "state" else name

    @staticmethod
    def store_stem(kind, name) -> str:
        return {"out": name, "state": f"{name}_final"}.get(kind) or py_name(name)

    def leaf_handle(self, leaf) -> str:
        """The kernel's parameter for a loaded array (Triton's pointer, Pallas' ref): x_ptr, h_prev_ref; an
        incoming segment state by its buffer (h_in_ptr)."""
        if leaf.op == "state" and self.plan.segmented:
            return self.pn.key((self.handle, leaf.attr("array")), f"{py_name(leaf.attr('array'))}_{self.handle}")
        return self.pn.local(leaf.name, self.handle)

    def store_handle(self, kind, name) -> str:
        """The kernel's parameter for a stored array: y_ptr, h_final_ref, h_segment_ptr, ..."""
        key = self.store_key(kind, name)
        return self.pn.key((self.handle, key), f"{self.store_stem(kind, name)}_{self.handle}")

    def store_var(self, kind, name) -> str:
        """The launcher's variable holding a stored array: y, h_final, ..."""
        if kind == "tmp":  # an intermediate value keeps its own identifier
            return self.lpn(name)
        if kind == "incoming":
            return self.lpn.key(("store", name), py_name(name))
        return self.lpn.key(("store", self.store_key(kind, name)), self.store_stem(kind, name))

    def store_names(self):
        return [self.store_var(kind, name) for kind, name, _ in self.plan.stores]

    def size_name(self, d) -> str:
        return self.pn.dim("N", d)

    def block_name(self, d) -> str:
        return self.pn.dim("BLOCK", d)

    def stride_name(self, arr, d) -> str:
        return self.pn.key(("stride", arr, d), f"{py_name(arr)}_stride_{'seg' if d == SEG else py_name(d)}")

    def store_dims(self, kind, name, value):
        return self.plan.by()[value].dims if kind == "tmp" else self.plan.decl[name]

    def grid_names(self) -> list[str]:
        return ["segment" if d == SEG else d for d in self.plan.grid]

    def arrays(self) -> dict[str, tuple]:
        """Every array the kernel touches (pointer order) -> its dims in memory."""
        k = self.plan
        out = {}
        for i in k.leaves():
            n = i.attr("array") or i.attr("state")
            out[n] = k.decl[n]
        for kind, name, v in k.stores:
            out[self.store_key(kind, name)] = self.store_dims(kind, name, v)
        return out

    def dims(self) -> list[str]:
        """Dims of the arrays the kernel reads or writes (its size constants)."""
        used = {d for ds in self.arrays().values() for d in ds} | set(self.plan.grid) | set(self.plan.group_tile.values())
        return [d for d in self.plan.p.dims if d in used] + ([SEG] if self.plan.segmented else [])

    def runtime_args(self) -> list[str]:
        """Sizes the kernel takes as runtime arguments (see kernel_runtime.runtime_dims)."""
        return [self.size_name(d) for d in runtime_dims(self.layout())]

    def constexprs(self) -> list[str]:
        """Compile-time constants: tile sizes and blocks, the chunk length, matmul dtype and the strides that span
        no runtime size."""
        k, lay = self.plan, self.layout()
        rt = runtime_dims(lay)
        cs = [self.size_name(d) for d in self.dims() if d not in rt] + [self.block_name(d) for d in k.tile]
        if k.form == "chunked":
            cs.append("Q")
        cs += ["MM", "PREC"]
        for arr, ds in self.arrays().items():
            dyn = runtime_strides(ds, rt, lay["group_tile"])
            cs += [self.stride_name(arr, d) for d in ds if d not in dyn]
        return cs

    def computed_strides(self) -> list[tuple[str, str]]:
        """(name, expression) of the strides that span a runtime size, innermost first: the next dim's size times
        its stride, so the compiler still sees the constant factor (alignment for vector loads)."""
        lay = self.layout()
        rt = runtime_dims(lay)
        N = self.size_name
        out = []
        for arr, ds in self.arrays().items():
            dyn = runtime_strides(ds, rt, lay["group_tile"])
            for i in reversed(range(len(ds) - 1)):
                if ds[i] in dyn:
                    nxt = ds[i + 1]
                    g = lay["group_tile"].get(nxt)
                    size = f"{N(g)} * {N(nxt)}" if g else N(nxt)
                    out.append((self.stride_name(arr, ds[i]), f"{size} * {self.stride_name(arr, nxt)}"))
        return out

    def meta_names(self) -> dict:
        """The kernel's size/block/stride parameter names, for the runtime that passes them by keyword (sizes and
        strides that are runtime arguments or computed in the kernel are listed too; the runtime skips them)."""
        names = {"N": {d: self.size_name(d) for d in self.dims() + ([SEG_CHUNKS] if self.plan.segmented else [])},
                 "BLOCK": {d: self.block_name(d) for d in self.plan.tile}}
        if self.strides:
            names["stride"] = {a: {d: self.stride_name(a, d) for d in ds} for a, ds in self.arrays().items()}
        return names

    # ---- module ----------------------------------------------------------------------------------------
    def writers(self) -> list["LauncherWriter"]:
        """This kernel's writer then the schedule's other kernels', in schedule order."""
        return [self] + list(self.subs.values())

    def emit(self) -> str:
        k, w = self.plan, self.w
        p = k.p
        w(f"# Generated by ssmc for `ssm {p.name}`, target {self.target}.")
        w(f"# pass pipeline: {self.pipeline}")
        for note in p.notes:
            for ln in note.split("\n"):
                w(f"# {ln.strip().lstrip('# ')}")
        w(f"# kernel: {k.form} form; grid over ({', '.join(k.grid)}), tile over ({', '.join(k.tile)})"
          + (f", {', '.join(k.split)} blockable" if k.split else ""))
        w(f"# {self.schedule.note()}")
        for key, dims, src, dst in self.schedule.buffers():
            shown = ",".join("segment" if d == SEG else d for d in dims)
            w(f"#   buffer {key}[{shown}] (fp32): {src} -> {dst}")
        w("import jax")
        w("import jax.numpy as jnp")
        w("from jax import lax")
        for line in self.imports:
            w(line)
        w(f"from ssmc.targets import {self.runtime} as rt")
        w(MODULE_IMPORT)
        w()
        params = [(self.lpn(i.name), i.attr("array") or i.attr("state"), i.op, ",".join(k.decl[i.attr("array") or
                                                                                          i.attr("state")]))
                  for i in [x for x in p.instrs if x.op in ("input", "window", "state")]]
        rets = [("out", o.name, o.dims) for o in p.outs] + [("state", s.name, s.dims) for s in p.states]
        opts = (KERNEL_OPTIONS + ((ACROSS, ENTERING) if self.schedule.segment_states is not None else ())
                + ((CU_SEQLENS,) if self.batch else ()))
        # outs / inputs indexed by chunk (dim t#): ceil(T / Q) entries, Q fixed here (the launcher never retunes it)
        chunk = k.Q if chunk_outs(p) or chunk_inputs(p) else 0
        w(ModuleInfo.build(self.target, self.entry, params, rets, opts, chunk=chunk).source())
        for kw in self.writers():
            w(f"{kw.layout_name} = {kw.layout()!r}")
        for kw in self.writers():
            w()
            w()
            kw.kernel()
        w()
        w()
        self.launcher(params)
        source = w.text()
        self.module.verify(source)
        return source

    def layout(self) -> dict:
        """The kernel's data layout, for the runtime: sizes, strides, blocks, grid and buffers follow from it."""
        k = self.plan
        return {
            "form": k.form, "role": k.role, "scan": k.scan, "Q": k.Q, "grid": list(k.grid), "tile": list(k.tile),
            "split": list(k.split), "groups": dict(k.group_of), "group_tile": dict(k.group_tile),
            "dims": self.dims(),
            "inputs": [i.attr("array") or i.attr("state") for i in k.leaves()],
            "state_inputs": [i.attr("array") or i.attr("state") for i in k.leaves() if i.op == "state"],
            "carried": [list(k.decl[s.attr("state")]) for s in k.states],  # the running states (Pallas' scratch)
            "arrays": {a: list(d) for a, d in self.arrays().items()},
            "stores": [[self.store_key(kind, name), kind, list(self.store_dims(kind, name, v))]
                       for kind, name, v in k.stores],
            "names": self.meta_names(),
            "packed": self.batch,  # the dim packed sequences lie along (None: this kernel takes none)
            **({"fp32_outs": list(fp32)} if (fp32 := self.plan.p.fp32_outs()) else {}),
        }

    def kernel(self):
        raise NotImplementedError

    def launch(self, arrays: str, sizes: str, packed: bool = False):
        """`outs, = rt.launch(...)`: this kernel over `arrays` (the launcher's dict variable)."""
        outs = ", ".join(self.store_names())
        cu = ", cu_seqlens=cu_seqlens" if packed else ""
        self.w(f"{outs}, = rt.launch({self.kernel_name}, {self.layout_name}, {arrays}, {sizes}, mm=mm, "
               f"out_dtype=out_dtype, interpret=interpret{cu})")

    def launcher(self, params):
        k, w, entry, sch = self.plan, self.w, self.entry, self.schedule
        args = "".join(a + ", " for a, *_ in params)
        w("# mm: matmul operand dtype (fp32, or the inputs' bf16/fp16); out_dtype: dtype of the outs")
        w("# segments: None (chosen per call from the sizes and the device), or a number of segments (1: one walk)")
        across = sch.segment_states is not None
        if across:
            w("# across: None, or the mesh axis this sequence is split over (inside a shard_map, see ssmc.shard):")
            w("# the segments of every device's part of the sequence then enter one scan")
            w("# entering: None, or {state: the states entering each chunk [t#, *the state's dims]} from an earlier")
            w("# walk of the same recurrence: each chunk is then a segment of its own, all run in parallel (final")
            w("# states: None)")
        if self.batch:
            w(f"# cu_seqlens: None, or int32 offsets of packed sequences along {k.scan} (a batch of one along "
              f"{self.batch}): one program")
            w("# per sequence walks it from its initial state to its final state (targets/packed.py)")
        with w.block(f"def {entry}({args}*, mm=jnp.float32, out_dtype=jnp.float32, interpret=False, "
                     f"segments=None{', across=None, entering=None' if across else ''}"
                     f"{', cu_seqlens=None' if self.batch else ''}):"):
            by_name = {b: a for a, b, *_ in params}
            if self.batch and k.pre:
                tsrc = next(i for i in k.p.instrs if i.op == "input" and k.scan in i.dims)
                arr = tsrc.attr("array")
                w(f"pk = rt.packing(cu_seqlens, {by_name[arr]}.shape[{k.decl[arr].index(k.scan)}], 1)"
                  "  # packed sequences: each conv reads its own window")
            self.pre(by_name)
            given = {i.attr("array") or i.attr("state"): self.lpn(i.name) for i in k.leaves()}
            w(f"arrays = {{{', '.join(f'{n!r}: {by_name.get(n, v)}' for n, v in given.items())}}}")
            w("sizes = rt.dim_sizes(LAYOUT, arrays)")
            def walks():
                if sch.segment_states is None:
                    w(f"# {sch.note()}: `segments` does not apply")
                    self.launch("arrays", "sizes")
                else:
                    self.segmented_launch(by_name)
            if self.batch:
                with w.block("if cu_seqlens is not None:"):
                    w("# packed sequences: one program per sequence and grid point, no segments")
                    self.launch("arrays", "sizes", packed=True)
                with w.block("else:"):
                    walks()
            else:
                walks()
            post = self.subs.get("rows")
            if post is not None:
                # inputs of the program, and the values the main kernel stored (under their own identifiers)
                names = {i.attr("array"): self.lpn(i.name) for i in post.plan.inputs}
                w("# stage epilogue: a norm over a group of heads spans programs, so it is a kernel of its own")
                w(f"post_arrays = {{{', '.join(f'{a!r}: {by_name.get(a, v)}' for a, v in names.items())}}}")
                post.launch("post_arrays", "sizes")
            else:
                self.post()
            res = []
            by, fp32 = k.by(), k.p.fp32_outs()
            for o in k.p.outs:
                v = by[f"out.{o.name}"].args[0]
                if post is None and any(i.name == v for i in k.post):
                    dt = "jnp.float32" if o.name in fp32 else "out_dtype"
                    res.append(f"rt.to_declared({self.lpn(v)}, {list(by[v].dims)!r}, {list(o.dims)!r}, {dt})")
                else:
                    res.append(self.store_var("out", o.name))
            for s in k.p.states:
                v = by.get(f"final.{s.name}")
                if v is not None and by[v.args[0]].op in ("conv.window",):
                    res.append(f"rt.to_declared({self.lpn(v.args[0])}, {list(by[v.args[0]].dims)!r}, "
                               f"{list(s.dims)!r}, jnp.float32)")
                else:
                    res.append(self.store_var("state", s.name))
            w(f"return {', '.join(res)}")

    def segmented_launch(self, by_name):
        """The one walk, or (a) segment states, (b) the scan across segments, (c) segment outputs."""
        w, sch = self.w, self.schedule
        a, c = self.subs["segment_states"], self.subs["segment_outputs"]
        w("# the number of segments: from the length, the programs and the device's cores (rt.pick_segments),")
        w("# or `segments`; segment boundaries fall on chunk boundaries")
        w("nseg, seg_sizes = (rt.entering_segments(LAYOUT, sizes, interpret) if entering is not None else "
          "rt.segments(LAYOUT, sizes, segments, interpret))")
        with w.block("if entering is not None:"):
            w("# the states entering each chunk are given: (c) alone, every chunk from its own state, in parallel")
            incoming = {}
            for cy in sch.carries:
                s_in = incoming[cy.incoming] = self.store_var("incoming", cy.incoming)
                w(f"{s_in} = rt.entering_states(entering, {cy.state!r}, {list(self.plan.decl[cy.state])!r}, "
                  f"{list(cy.dims)!r}, seg_sizes)")
                w(f"{self.store_var('state', cy.state)} = None  # not computed: no walk reaches the end")
            w(f"seg_arrays = {{**arrays, {', '.join(f'{n!r}: {v}' for n, v in incoming.items())}}}")
            c.launch("seg_arrays", "seg_sizes")
        with w.block("elif nseg == 1 and across is None:"):
            w("# one walk: every program walks the whole sequence")
            self.launch("arrays", "sizes")
        with w.block("else:"):
            w("# (a) every program and segment: the segment's state from a zero state, and its total log-decay")
            a.launch("arrays", "seg_sizes")
            w("# (b) the scan across segments: S_in(j) = D(j-1) * S_in(j-1) + S(j-1), from the initial state")
            w("# (and across the devices' parts of the sequence, when it is split over `across`)")
            incoming = {}
            for cy in sch.carries:
                init = by_name[cy.state]
                s_in = incoming[cy.incoming] = self.store_var("incoming", cy.incoming)
                negs = a.store_var("negs", cy.negs) if cy.negs else "None"
                w(f"{s_in}, {self.store_var('state', cy.state)} = rt.segment_scan({init}, "
                  f"{list(self.plan.decl[cy.state])!r}, {a.store_var('segment', cy.local)}, "
                  f"{a.store_var('decay', cy.decay)}, {negs}, {list(cy.dims)!r}, {list(cy.decay_dims)!r}, sizes, "
                  f"across=across{', reverse=True' if self.plan.p.reverse else ''}"
                  f"{', flipped=True' if self.plan.p.reverse and self.reverse_scan else ''})")
            w("# (c) every program and segment: its outputs, walking from the state entering the segment")
            w(f"seg_arrays = {{**arrays, {', '.join(f'{n!r}: {v}' for n, v in incoming.items())}}}")
            c.launch("seg_arrays", "seg_sizes")

    def pre(self, by_name):
        """Causal convs before the kernel (they read the steps before each chunk, from their window state)."""
        k, w = self.plan, self.w
        if not k.pre:
            return
        by = k.by()
        w("# stage prologue (before the kernel): causal convs over the scan dim, with their window states")
        pk = ""

        def arr(a, to):
            i = by[a]
            name = by_name[i.attr("array") or i.attr("state")]
            return f"rt.align({name}, {list(k.decl[i.attr('array') or i.attr('state')])!r}, {list(to)!r})"

        for i in k.pre:
            x, *rest = i.args
            xd = by[x].dims
            win = arr(rest[-1], [d if d != k.scan else by[rest[-1]].attr("dim") for d in xd])
            ax = xd.index(k.scan)
            if self.batch:  # packed sequences (pk: None for an ordinary call)
                pk = f", pk, {xd.index(self.batch)}"
            if i.op == "conv":
                kd = i.attr("k")
                wt = arr(rest[0], list(xd) + [kd])  # aligned to x, taps last
                w(f"{self.lpn(i.name)} = rt.causal_conv({arr(x, xd)}, {ax}, {win}, {wt}{pk})  # causal conv over "
                  f"{k.scan}, window {kd}")
            else:
                w(f"{self.lpn(i.name)} = rt.conv_window({arr(x, xd)}, {ax}, {win}{', None' + pk if pk else ''})"
                  "  # the last inputs, carried on")
        for i in k.inputs:
            if by[i.name].op == "conv":
                by_name[i.attr("array")] = self.lpn(i.name)

    def post(self):
        """Instructions after the kernel, in jax.numpy over named dims (kernel outputs are in IR dims)."""
        k, w = self.plan, self.w
        if not k.post:
            return
        by = k.by()
        w("# stage epilogue (after the kernel): a norm over a group of heads spans programs")
        dims: dict[str, tuple] = {}
        for kind, name, v in k.stores:
            if kind == "tmp":
                dims[v] = by[v].dims
        inputs = {i.name: i for i in k.p.instrs if i.op == "input"}  # the launcher's own arguments

        def ref(a, to):
            if a in inputs and a not in dims:
                dims[a] = k.decl[inputs[a].attr("array")]
            i = by[a]
            if i.op == "const":
                return py_const(i.attr("value"))
            if i.op == "expand":
                return ref(i.args[0], to)
            return f"rt.align({self.lpn(a)}, {list(dims[a])!r}, {list(to)!r})"

        for i in k.post:
            to = i.dims
            if i.op == "rmsnorm":
                g = i.attr("group")
                e = (f"rt.group_rmsnorm({ref(i.args[0], to)}, {list(to)!r}, {list(i.attr('over'))!r}, "
                     f"{dict(k.group_of)[g]!r}, sizes[{g!r}], {i.attr('eps')!r})")
            elif i.op in POST_UNARY:
                e = POST_UNARY[i.op].format(ref(i.args[0], to))
            elif i.op in POST_BINARY:
                e = POST_BINARY[i.op].format(ref(i.args[0], to), ref(i.args[1], to))
            elif i.op == "clamp":
                e = f"jnp.clip({', '.join(ref(a, to) for a in i.args)})"
            elif i.op == "reduce":
                fn = "jnp.sum" if i.attr("kind") == "sum" else "jnp.mean"
                src = by[i.args[0]].dims
                e = f"{fn}({ref(i.args[0], src)}, axis={tuple(src.index(d) for d in i.attr('over'))!r})"
            else:
                raise NotImplementedError(f"{self.target} target: op '{i.op}' after the kernel")
            w(f"{self.lpn(i.name)} = {e}")
            dims[i.name] = to

