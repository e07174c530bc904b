"""ssmc.shard: a compiled kernel run on a jax.sharding.Mesh, its arrays split along the spec's own dims.

`ssmc.shard(k, mesh, {"b": "dp", "h": "tp", "t": "sp"})` maps dims of the spec to mesh axes (a name or a tuple of
names). The call runs under `jax.shard_map`: every device calls the kernel on its own block of every array, so the
Triton and Pallas kernels (opaque custom calls that XLA cannot partition) never see a gathered input.

- Dims that no instruction sums over (batch, heads, the kept dims of a state) split with no communication. A group
  dim (`group g -> h`) follows its heads: it splits over the heads' axes when the group count divides by them, and
  otherwise every device reads the one group its heads belong to.
- The scan dim splits the sequence into parts, one per device. A chunk-parallel spec runs every part at once: each
  device's own state from zero and its total decay are gathered, and the state entering each part comes from a scan
  over the parts before it (the generated entry's `across=` option: the kernel targets' segment schedule, the XLA
  target's state passing). Any other spec hands its states from device to device: correct, but the parts run one
  after another. A causal conv's window reaches back into the previous device's part (its last k-1 inputs).
- A dim that an instruction sums over (a state's contracted dim, a norm's dims) cannot be split: a ShapeError names
  it and the instruction's place in the spec.

Multi-host: the same code runs on every host after `jax.distributed.initialize()`, with a mesh over
`jax.devices()` (all hosts' devices); ssmc adds no communication of its own beyond jax's collectives.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from ssmc.targets.base import ACROSS

from .errors import ShapeError
from .kernel import _Meta
from .window import is_window_dim

try:
    _shard_map = jax.shard_map
except AttributeError:  # older jax
    from jax.experimental.shard_map import shard_map as _old

    def _shard_map(f, *, mesh, in_specs, out_specs, check_vma=False):
        return _old(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check_vma)


def shard(k, mesh, axes: dict) -> "ShardedKernel":
    """`k` (a compiled Kernel) run on `mesh` with the spec's dims split over mesh axes: `axes` maps dim names to a
    mesh axis name or a tuple of them. Returns a callable with k's signature (inputs positional or by name,
    initial_state= / initial_states=, .apply, .step) whose outputs are sharded the same way."""
    return ShardedKernel(k, mesh, axes)


def summed_dims(program) -> dict[str, str]:
    """{dim: why it cannot be split}: the dims some instruction sums over (a contraction, a reduce, a norm's
    `over`, a conv's window), each with the first instruction's op and place. The scan dim is not listed (it
    splits into parts of the sequence), nor a group dim read at its heads (`expand`), nor the heads a grouped
    norm spans (they split in whole groups: ShardedKernel._layout)."""
    by = {i.name: i for i in program.instrs}
    groups = dict(program.groups)  # g -> h
    found: dict[str, str] = {}

    def note(d, i):
        if d != program.scan and not is_window_dim(d):
            where = f" at {i.span}" if i.span is not None else ""
            found.setdefault(d, f"`{i.op}` sums over it{where}")

    for i in program.instrs:
        if i.op == "expand":
            continue
        for a in i.args:
            for d in by[a].dims:
                if d not in i.dims:
                    note(d, i)
        if i.op in ("rmsnorm", "reduce"):
            heads = groups.get(i.attr("group"))  # a grouped norm spans the heads of a group: whole groups split
            for d in i.attr("over") or ():
                if d != heads:
                    note(d, i)
    return found


class ShardedKernel:
    """A Kernel run on a mesh (see the module docstring): same calling convention as the Kernel."""

    def __init__(self, k, mesh, axes: dict):
        self.kernel, self.mesh = k, mesh
        self.name = f"{k.name} on mesh {dict(mesh.shape)}"
        self.inputs, self.states, self.outs = k.inputs, k.states, k.outs
        self.scan = k.program.scan
        # dims of every array a call binds, by its key there (inputs by name, initial states as "state:<name>")
        self._dims = dict(k.inputs) | {"state:" + n: d for n, d in k.states}
        self.axes = self._check_axes(axes)
        self._groups = dict(k.program.groups)  # g -> h
        self._fns: dict = {}
        info = k._info
        self._windows = self._window_sources()
        seq = self.scan in self.axes
        self.mode = ("local" if not seq else
                     "parts" if ACROSS in info.options and None not in self._windows.values() else "hand-over")

    def __repr__(self):
        return f"<ssmc.ShardedKernel {self.kernel.name} axes={self.axes} sequence={self.mode}>"

    @property
    def note(self) -> str:
        """How the call runs on the mesh, in one line (also the last line of `ir`)."""
        split = ", ".join(f"{d} over {a if len(a) > 1 else a[0]}" for d, a in self.axes.items())
        how = {"local": "every device runs its own blocks, no communication",
               "parts": "the sequence in parts run at once; the state entering each part comes from a scan over "
                        "the parts' own states and total decays (gathered across the axis)",
               "hand-over": "the sequence in parts run one after another, each device handing its final states to "
                            "the next (the spec has no chunk-parallel form"
                            + (" across devices" if ACROSS in self.kernel._info.options else "") + "): correct, "
                            "not parallel along the sequence"}[self.mode]
        return f"shard: {split}: {how}"

    @property
    def ir(self) -> str:
        """The kernel's IR with the note saying how it runs on the mesh."""
        return self.kernel.ir.rstrip("\n") + f"\n# {self.note}\n"

    # ---- the mapping ---------------------------------------------------------------------------------------
    def _check_axes(self, axes) -> dict[str, tuple[str, ...]]:
        k, mesh = self.kernel, self.mesh
        who = f"ssmc.shard({k.name})"
        if not isinstance(axes, dict):
            raise ShapeError(f"{who}: axes must be a dict {{spec dim: mesh axis name or tuple of names}}")
        out, used = {}, {}
        blocked = summed_dims(k.program)
        for d, ax in axes.items():
            if d not in k.program.dims:
                raise ShapeError(f"{who}: '{d}' is not a dim of the spec (dims: {', '.join(k.program.dims)})")
            names = (ax,) if isinstance(ax, str) else tuple(ax)
            for a in names:
                if a not in mesh.shape:
                    raise ShapeError(f"{who}: dim '{d}' maps to mesh axis '{a}', which the mesh does not have "
                                     f"(axes: {', '.join(mesh.axis_names)})")
                if a in used:
                    raise ShapeError(f"{who}: mesh axis '{a}' is mapped twice (dims '{used[a]}' and '{d}')")
                used[a] = d
            if d in blocked:
                raise ShapeError(f"{who}: dim '{d}' cannot be split over devices: {blocked[d]}")
            out[d] = names
        for g, h in k.program.groups:
            if g in out and out.get(h) != out[g]:
                raise ShapeError(f"{who}: group dim '{g}' is mapped to {out[g]} but its heads '{h}' to "
                                 f"{out.get(h, 'no axis')}: a group splits with its heads (map '{h}' alone, or both "
                                 f"to the same axes)")
        return out

    def _devices(self, names) -> int:
        return math.prod(self.mesh.shape[a] for a in names)

    def _window_sources(self) -> dict[str, str | None]:
        """{window state: the input whose last k-1 steps it holds}, None when the conv reads an expression (its
        window then only comes from handing the states over)."""
        by = {i.name: i for i in self.kernel.program.instrs}
        out = {}
        for i in self.kernel.program.instrs:
            if i.op == "conv.window":
                state = by[i.args[1]].attr("state")
                src = by[i.args[0]]
                out[state] = src.attr("array") if src.op == "input" else None
        return out

    def _layout(self, sizes: dict) -> tuple[dict, dict]:
        """(dim -> mesh axes, dim -> (group slice: heads per device, heads per group)) for a call's sizes, with
        group dims following their heads, after checking every mapped dim divides by its devices."""
        who = f"ssmc.shard({self.kernel.name})"
        mapped = dict(self.axes)
        for d, names in self.axes.items():
            n = self._devices(names)
            if sizes[d] % n:
                raise ShapeError(f"{who}: dim '{d}' has size {sizes[d]}, not a multiple of the {n} devices of mesh "
                                 f"axes {names}")
        pick = {}
        for g, h in self._groups.items():
            if h not in mapped or g in self.axes:
                continue
            n = self._devices(mapped[h])
            if sizes[g] % n == 0:
                mapped[g] = mapped[h]  # whole groups per device, with their heads
                continue
            per_dev, per_group = sizes[h] // n, sizes[h] // sizes[g]
            if per_group % per_dev:
                raise ShapeError(f"{who}: heads '{h}' ({sizes[h]}) over {n} devices puts {per_dev} heads on each, "
                                 f"which straddle groups of {per_group} ('{g}' = {sizes[g]}): use a device count "
                                 f"that divides '{g}' or whose head blocks fit in one group")
            norm = [i for i in self.kernel.program.instrs if i.op == "rmsnorm" and i.attr("group") == g]
            if norm:
                raise ShapeError(f"{who}: the norm at {norm[0].span} spans each group's {per_group} heads, but "
                                 f"{n} devices hold {per_dev} heads each: use a device count that divides '{g}' "
                                 f"({sizes[g]})")
            indexed = [n for n, dims in self.states + self.outs if g in dims]
            if indexed:
                raise ShapeError(f"{who}: '{indexed[0]}' is indexed by the group dim '{g}', but {n} devices hold "
                                 f"{per_dev} of each group's {per_group} heads: use a device count that divides "
                                 f"'{g}' ({sizes[g]}), so each device holds whole groups")
            pick[g] = (h, per_dev, per_group)
        if self.scan in self.axes:
            T = sizes[self.scan] // self._devices(self.axes[self.scan])
            for state, dims in self.states:
                wd = next((d for d in dims if is_window_dim(d)), None)
                if wd is not None and sizes.get(wd, 0) > T:
                    raise ShapeError(f"{who}: each device's part of '{self.scan}' is {T} steps, shorter than the "
                                     f"conv window '{state}' ({sizes[wd]} steps): use fewer devices along "
                                     f"{self.axes[self.scan]}")
        return mapped, pick

    def _spec(self, dims, mapped) -> PartitionSpec:
        return PartitionSpec(*[(mapped[d] if len(mapped[d]) > 1 else mapped[d][0]) if d in mapped else None
                               for d in dims])

    def sharding(self, name: str, sizes: dict) -> NamedSharding:
        """The NamedSharding of input or state `name` for a call at `sizes` ({dim: size}): to place arrays on
        the mesh before a call (a call places them itself otherwise)."""
        decl = dict(self.inputs) | dict(self.states)
        if name not in decl:
            raise ShapeError(f"{self.name}: no input or state '{name}' (inputs and states: {', '.join(decl)})")
        mapped, _ = self._layout(sizes)
        return NamedSharding(self.mesh, self._spec(decl[name], mapped))

    # ---- calling -------------------------------------------------------------------------------------------
    def __call__(self, /, *args, **kwargs):
        return self._call(args, kwargs, *self.kernel._call_options(kwargs))

    def apply(self, inputs, initial_states=None):
        """Like Kernel.apply: inputs as a dict or a list in declared order, states as a dict, list or array."""
        return self._call(*self.kernel._apply_args(inputs, initial_states, f"{self.name}.apply"))

    def step(self, /, *args, **inputs):
        """Like Kernel.step, each device stepping its own block (the scan dim is never split for a step)."""
        from . import step as _step
        k = self.kernel
        state, args = k._step_args(args, inputs)
        sk = _step.step_kernel(k)
        axes = {d: a for d, a in self.axes.items() if d != self.scan}
        made = sk.__dict__.setdefault("_sharded", {})  # the step kernel on this mesh, made once
        key = (self.mesh, tuple(sorted(axes.items())))
        stepper = made.get(key) or made.setdefault(key, ShardedKernel(sk, self.mesh, axes))
        return _step.step(k, state, args, inputs, apply=stepper.apply)

    def _call(self, args, kwargs, initial_state, initial_states, cu_seqlens=None):
        k = self.kernel
        if cu_seqlens is not None:
            raise ShapeError(f"{self.name}: cu_seqlens: a sharded kernel takes no packed sequences; call the kernel "
                             f"itself (packed sequences are one batch entry, nothing to split but time)")
        arrays, sizes, act = k._bind(args, kwargs, initial_state, initial_states)
        mapped, pick = self._layout(sizes)
        local = dict(sizes)
        for d, names in mapped.items():
            local[d] = sizes[d] // self._devices(names)
        for g in pick:
            local[g] = 1
        meta = _Meta(tuple(sorted(local.items())), str(act), str(k.out_dtype or act))
        key = (meta, tuple(sorted(arrays)))
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self._build(meta, sorted(arrays), mapped, pick)
        return fn(arrays)

    def _build(self, meta, given, mapped, pick):
        info = self.kernel._info
        seq = self.axes.get(self.scan)
        in_specs = ({n: self._spec(self._dims[n], mapped) for n in given},)
        out_specs = tuple(self._spec(r.dims, mapped) for r in info.returns)
        body = self._body(meta, mapped, pick, seq)
        f = _shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        return jax.jit(f)

    def _body(self, meta, mapped, pick, seq):
        k, info = self.kernel, self.kernel._info
        sizes = dict(meta.sizes)
        n_out = sum(r.kind == "out" for r in info.returns)
        states = [r for r in info.returns if r.kind == "state"]

        def group_slice(arrays):
            for g, (h, per_dev, per_group) in pick.items():
                gi = lax.axis_index(mapped[h]) * per_dev // per_group
                for n in list(arrays):
                    dims = self._dims[n]
                    if g in dims:
                        arrays[n] = lax.dynamic_slice_in_dim(arrays[n], gi, 1, axis=dims.index(g))
            return arrays

        def last_part(x):  # the final states are the last part's, on every device
            me = lax.axis_index(seq)
            return lax.psum(jnp.where(me == self._devices(seq) - 1, x, jnp.zeros_like(x)), seq)

        def body(arrays):
            arrays = group_slice(dict(arrays))
            if seq is None:
                return k._run(meta, arrays)
            if self.mode == "parts":
                arrays = self._windows_from_previous_part(arrays, sizes, seq)
                res = k._run(meta, arrays, across=seq if len(seq) > 1 else seq[0])
                return tuple(res[:n_out]) + tuple(last_part(s) for s in res[n_out:])
            return self._hand_over(meta, arrays, seq, n_out, states)
        return body

    def _windows_from_previous_part(self, arrays, sizes, seq):
        """Every conv window entering a device's part: the previous part's last k-1 inputs (the first part keeps
        the window given, or zeros)."""
        me = lax.axis_index(seq)
        n = self._devices(seq)
        for state, src in self._windows.items():
            wdims = self._dims["state:" + state]
            wd = next(d for d in wdims if is_window_dim(d))
            x, xdims = arrays[src], self._dims[src]
            ax = xdims.index(self.scan)
            tail = lax.slice_in_dim(x, x.shape[ax] - sizes[wd], x.shape[ax], axis=ax)  # empty for a width-1 conv
            order = [xdims.index(self.scan if d == wd else d) for d in wdims]
            tail = jnp.transpose(tail, order)
            prev = lax.ppermute(tail, seq, [(i, i + 1) for i in range(n - 1)])
            given = arrays.get("state:" + state)
            if given is None:
                given = jnp.zeros(tail.shape, jnp.float32)
            arrays["state:" + state] = jnp.where(me == 0, given.astype(jnp.float32), prev.astype(jnp.float32))
        return arrays

    def _hand_over(self, meta, arrays, seq, n_out, states):
        """The parts one after another: in round r, device r runs its part from the states the parts before it
        left, and hands its final states to every device (lax.cond: the other devices skip the kernel)."""
        k = self.kernel
        me = lax.axis_index(seq)
        sizes = dict(meta.sizes)
        base = meta.dtypes(k.matmul)[0]
        carried = {}
        for r in states:
            given = arrays.pop("state:" + r.name, None)
            carried[r.name] = (given.astype(base) if given is not None else
                               jnp.zeros(tuple(sizes[d] for d in r.dims), base))
        def run(carried):
            res = k._run(meta, {**arrays, **{"state:" + n: v for n, v in carried.items()}})
            return tuple(res[:n_out]), tuple(res[n_out:])
        shapes = jax.eval_shape(run, carried)

        def skip(carried):
            return (tuple(jnp.zeros(s.shape, s.dtype) for s in shapes[0]),
                    tuple(carried[r.name].astype(s.dtype) for r, s in zip(states, shapes[1])))
        # an interpreter that keeps the devices in lockstep (Pallas TPU's) deadlocks when only one launches
        lockstep = k.interpret and k._target.lockstep_interpreter
        outs = None
        for rnd in range(self._devices(seq)):
            o, f = run(carried) if lockstep else lax.cond(me == rnd, run, skip, carried)
            outs = o if outs is None else tuple(jnp.where(me == rnd, a, b) for a, b in zip(o, outs))
            # device rnd's final states enter round rnd + 1 on every device
            carried = {r.name: lax.psum(jnp.where(me == rnd, x, jnp.zeros_like(x)), seq).astype(base)
                       for r, x in zip(states, f)}
        return outs + tuple(carried[r.name] for r in states)


__all__ = ["shard", "ShardedKernel", "summed_dims"]
