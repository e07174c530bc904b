"""The module every kernel target emits: header, the kernel (target-specific), and a JAX launcher.

The launcher takes the `in` arrays and initial states as declared (any float dtype: the kernel reads them as they
are and computes in fp32), describes the kernel's data layout in one LAYOUT literal that the target's runtime
turns into sizes, strides, blocks, the grid and output buffers, launches the kernel, and finishes with the `post`
instructions (a norm over a group of heads spans programs, so it runs over the kernel's output in XLA).
"""
from __future__ import annotations


from .base import KERNEL_OPTIONS, MODULE_IMPORT, MODULE_NAMES, ModuleInfo, Target
from .kernel_plan import KernelPlan
from .kernel_runtime import final_key, runtime_dims, runtime_strides
from .writer import Names, Writer, py_const, py_name

POST_UNARY = {"neg": "-{}", "exp": "jnp.exp({})", "log": "jnp.log({})", "softplus": "jax.nn.softplus({})",
              "silu": "jax.nn.silu({})", "sigmoid": "jax.nn.sigmoid({})", "tanh": "jnp.tanh({})",
              "sqrt": "jnp.sqrt({})", "rsqrt": "lax.rsqrt({})", "abs": "jnp.abs({})",
              "log_sigmoid": "jax.nn.log_sigmoid({})", "sign": "jnp.sign({})"}
POST_BINARY = {"add": "{} + {}", "sub": "{} - {}", "mul": "{} * {}", "div": "{} / {}", "pow": "{} ** {}",
               "min": "jnp.minimum({}, {})", "max": "jnp.maximum({}, {})"}


class KernelTarget(Target):
    """What the kernel targets share: the pass pipeline (group reads stay index maps; elementwise decay walks time
    in a sequential kernel, having no matmul form) and emit = plan the kernel, then write the module."""
    name = ""
    kernels = True          # emits kernels; takes interpret=
    scalar_chunk = 64       # default chunk length of the SSD-like classes
    chunk_multiple = 1      # chunk lengths round up to a multiple of this (1 still means sequential)
    emitter: type = None

    def pipeline(self, chunk_size: int | None) -> str:
        size = chunk_size or 0
        if size > 1:
            size = -(-size // self.chunk_multiple) * self.chunk_multiple
        return (f"expand-groups{{mode=index}},classify,chunk{{size={size},elementwise=sequential,"
                f"scalar={self.scalar_chunk}}},fuse,dce")

    def emit(self, p, pipeline: str = "") -> str:
        from .kernel_plan import plan_kernel
        return self.emitter(plan_kernel(p, self.name), pipeline).emit()


class LauncherWriter:
    target = ""
    runtime = ""
    imports: tuple[str, ...] = ()
    # identifiers the module writes literally: imports and globals, the launcher's keyword options and locals,
    # and (FIXED of each target) the kernel's own; every other identifier comes from the name table
    LAUNCHER_FIXED = MODULE_NAMES + ("jax", "jnp", "lax", "rt", "LAYOUT", "POST_LAYOUT", "mm", "out_dtype",
                                     "interpret", "arrays", "sizes", "post_arrays")
    FIXED: tuple[str, ...] = ()
    strides = False  # the kernel addresses memory through per-array strides (constexprs named in LAYOUT)

    def __init__(self, plan: KernelPlan, pipeline: str, module: Names | None = None):
        self.plan, self.pipeline = plan, pipeline
        self.w = Writer()
        # the module's table (globals: the launcher, the kernels; the spec's values), then one scope per function:
        # `pn` for this kernel's code, `lpn` for the launcher's
        self.module = module or Names((), self.LAUNCHER_FIXED + self.FIXED)
        self.entry = self.module.key("entry", plan.p.name)
        self.kernel_name = self.module.key(("kernel", plan.form), f"{py_name(plan.p.name)}_{plan.form}")
        self.pn = self.module.scope(plan.p.instrs)
        self.lpn = self.module.scope([i for i in plan.p.instrs if i.op in ("input", "window", "state")])

    # ---- what the kernel reads and writes -------------------------------------------------------------------
    @staticmethod
    def store_key(kind, name) -> str:
        """The key of a stored array in LAYOUT: an out's name, a final state's final_key, or (an intermediate
        the post-kernel code reads) its SSA name; never an identifier of the generated code."""
        return final_key(name) if kind == "state" else name

    @staticmethod
    def store_stem(kind, name) -> str:
        return {"out": name, "state": f"{name}_final"}.get(kind) or py_name(name)

    def store_var(self, kind, name) -> str:
        """The launcher's variable holding a stored array: y, h_final, ..."""
        if kind == "tmp":  # an intermediate value keeps its own identifier
            return self.lpn(name)
        return self.lpn.key(("store", self.store_key(kind, name)), self.store_stem(kind, name))

    def store_names(self):
        return [self.store_var(kind, name) for kind, name, _ in self.plan.stores]

    def size_name(self, d) -> str:
        return self.pn.dim("N", d)

    def block_name(self, d) -> str:
        return self.pn.dim("BLOCK", d)

    def stride_name(self, arr, d) -> str:
        return self.pn.key(("stride", arr, d), f"{py_name(arr)}_stride_{py_name(d)}")

    def store_dims(self, kind, name, value):
        return self.plan.decl[name] if kind in ("out", "state") else self.plan.by()[value].dims

    def arrays(self) -> dict[str, tuple]:
        """Every array the kernel touches (pointer order) -> its dims in memory."""
        k = self.plan
        out = {}
        for i in k.inputs + k.states:
            n = i.attr("array") or i.attr("state")
            out[n] = k.decl[n]
        for kind, name, v in k.stores:
            out[self.store_key(kind, name)] = self.store_dims(kind, name, v)
        return out

    def dims(self) -> list[str]:
        """Dims of the arrays the kernel reads or writes (its size constants)."""
        used = {d for ds in self.arrays().values() for d in ds} | set(self.plan.grid) | set(self.plan.group_tile.values())
        return [d for d in self.plan.p.dims if d in used]

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
        names = {"N": {d: self.size_name(d) for d in self.dims()},
                 "BLOCK": {d: self.block_name(d) for d in self.plan.tile}}
        if self.strides:
            names["stride"] = {a: {d: self.stride_name(a, d) for d in ds} for a, ds in self.arrays().items()}
        return names

    # ---- module ----------------------------------------------------------------------------------------
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
        w("import jax")
        w("import jax.numpy as jnp")
        w("from jax import lax")
        for line in self.imports:
            w(line)
        w(f"from ssmc.targets import {self.runtime} as rt")
        w(MODULE_IMPORT)
        w()
        leaves = k.inputs + k.states
        params = [(self.lpn(i.name), i.attr("array") or i.attr("state"), i.op, ",".join(k.decl[i.attr("array") or
                                                                                          i.attr("state")]))
                  for i in [x for x in p.instrs if x.op in ("input", "window", "state")]]
        rets = [("out", o.name, o.dims) for o in p.outs] + [("state", s.name, s.dims) for s in p.states]
        w(ModuleInfo.build(self.target, self.entry, params, rets, KERNEL_OPTIONS).source())
        w(f"LAYOUT = {self.layout()!r}")
        post = self.post_kernel()
        if post is not None:
            w(f"POST_LAYOUT = {post.layout()!r}")
        w()
        w()
        self.kernel()
        if post is not None:
            w()
            w()
            post.kernel()
        w()
        w()
        self.launcher(params, leaves, post)
        source = w.text()
        self.module.verify(source)
        return source

    def layout(self) -> dict:
        """The kernel's data layout, for the runtime: sizes, strides, blocks, grid and buffers follow from it."""
        k = self.plan
        return {
            "form": k.form, "scan": k.scan, "Q": k.Q, "grid": list(k.grid), "tile": list(k.tile),
            "split": list(k.split), "groups": dict(k.group_of), "group_tile": dict(k.group_tile),
            "dims": self.dims(),
            "inputs": [i.attr("array") or i.attr("state") for i in k.inputs + k.states],
            "arrays": {a: list(d) for a, d in self.arrays().items()},
            "stores": [[self.store_key(kind, name), kind, list(self.store_dims(kind, name, v))]
                       for kind, name, v in k.stores],
            "names": self.meta_names(),
        }

    def post_kernel(self) -> "LauncherWriter | None":
        """An emitter of the post-kernel epilogue as a kernel of its own, where the target has one."""
        return None

    def kernel(self):
        raise NotImplementedError

    def launcher(self, params, leaves, post):
        k, w, entry = self.plan, self.w, self.entry
        args = "".join(a + ", " for a, *_ in params)
        w("# mm: matmul operand dtype (fp32, or the inputs' bf16/fp16); out_dtype: dtype of the outs")
        with w.block(f"def {entry}({args}*, mm=jnp.float32, out_dtype=jnp.float32, interpret=False):"):
            by_name = {b: a for a, b, *_ in params}
            self.pre(by_name)
            given = {i.attr("array") or i.attr("state"): self.lpn(i.name) for i in leaves}
            w(f"arrays = {{{', '.join(f'{n!r}: {by_name.get(n, v)}' for n, v in given.items())}}}")
            w("sizes = rt.dim_sizes(LAYOUT, arrays)")
            outs = ", ".join(self.store_names())
            w(f"{outs}, = rt.launch({self.kernel_name}, LAYOUT, arrays, sizes, mm=mm, out_dtype=out_dtype, "
              f"interpret=interpret)")
            if post is not None:
                # inputs of the program, and the values the main kernel stored (under their own identifiers)
                names = {i.attr("array"): self.lpn(i.name) for i in post.plan.inputs}
                w("# stage epilogue: a norm over a group of heads spans programs, so it is a kernel of its own")
                w(f"post_arrays = {{{', '.join(f'{a!r}: {by_name.get(a, v)}' for a, v in names.items())}}}")
                outs = ", ".join(post.store_names())
                w(f"{outs}, = rt.launch({post.kernel_name}, POST_LAYOUT, post_arrays, sizes, mm=mm, "
                  f"out_dtype=out_dtype, interpret=interpret)")
            else:
                self.post()
            res = []
            by = k.by()
            for o in k.p.outs:
                v = by[f"out.{o.name}"].args[0]
                if post is None and any(i.name == v for i in k.post):
                    res.append(f"rt.to_declared({self.lpn(v)}, {list(by[v].dims)!r}, {list(o.dims)!r}, out_dtype)")
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

    def pre(self, by_name):
        """Causal convs before the kernel (they read the steps before each chunk, from their window state)."""
        k, w = self.plan, self.w
        if not k.pre:
            return
        by = k.by()
        w("# stage prologue (before the kernel): causal convs over the scan dim, with their window states")

        def arr(a, to):
            i = by[a]
            name = by_name[i.attr("array") or i.attr("state")]
            return f"rt.align({name}, {list(k.decl[i.attr('array') or i.attr('state')])!r}, {list(to)!r})"

        for i in k.pre:
            x, *rest = i.args
            xd = by[x].dims
            win = arr(rest[-1], [d if d != k.scan else by[rest[-1]].attr("dim") for d in xd])
            ax = xd.index(k.scan)
            if i.op == "conv":
                kd = i.attr("k")
                wt = arr(rest[0], list(xd) + [kd])  # aligned to x, taps last
                w(f"{self.lpn(i.name)} = rt.causal_conv({arr(x, xd)}, {ax}, {win}, {wt})  # causal conv over "
                  f"{k.scan}, window {kd}")
            else:
                w(f"{self.lpn(i.name)} = rt.conv_window({arr(x, xd)}, {ax}, {win})  # the last inputs, carried on")
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

