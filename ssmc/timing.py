"""Wall-clock timing of jitted calls, shared by the CLI's `run` and the benchmarks."""
from __future__ import annotations

import statistics
import time


def time_calls(fn, args, warmup: int = 1, repeats: int = 10):
    """(first call in seconds, median ms of `repeats` calls after `warmup` more, last result); every call is
    waited for with block_until_ready. The first call includes tracing and compilation."""
    import jax

    t0 = time.perf_counter()
    res = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        res = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times) * 1e3, res
