"""StateCache: every layer's recurrent states for serving a model built from one compiled kernel.

The kernel's `states` (SSM states, conv windows) are stacked over layers: one array [num_layers, *state shape] per
state name, plus the number of tokens each layer has consumed per sequence. The cache is a JAX pytree (arrays are
its leaves, the layout is static), so it passes through `jax.jit`, `lax.scan` and `jax.device_put`, and every
method is functional: `update` and `reset` return a new cache.

    cache = ssmc.StateCache.create(k, num_layers=4, batch_size=2, sizes={"h": 8, "p": 64, "n": 128, "k": 4})
    outs..., *new = k.step(cache.layer(i), **token_inputs)
    cache = cache.update(i, new, num_tokens=1)
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .errors import ShapeError, SSMCError
from .window import derive_sizes, window_dims


class LayerIndexError(SSMCError, IndexError):
    """A layer index outside the cache (catchable as IndexError too)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """The static part of a cache (the pytree's aux data): what each state is and how big."""
    kernel: str                         # the kernel's name, for messages
    names: tuple[str, ...]              # state names in the kernel's `states` order
    dims: tuple[tuple[str, ...], ...]   # each state's dims as declared
    shapes: tuple[tuple[int, ...], ...]  # each state's shape in one layer
    num_layers: int
    batch_dim: str
    dtype: str

    def batch_axis(self, j: int) -> int:
        """Axis of the batch dim in state j's stacked array (the layer axis comes first)."""
        return 1 + self.dims[j].index(self.batch_dim)


@jax.tree_util.register_pytree_node_class
class StateCache:
    """Per-layer states of a model, stacked: `states[name]` is [num_layers, *state shape]; `layer_positions`
    [num_layers, batch] (int32) counts the tokens each layer's states have consumed per sequence."""

    def __init__(self, states: dict, layer_positions, layout: Layout):
        # no checks here: JAX rebuilds caches with tracers, shardings or specs as leaves
        self.states = states
        self.layer_positions = layer_positions
        self.layout = layout

    # ---- pytree ----------------------------------------------------------------------------------------
    def tree_flatten(self):
        return (tuple(self.states[n] for n in self.layout.names), self.layer_positions), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        states, positions = children
        return cls(dict(zip(layout.names, states)), positions, layout)

    # ---- construction ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, kernel, num_layers: int, batch_size: int, dtype=jnp.float32, sizes: dict | None = None,
               batch_dim: str = "b", mesh=None, batch_axis: str | None = "data", head_axis: str | None = None,
               head_dim: str = "h") -> "StateCache":
        """Zero states for `num_layers` layers of `kernel` and `batch_size` sequences. `sizes` gives the size of
        every other dim the states have ({"h": 8, "p": 64, ...}); a conv window's size follows from its weight's
        window dim (give "k"). `batch_dim` names the states' batch dim. With a `mesh`, the zeros are created
        sharded as `shardings(mesh, batch_axis, head_axis, head_dim)` says (never whole on one device)."""
        for what, n in (("num_layers", num_layers), ("batch_size", batch_size)):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ShapeError(f"StateCache.create: {what} must be a positive int, got {n!r}")
        if not kernel.states:
            raise ShapeError(f"StateCache.create: kernel '{kernel.name}' has no states to cache")
        sizes = dict(sizes or {})
        if batch_dim in sizes and sizes[batch_dim] != batch_size:
            raise ShapeError(f"StateCache.create: sizes['{batch_dim}'] = {sizes[batch_dim]} but batch_size = "
                             f"{batch_size}")
        sizes[batch_dim] = int(batch_size)
        derive_sizes(f"StateCache.create({kernel.name})", kernel.program, sizes)
        windows = window_dims(kernel.program)
        shapes = []
        for name, dims in kernel.states:
            if batch_dim not in dims:
                raise ShapeError(f"StateCache.create: state {_decl(name, dims)} has no batch dim '{batch_dim}'; "
                                 f"pass batch_dim= naming the states' batch dim")
            missing = [d for d in dims if d not in sizes]
            if missing:
                ask = ", ".join(dict.fromkeys(f"'{windows.get(d, d)}': ..." for d in missing))  # k, not k-1
                raise ShapeError(f"StateCache.create: the size of dim{'s' if len(missing) > 1 else ''} "
                                 f"{', '.join(missing)} of state {_decl(name, dims)} is unknown; pass "
                                 f"sizes={{{ask}}}")
            shapes.append(tuple(int(sizes[d]) for d in dims))
        layout = Layout(kernel.name, tuple(n for n, _ in kernel.states), tuple(tuple(d) for _, d in kernel.states),
                        tuple(shapes), int(num_layers), batch_dim, jnp.dtype(dtype).name)

        def zeros():
            states = {n: jnp.zeros((layout.num_layers,) + s, dtype) for n, s in zip(layout.names, layout.shapes)}
            return cls(states, jnp.zeros((layout.num_layers, batch_size), jnp.int32), layout)

        if mesh is None:
            return zeros()
        shardings = jax.eval_shape(zeros).shardings(mesh, batch_axis, head_axis, head_dim)
        return jax.jit(zeros, out_shardings=shardings)()

    # ---- reading ---------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    @property
    def batch_size(self) -> int:
        return self.layout.shapes[0][self.layout.batch_axis(0) - 1]

    @property
    def positions(self):
        """int32 [batch]: tokens every layer has consumed, per sequence (the next token's position)."""
        return jnp.min(self.layer_positions, axis=0)

    def layer(self, i) -> dict:
        """Layer i's states {name: array}, ready for `kernel.step(cache.layer(i), ...)` or `initial_states=`.
        i is an int (checked) or a traced integer scalar (inside jit / scan; not checked)."""
        i = self._index(i)
        return {n: self.states[n][i] for n in self.layout.names}

    # ---- functional updates ----------------------------------------------------------------------------
    def update(self, i, new_states, num_tokens=1) -> "StateCache":
        """A cache whose layer i holds `new_states` (a dict by name, the states in kernel order as a tuple - e.g.
        the tail of a kernel call's or step's result - or one array for a one-state kernel), cast to the cache
        dtype, and whose layer-i positions advanced by `num_tokens` (an int or an int array [batch])."""
        i = self._index(i)
        new = self._as_dict(new_states)
        states = dict(self.states)
        for j, name in enumerate(self.layout.names):
            x = new[name]
            want = self.layout.shapes[j]
            if tuple(jnp.shape(x)) != want:
                raise ShapeError(f"StateCache.update: state '{name}' for layer {i} has shape {tuple(jnp.shape(x))}, "
                                 f"expected {want} ({_decl(name, self.layout.dims[j])})")
            states[name] = jnp.asarray(states[name]).at[i].set(jnp.asarray(x).astype(self.layout.dtype))
        n = jnp.asarray(num_tokens, jnp.int32)
        if n.ndim not in (0, 1) or (n.ndim == 1 and n.shape[0] != self.batch_size):
            raise ShapeError(f"StateCache.update: num_tokens must be an int or an int array [{self.batch_size}], "
                             f"got shape {tuple(n.shape)}")
        return StateCache(states, jnp.asarray(self.layer_positions).at[i].add(n), self.layout)

    def reset(self, sequences=None) -> "StateCache":
        """Zero states and positions: of every sequence (sequences=None), or of those selected by a bool mask
        [batch] or an array/list of sequence indices (to start a new request in a freed batch slot)."""
        if sequences is None:
            return jax.tree_util.tree_map(jnp.zeros_like, self)
        mask = jnp.asarray(sequences)
        if mask.dtype != jnp.bool_:
            mask = jnp.zeros((self.batch_size,), bool).at[mask.astype(jnp.int32)].set(True)
        if mask.shape != (self.batch_size,):
            raise ShapeError(f"StateCache.reset: a mask of sequences must have shape ({self.batch_size},), got "
                             f"{tuple(mask.shape)}")
        states = {}
        for j, name in enumerate(self.layout.names):
            x = self.states[name]
            m = mask.reshape((-1,) + (1,) * (x.ndim - self.layout.batch_axis(j) - 1))
            states[name] = jnp.where(m, jnp.zeros((), x.dtype), x)
        return StateCache(states, jnp.where(mask[None, :], 0, self.layer_positions), self.layout)

    # ---- sharding --------------------------------------------------------------------------------------
    def partition_specs(self, batch_axis: str | None = "data", head_axis: str | None = None,
                        head_dim: str = "h") -> "StateCache":
        """A cache-shaped pytree of PartitionSpecs: the batch dim over mesh axis `batch_axis`, the head dim
        (`head_dim`, in the states that have it) over `head_axis`, everything else replicated; the layer axis is
        never split. Use with `jax.jit(..., out_shardings=)` or `cache.shardings(mesh)`."""
        specs = []
        for j, dims in enumerate(self.layout.dims):
            axes = [batch_axis if d == self.layout.batch_dim else head_axis if d == head_dim else None for d in dims]
            specs.append(PartitionSpec(None, *axes))
        return StateCache(dict(zip(self.layout.names, specs)), PartitionSpec(None, batch_axis), self.layout)

    def shardings(self, mesh, batch_axis: str | None = "data", head_axis: str | None = None,
                  head_dim: str = "h") -> "StateCache":
        """partition_specs as NamedShardings on `mesh` (for `jax.device_put(cache, cache.shardings(mesh))`)."""
        for ax in (batch_axis, head_axis):
            if ax is not None and ax not in mesh.axis_names:
                raise ShapeError(f"StateCache.shardings: mesh has axes {tuple(mesh.axis_names)}, not '{ax}'")
        specs = self.partition_specs(batch_axis, head_axis, head_dim)
        return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                      is_leaf=lambda x: isinstance(x, PartitionSpec))

    # ---- helpers -----------------------------------------------------------------------------------------
    def _index(self, i):
        L = self.layout.num_layers
        if isinstance(i, (int, np.integer)) and not isinstance(i, bool):
            if not -L <= i < L:
                raise LayerIndexError(f"StateCache: layer {i} out of range; the cache holds {L} layers "
                                      f"(0..{L - 1})")
            return int(i) % L
        if jnp.ndim(i) == 0 and jnp.issubdtype(jnp.result_type(i), jnp.integer):
            return i  # traced: checked by nobody, clamped by JAX
        raise LayerIndexError(f"StateCache: layer index must be an int, got {i!r}")

    def _as_dict(self, new_states) -> dict:
        names = self.layout.names
        if isinstance(new_states, dict):
            unknown = [n for n in new_states if n not in names]
            missing = [n for n in names if n not in new_states]
            if unknown or missing:
                raise ShapeError(f"StateCache.update: states are {', '.join(names)}; "
                                 + "; ".join(x for x in (f"unknown {', '.join(unknown)}" if unknown else "",
                                                         f"missing {', '.join(missing)}" if missing else "") if x))
            return new_states
        if isinstance(new_states, (list, tuple)):
            if len(new_states) != len(names):
                raise ShapeError(f"StateCache.update: got {len(new_states)} states, expected {len(names)} "
                                 f"({', '.join(names)})")
            return dict(zip(names, new_states))
        if len(names) != 1:
            raise ShapeError(f"StateCache.update: the cache holds {len(names)} states per layer "
                             f"({', '.join(names)}); pass a dict or a tuple")
        return {names[0]: new_states}

    def __repr__(self):
        parts = ", ".join(f"{n}{list(s)}" for n, s in zip(self.layout.names, self.layout.shapes))
        return f"<ssmc.StateCache {self.layout.kernel}: {self.num_layers} layers x {parts} {self.layout.dtype}>"

    def nbytes(self) -> int:
        item = jnp.dtype(self.layout.dtype).itemsize
        return self.num_layers * sum(math.prod(s) for s in self.layout.shapes) * item


def _decl(name, dims) -> str:
    return f"{name}[{','.join(dims)}]"
