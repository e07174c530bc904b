"""Random inputs for any compiled spec, chosen so the recurrence stays bounded.

    inputs = random_inputs(kernel, {"b": 2, "t": 1024, "h": 8, "p": 16, "n": 16, "g": 1})
    outs_and_states = kernel(**inputs)

The sampler knows nothing about particular models. It only uses what the compiler reports about the spec:
the `in` arrays and their dims, the `group` declarations, the scan dim and `Kernel.decay_inputs` (the inputs
that the states' per-step decays depend on). How a decay is built from them (``exp(dt*A)``, ``gamma``,
``exp(-exp(w))``, ...) is not known, so the signs of the decay inputs are found by trying them on a short
probe run of the spec's sequential form (see `random_inputs`).
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from .errors import ShapeError

SCALE = 0.5              # standard deviation of the inputs that are not decay inputs
DECAY_MIN, DECAY_MAX = 0.05, 0.95
SIGN_PROBE_STEPS = 8     # length of the sign probe along the scan dim
GROWTH_PROBE_STEPS = 64  # length of each of the two halves of the growth check
GROWTH_LIMIT = 4.0       # state norm may at most grow by this factor from one half to the next
MAX_HALVINGS = 3         # of SCALE, when the growth check fails
MAX_PROBED_INPUTS = 10   # 2**10 sign patterns at most; further decay inputs stay positive


def random_inputs(k, sizes: dict, seed: int = 0, dtype=np.float32, probe: bool = True) -> dict:
    """Fresh random arrays (never zeros) for every `in` array of kernel `k`, stable under the recurrence.

    `sizes` maps every dim named by an `in` array (dims as written in the spec) to its size; for each
    `group g -> h`, sizes[h] must be a multiple of sizes[g]. Returns ``{name: numpy array}`` of `dtype`
    with the declared shapes, deterministic in (`sizes`, `seed`).

    Sampling (each array draws its own standard normal N from one generator seeded with `seed`):

    * an input that is not a decay input: ``N * 0.5``;
    * an input in ``k.decay_inputs`` (the states' decays a_t depend on it): ``sign * (|N| * 0.5 + 0.05)``,
      capped at 0.95 in magnitude so a decay used directly as a factor (``gamma*S``) stays below 1; `sign`
      is one of +1/-1 for the whole array.

    Choosing the signs: a decay input may need to be positive (``dt`` in ``exp(dt*A)``, ``gamma``) or
    negative (``A``) and only the combination matters, so every sign pattern (2**len(decay_inputs), at
    most 2**10; all-positive first) is tried on a probe: the same spec compiled with ``chunk_size=1`` (the
    sequential scan, i.e. the recurrence itself), run from zero states on the candidate arrays cut to their
    first 8 steps along the scan dim and to size 1 along the batch-like dims (dims before the scan dim in
    every scanned input and absent from the unscanned ones); all other dims keep the sizes given. The
    pattern whose final states have the smallest finite L2 norm wins; a decay of magnitude > 1 grows the
    state geometrically and loses.

    Growth check: recurrences with no decay input to tune can still grow without bound on random data (a
    delta rule ``S + beta*k⊗(v - k·S)`` does when beta*|k|^2 is large). So the sequential form is then run
    for 2 x 64 steps (fewer when the scan dim is shorter) and if the state norm grows by more than 4x from
    the first half to the second (or is not finite), the 0.5 of the non-decay inputs is halved and the signs
    chosen again, up to 3 times. `probe=False` skips both probes (all signs positive, scale 0.5).
    """
    inputs = list(k.inputs)
    needed = [d for _, dims in inputs for d in dims]
    missing = sorted({d for d in needed if d not in sizes}, key=needed.index)
    if missing:
        raise ShapeError(f"{k.name}: no size given for dim{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    sizes = {d: _size(d, n) for d, n in sizes.items()}
    for g, h in k.program.groups:
        if g in sizes and h in sizes and sizes[h] % sizes[g]:
            raise ShapeError(f"{k.name}: `group {g} -> {h}` needs dim '{h}' ({sizes[h]}) to be a multiple of "
                             f"dim '{g}' ({sizes[g]})")

    rng = np.random.default_rng(seed)
    normals = {name: rng.standard_normal(tuple(sizes[d] for d in dims)) for name, dims in inputs}
    decay = [n for n in getattr(k, "decay_inputs", ()) if n in normals]
    probed = decay[:MAX_PROBED_INPUTS]

    scale, signs = SCALE, dict.fromkeys(probed, 1.0)
    if probe:
        prober = _Prober(k, sizes)
        for attempt in range(MAX_HALVINGS + 1):
            base = _draw(normals, decay, scale)
            if probed:
                signs = dict(zip(probed, prober.best_signs(base, probed)))
            if attempt == MAX_HALVINGS or prober.bounded(_signed(base, signs)):
                break
            scale /= 2
    base = _signed(_draw(normals, decay, scale), signs)

    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    return {name: base[name].astype(np.float32).astype(dt) for name, _ in inputs}


def batch_dims(k) -> list[str]:
    """Dims that come before the scan dim in every scanned input and appear in no unscanned input."""
    scan = k.program.scan
    scanned = [dims for _, dims in k.inputs if scan in dims]
    if not scanned:
        return []
    params = {d for _, dims in k.inputs if scan not in dims for d in dims}
    common = set(scanned[0][: scanned[0].index(scan)])
    for dims in scanned[1:]:
        common &= set(dims[: dims.index(scan)])
    return [d for d in scanned[0] if d in common and d not in params]


def _draw(normals: dict, decay: list[str], scale: float) -> dict:
    out = {}
    for name, z in normals.items():
        if name in decay:
            x = np.minimum(np.abs(z) * 0.5 + DECAY_MIN, DECAY_MAX)
        else:
            x = z * scale
            if x.size and not np.any(x):  # astronomically unlikely, but "never zeros" is a promise
                x = x + scale
        out[name] = x
    return out


def _signed(base: dict, signs: dict) -> dict:
    return {n: v * signs[n] if n in signs else v for n, v in base.items()}


class _Prober:
    """Runs the spec's sequential form on cuts of candidate inputs (batch-like dims cut to 1)."""

    def __init__(self, k, sizes):
        import ssmc

        self.k = k
        self.seq = ssmc.compile(k.program.source, target=k.target, chunk_size=1, interpret=k.interpret)
        self.scan = k.program.scan
        self.batch = set(batch_dims(k))
        self.length = sizes[self.scan]
        self.n_out = len(k.outs)

    def _cut(self, arrays: dict, start: int, stop: int) -> dict:
        out = {}
        for name, dims in self.k.inputs:
            idx = tuple(slice(start, stop) if d == self.scan else slice(0, 1) if d in self.batch else slice(None)
                        for d in dims)
            out[name] = np.ascontiguousarray(arrays[name][idx], dtype=np.float32)
        return out

    def _run(self, arrays: dict, init=None):
        init = dict(zip([s for s, _ in self.k.states], init)) if init is not None else None
        res = self.seq.apply(arrays, init)  # any input name (even initial_states) reaches its input
        return res[self.n_out:]

    @staticmethod
    def _norm(states) -> float:
        total = sum(float(np.sum(np.square(np.asarray(s, np.float64)))) for s in states)
        return math.sqrt(total) if math.isfinite(total) else math.inf

    def best_signs(self, base: dict, probed: list[str]) -> tuple[float, ...]:
        cut = self._cut(base, 0, min(SIGN_PROBE_STEPS, self.length))
        best, best_norm = tuple(1.0 for _ in probed), math.inf
        for pattern in itertools.product((1.0, -1.0), repeat=len(probed)):
            trial = dict(cut)
            for name, s in zip(probed, pattern):
                trial[name] = cut[name] * np.float32(s)
            norm = self._norm(self._run(trial))
            if norm < best_norm:
                best, best_norm = pattern, norm
        return best

    def bounded(self, arrays: dict) -> bool:
        half = min(GROWTH_PROBE_STEPS, self.length // 2)
        if half < 4 or not self.k.states:
            return True
        first = self._run(self._cut(arrays, 0, half))
        second = self._run(self._cut(arrays, half, 2 * half), init=first)
        n1, n2 = self._norm(first), self._norm(second)
        if not math.isfinite(n2):
            return False
        return n1 == 0.0 or n2 <= GROWTH_LIMIT * n1


def _size(dim, n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ShapeError(f"size of dim '{dim}' must be a positive int, got {n!r}")
    return int(n)


def zero_states_for_unsized(k, sizes: dict) -> dict:
    """Zero initial states for the states with a dim no input carries (their size comes only from the state)."""
    import jax.numpy as jnp

    from .window import window_dims

    # conv window dims are sized by the kernel from the conv weight
    covered = {d for _, dims in k.inputs for d in dims} | set(window_dims(k.program))
    return {n: jnp.zeros(tuple(sizes[d] for d in dims), jnp.float32)
            for n, dims in k.states if not set(dims) <= covered}
