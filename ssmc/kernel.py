"""Kernel: a compiled spec, callable on arrays.

A Kernel loads the module a target generated (targets/base.py: MODULE_INFO and one entry taking the arrays as
declared, in any float dtype), checks the call's arrays (names, ranks, dim sizes, dtypes), picks the compute and
output dtypes (`activation_dtype`) and calls the entry under jax.jit. It does not compile: `compile` (ssmc/api.py)
builds it and hands it the function that compiles a variant of its spec (`Kernel.variant`, which `k.step` uses for
the sequential form), so this module and ssmc/step.py never import ssmc/api.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import linecache
import pathlib
import types
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ssmc.passes.chunk import chunk_dim
from ssmc.targets.base import (ACROSS, CU_SEQLENS, ENTERING, ModuleInfo, Target, chunk_inputs, chunk_outs,
                               packed_batch_dim)

from . import step as _step
from .errors import ShapeError, SSMCError, TargetError
from .ir import Program
from .window import derive_sizes, is_window_dim

_LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
CU_KEY = ":cu_seqlens"  # the packed call's offsets among the bound arrays (no spec name has a ':')
ENTER_KEY = ":enter:"  # apply(entering=...)'s states entering each chunk, by state, among the bound arrays
_FLOATS = _LOW + (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


def activation_dtype(who: str, dtypes: dict):
    """The dtype a call computes its contractions and outs in: the narrowest floating dtype among the inputs
    ({input name: dtype}), so fp32 parameters (A, D, dt_bias, norm and conv weights) and fp32 gates never widen
    bf16/fp16 activations. bfloat16 next to float16 has no narrowest: a ShapeError naming both. float64 only when
    every input is float64 (and jax runs with x64; otherwise jax itself takes float64 as float32)."""
    low = {}
    for name, dt in dtypes.items():
        if dt in _LOW:
            low.setdefault(dt, name)
    if len(low) > 1:
        (d1, n1), (d2, n2) = low.items()
        raise ShapeError(f"{who}: input '{n1}' is {d1} but input '{n2}' is {d2}; the activations take one "
                         f"low-precision dtype (the narrowest input dtype): cast them to one of the two")
    if low:
        return next(iter(low))
    if dtypes and all(dt == jnp.float64 for dt in dtypes.values()) and jax.config.jax_enable_x64:
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


class Kernel:
    """A compiled spec: call it with the `in` arrays; read .source, .ir, .passes, .target."""

    def __init__(self, program: Program, target: Target, pipeline: str, entry: dict, filename: str,
                 from_disk: bool, compile_seconds: float, matmul: str = "auto", interpret: bool = False,
                 out_dtype=None, compiler: Callable[..., "Kernel"] | None = None,
                 program_compiler: Callable[..., "Kernel"] | None = None):
        self.program = program
        self.matmul = matmul
        self.backward_matmul = "auto"  # the derived backward kernels' (compile's option)
        self.out_dtype = out_dtype  # None: the outs take the activations' dtype
        self.interpret = interpret
        self.target = target.name
        self._target = target
        self._compiler = compiler  # compile(spec, **options): makes variants of this kernel (see `variant`)
        self._program_compiler = program_compiler  # compile_program: the derived backward's programs
        self.pipeline = pipeline
        self.source: str = entry["source"]
        self.ir: str = entry["ir"]
        self.passes: list[tuple[str, str]] = [tuple(x) for x in entry["passes"]]
        self.dot: str = entry["dot"]
        self.name = program.name
        self.filename = filename
        self.from_disk_cache = from_disk
        self.compile_seconds = compile_seconds
        self.decay_inputs = decay_inputs(program)
        self.inputs = [(a.name, a.dims) for a in program.inputs]
        self.states = [(a.name, a.dims) for a in program.states]
        self.outs = [(a.name, a.dims) for a in program.outs]
        mod = types.ModuleType(f"ssmc_generated_{program.name}")
        # unique per source: the file name keys linecache, where Triton reads its kernels' source back
        mod.__file__ = f"<ssmc {self.target} {program.name} {hashlib.sha256(self.source.encode()).hexdigest()[:10]}>"
        # registered like a file, so tracebacks show the generated lines and Triton can read its kernels' source
        linecache.cache[mod.__file__] = (len(self.source), None, self.source.splitlines(True), mod.__file__)
        try:
            exec(compile_source(self.source, mod.__file__), mod.__dict__)
            info = mod.__dict__.get("MODULE_INFO")
            if not isinstance(info, ModuleInfo):
                raise SSMCError(f"the module defines no MODULE_INFO record (got {type(info).__name__})")
            # checked once here: the entry, its params and results match the spec (targets/base.py)
            self._fn = info.check(mod, self.target, self.inputs, self.states, self.outs)
        except Exception as e:  # a bad cache entry or an emitter bug: say which
            raise SSMCError(f"generated {self.target} code for '{program.name}' failed to load: {e}") from e
        self._module = mod
        self._info: ModuleInfo = info
        if interpret and "interpret" not in info.options:
            raise SSMCError(f"interpret=True: the {self.target} module's entry takes no interpret option")
        # keyword options of the entry besides mm / out_dtype (kernel targets: interpret)
        self._opts = {"interpret": interpret} if "interpret" in info.options else {}
        self._jitted = jax.jit(self._run, static_argnums=(0,))
        self._jitted_entry = jax.jit(self._entry, static_argnums=(0,), static_argnames=(ACROSS,))  # apply(entering=)
        self._derivative_fns: dict = {}  # (meta, options) -> the differentiable kernel call (kernel targets)
        self._auto = None  # a measured default schedule (ssmc/autoschedule.py), set by compile

    def variant(self, **options) -> "Kernel":
        """This kernel's spec compiled again with some compile options changed (the others as this kernel's:
        target, matmul, interpret, out_dtype), e.g. variant(chunk_size=1) for the sequential form; compile's
        memo makes a repeated request cheap."""
        if self._compiler is None:
            raise SSMCError(f"{self.name}: this Kernel was built without a compiler; use ssmc.compile")
        opts = dict(target=self.target, matmul=self.matmul, interpret=self.interpret, out_dtype=self.out_dtype,
                    backward_matmul=self.backward_matmul)
        return self._compiler(self.program.source, **(opts | options))

    def __repr__(self):
        extra = " interpret" if self.interpret else ""
        return f"<ssmc.Kernel {self.name} target={self.target}{extra} pipeline='{self.pipeline}'>"

    def graph_dot(self) -> str:
        return self.dot

    def dump(self, directory) -> pathlib.Path:
        d = pathlib.Path(directory) / self.name
        d.mkdir(parents=True, exist_ok=True)
        for k, (name, text) in enumerate(self.passes):
            (d / f"{k:02d}-{name}.ir").write_text(text)
        (d / f"{self.target}.py").write_text(self.source)
        (d / "graph.dot").write_text(self.dot)
        return d

    # ---- calling ------------------------------------------------------------------------------------
    # Inputs are passed by their spec names, which can be any identifier: `self` is positional-only, and a call
    # option (initial_state, initial_states; step's state) is taken for the option only when no input has its
    # name. An input's name always wins; `apply` takes everything by dict and meets no name at all.
    def __call__(self, /, *args, **kwargs):
        """k(x, dt, ...) or k(x=..., dt=...): the `in` arrays positionally (declared order) or by name; set the
        initial states with initial_state=array (one state) or initial_states={name: array}. Returns the outs
        then the final states. Where an input is itself named initial_state(s), use k.apply.
        cu_seqlens=cu (int32 [num_seqs + 1]): packed variable-length sequences, laid end to end along the scan dim
        of a batch of one; each starts from its own initial state (the states' batch dim has num_seqs entries,
        zeros by default) and returns its own final state; nothing crosses a boundary (see `packed_dim`)."""
        return self._call(args, kwargs, *self._call_options(kwargs))

    def apply(self, inputs, initial_states=None, cu_seqlens=None, entering=None, across=None):
        """The call with everything in containers (no keyword can meet an input's name): `inputs` a dict {input
        name: array} or a sequence in declared order; `initial_states` None (zeros), a dict {state name: array},
        a sequence in k.states order, or one array when there is one state; `cu_seqlens` as for the call.
        `entering` (kernel targets with a segment schedule): {state: the states entering each chunk, [ceil(T/Q),
        *the state's dims]}, as an earlier walk of the same recurrence stored them (the forward of a differentiated
        call, ssmc/backward.py): every chunk then runs on its own, all in parallel, and the final states come back as None.
        `across`: inside a shard_map, the mesh axis (or axes) the scan dim is split over (as ssmc.shard calls an
        entry; not differentiable, the derived backward's own use)."""
        if across is not None:
            if entering is not None or cu_seqlens is not None:
                raise ShapeError(f"{self.name}.apply: across= takes neither entering= nor cu_seqlens=")
            if ACROSS not in self._info.options:
                raise SSMCError(f"{self.name}.apply: across= needs an entry that takes it (a chunked schedule)")
            meta, arrays = self._bound(*self._apply_args(inputs, initial_states, f"{self.name}.apply"))
            return self._jitted_entry(meta, arrays, across=across)
        if entering is None:
            return self._call(*self._apply_args(inputs, initial_states, f"{self.name}.apply"), cu_seqlens)
        if ENTERING not in self._info.options:
            raise SSMCError(f"{self.name}.apply: entering= needs a kernel with a segment schedule (a kernel "
                            f"target's chunked walk); this one has none")
        if cu_seqlens is not None:
            raise ShapeError(f"{self.name}.apply: entering= and cu_seqlens= cannot be combined")
        states = dict(zip([s for s, _ in self.states], [None] * len(self.states)))
        unknown = sorted(set(entering) - set(states))
        if unknown:
            raise ShapeError(f"{self.name}.apply: entering: unknown state '{unknown[0]}'; states are "
                             f"{', '.join(states)}")
        meta, arrays = self._bound(*self._apply_args(inputs, initial_states, f"{self.name}.apply"))
        arrays.update({ENTER_KEY + n: jnp.asarray(v) for n, v in entering.items()})
        return self._jitted_entry(meta, arrays)  # not differentiable: the derived backward's own step

    @property
    def packed_dim(self) -> str | None:
        """The dim packed sequences (cu_seqlens=) lie along: the first dim of the first input with the scan dim
        that every state and every input and out with the scan dim has and no other input has (Mamba2: b). None:
        the spec takes no packed call (no such dim, or an out without the scan dim)."""
        return packed_batch_dim(self.program)

    # how a call, an apply and a step take their arguments apart: shared with ssmc.shard's ShardedKernel
    def _call_options(self, kwargs) -> tuple:
        """(initial_state, initial_states, cu_seqlens) popped from a call's keywords, unless an input has that
        name."""
        names = {n for n, _ in self.inputs}
        keys = ("initial_state", "initial_states", CU_SEQLENS)
        opts = {o: kwargs.pop(o) for o in keys if o in kwargs and o not in names}
        return tuple(opts.get(o) for o in keys)

    def _apply_args(self, inputs, initial_states, who: str) -> tuple:
        """apply's containers -> (args, kwargs, initial_state, initial_states) as _call takes them."""
        if isinstance(inputs, dict):
            args, kwargs = (), dict(inputs)
        elif isinstance(inputs, (list, tuple)):
            args, kwargs = tuple(inputs), {}
        else:
            raise ShapeError(f"{who}: inputs must be a dict {{name: array}} or a list in declared order, got "
                             f"{type(inputs).__name__}")
        return args, kwargs, None, self._states_arg(initial_states, who)

    def _step_args(self, args, inputs) -> tuple:
        """step's (state, args): `state` is the keyword state= when no input has that name, else the first
        positional argument (popped from `inputs` / `args`)."""
        if "state" in inputs and "state" not in {n for n, _ in self.inputs}:
            return inputs.pop("state"), args
        return (args[0], args[1:]) if args else (None, ())

    def _call(self, args, kwargs, initial_state, initial_states, cu_seqlens=None):
        meta, arrays = self._bound(args, kwargs, initial_state, initial_states, cu_seqlens)
        try:
            if self._auto is not None:
                return self._auto(meta, arrays)
            return self._jitted(meta, arrays)
        except TypeError as e:  # jax.jvp reaching a kernel call whose derivatives are a custom_vjp
            if "forward-mode autodiff" not in str(e):
                raise
            raise SSMCError(f"{self.name}: forward-mode differentiation (jax.jvp, jax.jacfwd) of a {self.target} "
                            f"kernel is not supported: its derivatives are the derived backward kernels (reverse "
                            f"mode: jax.grad, jax.vjp). Use target='xla' for forward mode.") from None

    @property
    def schedule(self) -> str:
        """Which form runs (chunked or sequential) and why; on the CPU backend, per shape bucket as measured."""
        from .autoschedule import describe
        return describe(self)

    def _states_arg(self, states, who: str, what: str = "them") -> dict | None:
        """States as a dict, a sequence in k.states order, one array (one state) or None -> a dict or None."""
        if states is None or isinstance(states, dict):
            return states
        names = [s for s, _ in self.states]
        if isinstance(states, (list, tuple)):
            if len(states) != len(names):
                raise ShapeError(f"{who}: got {len(states)} states, expected {len(names)} ({', '.join(names)})")
            return dict(zip(names, states))
        if len(names) != 1:
            raise ShapeError(f"{who}: has {len(names)} states ({', '.join(names)}); pass {what} as a dict "
                             f"{{name: array}} or a sequence in that order")
        return {names[0]: states}

    def step(self, /, *args, **inputs):
        """One decode step from `state` (what a previous call or step returned: a dict {state name: array}, the
        states as a tuple in `k.states` order, a single array when there is one state, or None for zeros).
        Inputs with the scan dim come without it (one token) or with a scan length of 1..8 (multi-token or
        speculative decode); the others (weights) as usual. Returns (outs..., new states...) like the kernel
        call, outs without the scan dim when the inputs came without it. Same numerics as the full call: a
        prefill of t tokens then s steps equals one call on t + s tokens. See ssmc/step.py.
        k.step(state, *inputs, **inputs): `state` is the first positional argument, or the keyword state= when
        no input is named `state`."""
        state, args = self._step_args(args, inputs)
        return _step.step(self, state, args, inputs)

    def _bound(self, args, kwargs, initial_state, initial_states, cu_seqlens=None) -> tuple["_Meta", dict]:
        """What the jitted entry takes for a call: the static meta (sizes, dtypes, packed sequences) and the
        arrays by name (a packed call's offsets under CU_KEY)."""
        seqs = 0 if cu_seqlens is None else self._packed_count(cu_seqlens)
        arrays, sizes, act = self._bind(args, kwargs, initial_state, initial_states, seqs)
        if seqs:
            self._check_offsets(cu_seqlens, sizes[self.program.scan])
            arrays[CU_KEY] = jnp.asarray(cu_seqlens) if isinstance(cu_seqlens, jax.Array) else \
                np.asarray(cu_seqlens).astype(np.int32)
        meta = _Meta(tuple(sorted(sizes.items())), str(act), str(self.out_dtype or act), seqs)
        if self._target.kernels:
            self._zero_states(meta, arrays)
        return meta, arrays

    def _zero_states(self, meta: "_Meta", arrays: dict):
        """Kernel targets, called eagerly on arrays of one device: a state not given starts from device zeros made
        once per shape (a state has no scan dim) outside the jitted call. Built inside, the zeros were the only XLA
        op besides the kernels, and compiling that fusion was most of a new sequence length's first call on a GPU
        (H200: 72-85 ms to a result with it, 36-41 ms with the state given; bench/new_length.py)."""
        xs = list(arrays.values())
        if any(isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array) for x in xs):
            return
        devices = {d for x in xs for d in x.sharding.device_set}
        if len(devices) != 1:
            return
        device, = devices
        base = meta.dtypes(self.matmul)[0]
        sizes = meta.state_sizes(self.packed_dim)
        for p in self._info.params:
            if p.kind == "state" and "state:" + p.name not in arrays:
                arrays["state:" + p.name] = _zeros(tuple(sizes[d] for d in p.dims), base, device)

    def _run(self, meta: "_Meta", arrays: dict, **options):
        """The call on the bound arrays (traced under jit; meta is static), differentiable on every target: the
        XLA target's generated jnp code is differentiated by jax itself; a kernel target's kernels compute the
        values and its derivatives come from the same spec compiled for the XLA target (`_derivatives`).
        `options`: further keyword options of the entry (ssmc.shard passes `across`)."""
        if not self._target.kernels:
            return self._entry(meta, arrays, **options)
        return self._derivatives(meta, tuple(sorted(options.items())))(arrays)

    def _derivatives(self, meta: "_Meta", options: tuple):
        """The kernel call as a jax.custom_jvp function of the arrays: values from the kernels, tangents (and, by
        jax's transposition of them, gradients for jax.grad / vjp) from the XLA target's code for the same spec,
        options and dtypes, which recomputes what it needs from the inputs (nothing per step is saved). Forward
        and reverse mode both work; the kernels' own derived backward is issue 13's adjoint pass."""
        key = (meta, options)
        f = self._derivative_fns.get(key)
        if f is not None:
            return f
        opts = dict(options)
        bw = self._derived_backward()
        if bw is not None and (meta.seqs and not bw.packable or not bw.takes(opts)):
            bw = None
        if bw is not None:
            f = self._derivative_fns[key] = self._adjoint_call(meta, bw, opts.get(ACROSS))
            return f

        @jax.custom_jvp
        def call(arrays):
            return self._entry(meta, arrays, **opts)

        @call.defjvp
        def call_jvp(primals, tangents):
            (arrays,), (dots,) = primals, tangents
            out = call(arrays)
            ref = self._reference_kernel()
            extra = {o: v for o, v in opts.items() if o in ref._info.options}
            if len(extra) != len(opts):
                raise SSMCError(f"{self.name}: derivatives of a call with {sorted(set(opts) - set(extra))} need "
                                f"the xla target's entry to take them too")
            _, dout = jax.jvp(lambda a: ref._entry(meta, a, **extra), (arrays,), (dots,))
            return out, tuple(d.astype(o.dtype) for d, o in zip(dout, out))

        self._derivative_fns[key] = call
        return call

    def _adjoint_call(self, meta: "_Meta", bw, across=None):
        """The kernel call as a jax.custom_vjp function: values from the forward kernels, the vector-Jacobian
        product from the derived backward kernels (ssmc/backward.py). The forward saves its arguments and, on the
        kernel targets, the states entering each chunk (one per chunk, never per step; Backward.forward).
        `across`: inside a shard_map, the mesh axis the sequence is split over (ssmc.shard)."""
        names = [n for n, _ in self.outs] + ["state:" + s for s, _ in self.states]
        opts = {} if across is None else {ACROSS: across}

        @jax.custom_vjp
        def call(arrays):
            return self._entry(meta, arrays, **opts)

        def fwd(arrays):
            out, entering = bw.forward(meta, arrays, across)
            return out, (arrays, entering)

        def bwd(res, cts):
            arrays, entering = res
            base = meta.dtypes(self.matmul)[0]
            g = bw.vjp(meta, arrays, dict(zip(names, cts)), base, cu=arrays.get(CU_KEY), entering=entering,
                       across=across)
            return ({n: None if n == CU_KEY else (g[n] if n in g else jnp.zeros_like(v)).astype(jnp.asarray(v).dtype)
                     for n, v in arrays.items()},)

        call.defvjp(fwd, bwd)
        return call

    def _derived_backward(self):
        """The derived backward (ssmc/backward.py), built on first use; None where the spec has none (a
        non-diagonal state: its derivatives are the XLA target's), the reason in `backward_note`."""
        if "_bw" not in self.__dict__:
            from ssmc.passes.adjoint import NotAdjointable

            from .backward import Backward
            if self._program_compiler is None:
                raise SSMCError(f"{self.name}: this Kernel was built without a compiler; use ssmc.compile")
            indexed = self._chunk_indexed()
            if indexed:  # (the derived backward's own programs have such outs / inputs; they are not differentiated)
                self._bw, self.backward_note = None, (f"XLA derivatives: {indexed[0]} is indexed by chunk, "
                                                      f"which the derived backward does not differentiate")
                return self._bw
            try:
                self._bw, self.backward_note = Backward(self, self._program_compiler), "derived (passes/adjoint.py)"
            except NotAdjointable as e:
                self._bw, self.backward_note = None, f"XLA derivatives: {e}"
        return self._bw

    @property
    def backward_source(self) -> str:
        """The source of the derived backward kernels (the adjoint programs compiled for this target)."""
        bw = self._derived_backward()
        if bw is None:
            raise SSMCError(f"{self.name}: no derived backward ({self.backward_note})")
        return bw.source

    @property
    def backward_passes(self) -> list[tuple[str, str]]:
        """(pass, IR text) of the adjoint programs through this target's pipeline."""
        bw = self._derived_backward()
        if bw is None:
            raise SSMCError(f"{self.name}: no derived backward ({self.backward_note})")
        return bw.passes

    def _reference_kernel(self) -> "Kernel":
        """This spec compiled for the XLA target with this kernel's matmul and out_dtype options: what a kernel
        target differentiates (see _derivatives)."""
        ref = self.__dict__.get("_xla_kernel")
        if ref is None:
            ref = self.__dict__["_xla_kernel"] = self.variant(target="xla", interpret=False)
        return ref

    def _entry(self, meta: "_Meta", arrays: dict, **options):
        """The generated entry on the bound arrays. Every target's entry takes the arrays as declared
        (targets/base.py); here only a missing state becomes zeros, the states enter in the compute dtype and an
        input wider than it (float64 next to float32 inputs) is narrowed to it."""
        if self.program.reverse and not self._target.reverse_scan:
            return self._entry_flipped(meta, arrays, **options)
        return self._entry_walk(meta, arrays, **options)

    def _entry_walk(self, meta: "_Meta", arrays: dict, **options):
        sizes = meta.state_sizes(self.packed_dim)
        base, mm, out_dtype = meta.dtypes(self.matmul)
        if meta.seqs:
            options = {**options, CU_SEQLENS: arrays[CU_KEY]}
        entering = {n[len(ENTER_KEY):]: x for n, x in arrays.items() if n.startswith(ENTER_KEY)}
        if entering:
            options = {**options, ENTERING: entering}
        call = []
        for p in self._info.params:
            x = arrays.get(p.name if p.kind == "input" else "state:" + p.name)
            if x is None:  # a state without an initial value starts at zero
                x = jnp.zeros(tuple(sizes[d] for d in p.dims), base)
            x = jnp.asarray(x)
            if p.kind == "state" or jnp.dtype(x.dtype).itemsize > jnp.dtype(base).itemsize:
                x = x.astype(base)
            call.append(x)
        return tuple(self._fn(*call, mm=mm, out_dtype=out_dtype, **self._opts, **options))

    def _entry_flipped(self, meta: "_Meta", arrays: dict, **options):
        """A reverse-time program (Program.reverse) on a target whose kernels walk forward only: the forward walk
        of the timed arrays flipped along the scan dim, its timed outs flipped back. A packed call's sequences then
        come in reverse order, each reversed: offsets T - cu[::-1], and the states' entries along the packed dim
        reversed in and out."""
        scan, pd = self.program.scan, (self.packed_dim if meta.seqs else None)
        cd = chunk_dim(scan)

        def flip(x, dims):
            if cd in dims:  # an out / input indexed by chunk: the walk's k-th chunk is chunk nc-1-k (base.chunk_outs)
                x = jnp.flip(x, dims.index(cd))
            if scan in dims:
                return jnp.flip(x, dims.index(scan))
            return jnp.flip(x, dims.index(pd)) if pd in dims else x
        decl = {n: d for n, d in self.inputs} | {"state:" + n: d for n, d in self.states}
        decl |= {ENTER_KEY + n: (cd,) + tuple(d) for n, d in self.states}  # apply(entering=): [t#, *state dims]
        flipped = {n: flip(jnp.asarray(x), decl[n]) for n, x in arrays.items() if n != CU_KEY}
        if meta.seqs:
            cu = arrays[CU_KEY]
            flipped[CU_KEY] = dict(meta.sizes)[scan] - (jnp.flip(cu) if isinstance(cu, jax.Array) else cu[::-1])
        res = self._entry_walk(meta, flipped, **options)  # this target's code walks forward
        return tuple(flip(r, d) for r, (_, d) in zip(res, list(self.outs) + list(self.states)))

    def named_inputs(self, args, kwargs, who: str = "") -> dict:
        """Positional and keyword inputs -> {input name: array}, with errors naming the input."""
        who = who or self.name
        names = [n for n, _ in self.inputs]
        if len(args) > len(names):
            raise ShapeError(f"{who}: takes {len(names)} inputs ({', '.join(names)}), got {len(args)} "
                             f"positional arguments")
        given = dict(zip(names, args))
        for k, v in kwargs.items():
            if k not in names:
                states = [s for s, _ in self.states]
                hint = "; to set a state use initial_state= / initial_states={...} (or k.apply)" if k in states else ""
                raise ShapeError(f"{who}: unknown input '{k}'; inputs are {', '.join(names)}{hint}")
            if k in given:
                raise ShapeError(f"{who}: input '{k}' given both positionally and by keyword")
            given[k] = v
        return given

    def _chunk_indexed(self) -> list[str]:
        """The outs and inputs indexed by chunk (dim t#: the derived backward's programs), as an error names them."""
        return ([f"out '{n}'" for n in chunk_outs(self.program)]
                + [f"input '{n}'" for n in chunk_inputs(self.program)])

    def _packed_count(self, cu) -> int:
        """The number of sequences of a packed call, checking what needs no values: the spec takes packed calls,
        cu is a 1-D integer array of at least 2 entries."""
        indexed = self._chunk_indexed()
        if indexed:
            raise ShapeError(f"{self.name}: cu_seqlens: {indexed[0]} is indexed by chunk (dim "
                             f"'{chunk_dim(self.program.scan)}'); packed sequences (cu_seqlens) with outs or inputs "
                             f"indexed by chunk are not supported: call each sequence on its own")
        if self.packed_dim is not None and CU_SEQLENS not in self._info.options:
            raise TargetError(f"{self.name}: cu_seqlens: the {self.target} target's generated entry takes no packed "
                              f"sequences (its MODULE_INFO options lack '{CU_SEQLENS}')")
        if self.packed_dim is None:
            why = ("an out lacks the scan dim" if any(self.program.scan not in d for _, d in self.outs) else
                   "no dim is shared by every state and every input with the scan dim and absent from the others")
            raise ShapeError(f"{self.name}: cu_seqlens: this spec takes no packed sequences ({why}), so there is no "
                             f"batch dim to pack along")
        if not hasattr(cu, "shape") or not hasattr(cu, "dtype"):
            cu = np.asarray(cu)
        if not jnp.issubdtype(jnp.dtype(cu.dtype), jnp.integer):
            raise ShapeError(f"{self.name}: cu_seqlens has dtype {jnp.dtype(cu.dtype)}; it takes int32 offsets "
                             f"[num_seqs + 1] (0, end of sequence 1, ..., packed length)")
        if len(cu.shape) != 1 or cu.shape[0] < 2:
            raise ShapeError(f"{self.name}: cu_seqlens has shape {tuple(cu.shape)}; it takes offsets [num_seqs + 1] "
                             f"with at least one sequence (0, end of sequence 1, ..., packed length)")
        return int(cu.shape[0]) - 1

    def _check_offsets(self, cu, T: int):
        """The values of concrete offsets (under jax.jit they are traced and cannot be read: fla and mamba_ssm
        trust them there too): start at 0, never decrease, end at the packed length."""
        if isinstance(cu, jax.core.Tracer):
            return
        c = np.asarray(cu).astype(np.int64)
        bad = np.nonzero(np.diff(c) < 0)[0]
        if c[0] != 0:
            raise ShapeError(f"{self.name}: cu_seqlens[0] is {c[0]}; the offsets start at 0")
        if bad.size:
            i = int(bad[0])
            raise ShapeError(f"{self.name}: cu_seqlens decreases at index {i + 1} ({c[i]} -> {c[i + 1]}); offsets "
                             f"never decrease (a repeated offset is an empty sequence)")
        if c[-1] != T:
            raise ShapeError(f"{self.name}: cu_seqlens ends at {c[-1]} but the packed length (dim "
                             f"'{self.program.scan}') is {T}")

    def _bind(self, args, kwargs, initial_state, initial_states, seqs: int = 0):
        names = [n for n, _ in self.inputs]
        given = self.named_inputs(args, kwargs)
        missing = [n for n in names if n not in given]
        if missing:
            raise ShapeError(f"{self.name}: missing input{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                             f"expected {_decls(self.inputs)}")
        states = self._initial(initial_state, initial_states)
        sizes: dict[str, int] = {}
        where: dict[str, str] = {}
        floats = {}
        arrays = {}
        for (name, dims), kind in [(x, "input") for x in self.inputs] + [(x, "state") for x in self.states]:
            x = given.get(name) if kind == "input" else states.get(name)
            if x is None:
                continue
            label = f"input '{name}'" if kind == "input" else f"initial state '{name}'"
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                x = np.asarray(x)
            dt = jnp.dtype(x.dtype)
            if not jnp.issubdtype(dt, jnp.floating):
                raise ShapeError(f"{self.name}: {label} has dtype {dt}; ssmc kernels take float32, bfloat16 or "
                                 f"float16 arrays (float64 on the xla target with jax_enable_x64)")
            if len(x.shape) != len(dims):
                raise ShapeError(f"{self.name}: {label} has rank {len(x.shape)} (shape {tuple(x.shape)}) but is "
                                 f"declared {name}[{','.join(dims)}] (rank {len(dims)})")
            if seqs:  # a packed call: inputs hold one batch entry, states one per sequence
                bd = self.packed_dim
                ax = dims.index(bd) if bd in dims else None
                want = seqs if kind == "state" else 1
                if ax is not None and x.shape[ax] != want:
                    raise ShapeError(
                        f"{self.name}: {label} has {x.shape[ax]} along dim '{bd}' (axis {ax} of "
                        f"{name}[{','.join(dims)}]) but a packed call (cu_seqlens, {seqs} sequences) takes "
                        + ("one initial state per sequence" if kind == "state" else
                           "the sequences end to end along the scan dim in a batch of one"))
                if ax is not None and kind == "state":  # checked above: bind the rest as for a batch of one
                    x_shape = tuple(1 if a == ax else n for a, n in enumerate(x.shape))
                else:
                    x_shape = tuple(x.shape)
            else:
                x_shape = tuple(x.shape)
            for ax, (d, n) in enumerate(zip(dims, x_shape)):
                if d in sizes and sizes[d] != n:
                    raise ShapeError(f"{self.name}: dim '{d}' is {sizes[d]} in {where[d]} but {n} in {label} "
                                     f"(axis {ax} of {name}[{','.join(dims)}])")
                sizes.setdefault(d, int(n))
                where.setdefault(d, f"{label} (axis {ax})")
            if kind == "input":
                floats[name] = dt
            arrays[name if kind == "input" else "state:" + name] = x
        derive_sizes(self.name, self.program, sizes, where)  # conv windows: size(k) - 1
        cd = chunk_dim(self.program.scan)
        Q = self._info.chunk  # outs indexed by chunk (dim t#): ceil(T / Q) chunks (targets/base.py chunk_outs)
        if cd in self.program.dims and Q and self.program.scan in sizes:
            nc = -(-sizes[self.program.scan] // Q)
            if cd in sizes and sizes[cd] != nc:  # an input indexed by chunk: one entry per chunk
                raise ShapeError(f"{self.name}: dim '{cd}' is {sizes[cd]} in {where[cd]}, but an input indexed by "
                                 f"chunk has one entry per chunk of {Q} steps: ceil({sizes[self.program.scan]} / {Q}) "
                                 f"= {nc} for dim '{self.program.scan}' of {sizes[self.program.scan]}")
            sizes[cd] = nc
            where[cd] = f"the chunks of {Q} steps of dim '{self.program.scan}'"
        for d in self.program.dims:
            if d == cd and not Q:  # a chunk-index dim no result has: no size to know
                continue
            if d not in sizes:
                raise ShapeError(f"{self.name}: dim '{d}' appears in no input; pass an initial state to set its size")
        for g, h in self.program.groups:
            if sizes[g] < 1 or sizes[h] % sizes[g]:
                raise ShapeError(f"{self.name}: `group {g} -> {h}` needs dim '{h}' ({sizes[h]}) to be a multiple of "
                                 f"dim '{g}' ({sizes[g]})")
        for d, n in sizes.items():
            if n < 1 and not is_window_dim(d):
                raise ShapeError(f"{self.name}: dim '{d}' has size {n} ({where[d]}); sizes must be >= 1")
        act = activation_dtype(self.name, floats)
        if act == jnp.float64 and not self._target.float64:
            first = next(n for n, dt in floats.items() if dt == jnp.float64)
            raise TargetError(f"{self.name}: input '{first}' is float64 (as are all inputs); the {self.target} "
                              f"kernels compute in float32/bfloat16/float16: cast the inputs to float32, or use "
                              f"target='xla', which computes in float64")
        return arrays, sizes, act

    def _initial(self, initial_state, initial_states) -> dict:
        snames = [s for s, _ in self.states]
        if initial_state is not None and initial_states is not None:
            raise ShapeError(f"{self.name}: pass initial_state or initial_states, not both")
        if initial_state is not None:
            if len(snames) != 1:
                raise ShapeError(f"{self.name}: has {len(snames)} states ({', '.join(snames)}); pass "
                                 f"initial_states={{name: array}} instead of initial_state")
            return {snames[0]: initial_state}
        if initial_states is None:
            return {}
        if not isinstance(initial_states, dict):
            raise ShapeError(f"{self.name}: initial_states must be a dict {{state name: array}}")
        for k in initial_states:
            if k not in snames:
                raise ShapeError(f"{self.name}: unknown state '{k}' in initial_states; states are {', '.join(snames)}")
        return {k: v for k, v in initial_states.items() if v is not None}


_ZEROS: dict = {}  # (shape, dtype, device) -> a zero device array (immutable: shared by every call)
_ZEROS_MAX = 16


def _zeros(shape, dtype, device) -> jax.Array:
    key = (shape, str(jnp.dtype(dtype)), device)
    z = _ZEROS.pop(key, None)
    if z is None:  # a host-to-device copy: no XLA compile
        z = jax.device_put(np.zeros(shape, jnp.dtype(dtype)), device)
    _ZEROS[key] = z  # most recently used last
    while len(_ZEROS) > _ZEROS_MAX:
        _ZEROS.pop(next(iter(_ZEROS)))
    return z


@dataclasses.dataclass(frozen=True)
class _Meta:
    sizes: tuple
    act: str   # the activations' dtype (activation_dtype)
    out: str   # the outs' dtype
    seqs: int = 0  # a packed call's number of sequences (0: not packed); sizes then hold a batch of one

    def state_sizes(self, batch: str | None) -> dict:
        """Dim sizes as the states have them: a packed call's states have one entry per sequence along `batch`."""
        sizes = dict(self.sizes)
        if self.seqs and batch is not None:
            sizes[batch] = self.seqs
        return sizes

    def dtypes(self, matmul: str):
        """(base, mm, out): elementwise math and states in base (fp32; fp64 for fp64 activations), matmul
        operands in mm (the activations' bf16/fp16 unless matmul="float32", else full precision in base)."""
        act = jnp.dtype(self.act)
        base = act if act == jnp.float64 else jnp.dtype(jnp.float32)
        mm = act if act in _LOW and matmul == "auto" else base
        return base, mm, jnp.dtype(self.out)


def decay_inputs(program: Program) -> tuple[str, ...]:
    """Names of the `in` arrays the states' decays a_t depend on (to sample stable random inputs, for example)."""
    from ssmc.passes.plan import make_plan
    try:
        plan = make_plan(program)
    except SSMCError:
        return ()
    by = plan.analysis.by
    seen, stack, found = set(), [f for sp in plan.states.values() for f in sp.decay], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        i = by[n]
        if i.op == "input":
            found.append(i.attr("array"))
        stack.extend(i.args)
    return tuple(a.name for a in program.inputs if a.name in found)


def _decls(arrays) -> str:
    return ", ".join(n + "[" + ",".join(d) + "]" for n, d in arrays)


def compile_source(source: str, filename: str):
    """Python's built-in compile (this module's `compile` is ssmc's)."""
    import builtins
    return builtins.compile(source, filename, "exec")

