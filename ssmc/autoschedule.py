"""The default schedule on the CPU backend: the chunked or the sequential form, whichever measures faster, chosen
once per shape bucket.

Why measure: on CPU the chunk-parallel form of the XLA target is not always the faster one. Key-wise decays
(GLA, HGRN2) spend a chunk's exps on its [C, C, K] diagonal sub-chunk blocks and [n, Q, K] sub-chunk factors, and
small head dims leave the chunk einsums too small to pay for their extra passes, so one sequential walk over time
(a lax.scan) beats them several times over on CPU (GLA b=1 t=2048 h=4 dk=dv=64: 4-10x), while Mamba2-sized
scalar decays run 2x faster chunked. The ratio moves with the head dims, the length, the batch and the machine, so no
class rule orders them. The first call of a kernel at a new shape bucket compiles both forms, runs each once
(compile, warm-up), then times them interleaved (best of 3-15 runs, about 0.1-0.3 s) on random inputs of the
call's shapes and dtypes, so it also works while the caller is being traced by jax.jit or jax.grad (the timing
runs eagerly), and keeps the faster. The choice is kept in memory and in the ssmc disk cache under (the spec's
IR, both pipelines, the bucket, the dtypes, backend, CPU model and core count, ssmc/jax versions): another process
takes it without measuring.

A bucket rounds every size up to a power of two: a length or batch within it reuses the choice. Only the XLA
target on the CPU backend with chunk_size=None is measured; an explicit chunk_size always wins, and
SSMC_AUTOSCHEDULE=0 keeps the class default (the chunked form) without measuring. `k.schedule` says which form
each bucket took and why; `ssmc run` prints it.
"""
from __future__ import annotations

import math
import os
import platform
import threading
import time

ENV = "SSMC_AUTOSCHEDULE"
MIN_RUNS, MAX_RUNS, BUDGET_S = 3, 15, 0.2
MEASUREMENTS = 0  # how many buckets this process measured (tests count it)


def attach(k, text: str, chunk_size, cache: bool) -> None:
    """Give kernel `k` (just compiled) a measured default schedule where one applies: XLA target, CPU backend,
    no chunk_size given, and a default form that is chunked (a sequential default has nothing to choose)."""
    import jax
    if (k.target != "xla" or chunk_size is not None or jax.default_backend() != "cpu"
            or os.environ.get(ENV, "1") == "0" or not _is_chunked(k.ir)):
        return
    k._auto = AutoSchedule(k, text, cache)
    k.ir = k.ir.rstrip("\n") + ("\n# autoschedule: on the CPU backend each shape bucket runs this chunked form or the "
                                "sequential scan (chunk_size=1), whichever measured faster; k.schedule lists the "
                                "choices\n")


def describe(k) -> str:
    """What `k.schedule` says: the form(s) the kernel runs and why."""
    auto = getattr(k, "_auto", None)
    if auto is None:
        note = _chunk_note(k.ir)
        return f"{note} (fixed at compile time)" if note else "fixed at compile time"
    return auto.describe()


def default_chunk(k) -> int | None:
    """The chunk length of a measured kernel's chunked form (None for a kernel with a fixed schedule)."""
    import re
    if getattr(k, "_auto", None) is None:
        return None
    m = re.search(r"chunk length (\d+)", _chunk_note(k.ir))
    return int(m.group(1)) if m else None


def chosen_form(k) -> str:
    """The form the last call of a measured kernel ran ("chunked" / "sequential"; "not called yet")."""
    auto = getattr(k, "_auto", None)
    return auto.last["form"] if auto is not None and auto.last else "not called yet"


def _chunk_note(ir: str) -> str:
    return next((ln.strip()[len("# chunk:"):].strip() for ln in ir.splitlines() if ln.strip().startswith("# chunk:")),
                "")


def _is_chunked(ir: str) -> bool:
    return _chunk_note(ir).startswith("chunk-parallel form")


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _cpu() -> str:
    """The CPU model and core count: the ratio of the two forms depends on both."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return f"{platform.machine()} {model} x{os.cpu_count()}"


class AutoSchedule:
    def __init__(self, kernel, text: str, cache: bool):
        self.kernel, self.text, self.cache = kernel, text, cache
        self._seq = None
        self._lock = threading.Lock()
        self.choices: dict[str, dict] = {}  # bucket -> {"form", "why", ...}
        self.last: dict | None = None        # the choice of the latest call

    def sequential(self):
        if self._seq is None:
            import ssmc
            self._seq = ssmc.compile(self.text, target="xla", chunk_size=1, cache=self.cache,
                                     matmul=self.kernel.matmul)
        return self._seq

    def __call__(self, meta, arrays):
        self.last = self.choose(meta, arrays)
        k = self.kernel if self.last["form"] == "chunked" else self.sequential()
        return k._jitted(meta, arrays)

    # ---- the choice --------------------------------------------------------------------------------------
    def bucket(self, meta, arrays) -> str:
        sizes = ",".join(f"{d}={_pow2(n)}" for d, n in meta.sizes)
        dtypes = ",".join(f"{n}:{arrays[n].dtype}" for n in sorted(arrays))
        return f"{sizes};{dtypes};act={meta.act};out={meta.out}" + (f";seqs={meta.seqs}" if meta.seqs else "")

    def choose(self, meta, arrays) -> dict:
        b = self.bucket(meta, arrays)
        hit = self.choices.get(b)
        if hit is not None:
            return hit
        with self._lock:
            hit = self.choices.get(b)
            if hit is None:
                hit = self._persisted(b)
            if hit is None:
                hit = self._measure(meta, arrays)
                self._persist(b, hit)
            self.choices[b] = hit
        return hit

    def _key(self, b: str) -> str:
        import jax

        from . import __version__
        from .cache import cache_key, code_fingerprint
        from .targets import get_target
        return cache_key(kind="schedule", ir=self.kernel.program.text(), chunked=self.kernel.pipeline,
                         sequential=get_target("xla").pipeline(1), bucket=b, backend=jax.default_backend(),
                         cpu=_cpu(), matmul=self.kernel.matmul, version=__version__, compiler=code_fingerprint(),
                         jax=jax.__version__)

    def _persisted(self, b: str) -> dict | None:
        if not self.cache:
            return None
        from .cache import DiskCache
        hit = DiskCache().get(self._key(b))
        if hit is None or hit.get("form") not in ("chunked", "sequential") or not isinstance(hit.get("why"), str):
            return None
        return dict(hit, why=hit["why"] + " (disk cache)")

    def _persist(self, b: str, choice: dict) -> None:
        if self.cache and choice.get("measured"):
            from .cache import DiskCache
            DiskCache().put(self._key(b), choice)

    def _measure(self, meta, arrays) -> dict:
        """Time both forms on random inputs of the call's shapes and dtypes (eagerly, also under tracing)."""
        global MEASUREMENTS
        import jax
        import jax.numpy as jnp

        from .sampling import random_inputs
        sizes = dict(meta.sizes)
        at = " ".join(f"{d}={n}" for d, n in meta.sizes)
        try:
            seq = self.sequential()
            with jax.ensure_compile_time_eval():
                drawn = random_inputs(self.kernel, sizes, seed=0, probe=False)
                syn = {}
                for n, x in arrays.items():
                    if n.startswith("state:"):
                        syn[n] = jnp.zeros(x.shape, x.dtype)
                    elif n not in drawn:  # a packed call's offsets
                        syn[n] = x
                    else:
                        syn[n] = jnp.asarray(drawn[n]).astype(x.dtype)
                forms = {"chunked": lambda: self.kernel._jitted(meta, syn), "sequential": lambda: seq._jitted(meta, syn)}
                for f in forms.values():  # compile and warm up
                    jax.block_until_ready(f())
                times = {n: [] for n in forms}
                start = time.perf_counter()
                for r in range(MAX_RUNS):
                    for n, f in forms.items():
                        t0 = time.perf_counter()
                        jax.block_until_ready(f())
                        times[n].append(time.perf_counter() - t0)
                    if r + 1 >= MIN_RUNS and time.perf_counter() - start > BUDGET_S:
                        break
        except Exception as e:  # noqa: BLE001  (a form that fails to run here: keep the class default)
            return {"form": "chunked", "measured": False,
                    "why": f"class default; measuring at {at} failed ({type(e).__name__}: {e})"}
        MEASUREMENTS += 1
        c, s = (min(times[n]) * 1e3 for n in ("chunked", "sequential"))
        form = "sequential" if s < c else "chunked"
        return {"form": form, "measured": True, "chunked_ms": round(c, 4), "sequential_ms": round(s, 4),
                "why": f"measured at {at}: chunked {c:.3g} ms, sequential {s:.3g} ms (best of {len(times['chunked'])})"}

    def describe(self) -> str:
        head = (f"auto (CPU): per shape bucket, the faster of {_chunk_note(self.kernel.ir)} and the sequential scan, "
                f"measured on the first call")
        if not self.choices:
            return head + "; no call yet"
        return head + "".join(f"\n  {b.split(';')[0]}: {c['form']} ({c['why']})" for b, c in self.choices.items())
