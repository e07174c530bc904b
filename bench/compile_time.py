#!/usr/bin/env python
"""Benchmark: how long a fresh process takes to `import ssmc` and to `ssmc.compile` a spec, with an empty disk
cache (cold) and with the spec, the parser and the compiler fingerprint already cached (warm).

    python bench/compile_time.py --runs 10 [--spec examples/mamba2.ssm] [--target xla]

Every measurement is a new python process on a private cache directory (JAX_PLATFORMS=cpu). "compile" includes
everything ssmc.compile does, jax's backend initialisation among it (the XLA target asks jax which backend it
is on); "compile, backend up" is the same call after `jax.default_backend()` already ran, as in a process that
has touched jax before compiling. Prints medians (and min-max) in milliseconds of wall time, and the median CPU
time of the process (user + system: less sensitive to a shared, loaded machine) as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, time
c0, t0 = time.process_time(), time.perf_counter()
import ssmc
c1, t1 = time.process_time(), time.perf_counter()
if {backend_first}:
    import jax
    jax.default_backend()
c2, t2 = time.process_time(), time.perf_counter()
k = ssmc.compile({spec!r}, target={target!r})
c3, t3 = time.process_time(), time.perf_counter()
print(json.dumps({{"import": [t1 - t0, c1 - c0], "compile": [t3 - t2, c3 - c2], "from_disk": k.from_disk_cache}}))
"""


def run(spec: str, target: str, cache: str, backend_first: bool) -> dict:
    env = dict(os.environ, SSMC_CACHE_DIR=cache, JAX_PLATFORMS="cpu")
    env.setdefault("PYTHONPATH", str(ROOT))
    code = _CHILD.format(spec=spec, target=target, backend_first=backend_first)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--spec", default=str(ROOT / "examples" / "mamba2.ssm"))
    ap.add_argument("--target", default="xla")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    rows = {"import ssmc": [], "compile, cold cache": [], "compile, warm cache": [],
            "compile, warm cache, backend up": []}
    for _ in range(args.runs):
        cache = tempfile.mkdtemp(prefix="ssmc-bench-")
        try:
            cold = run(args.spec, args.target, cache, False)
            warm = run(args.spec, args.target, cache, False)
            up = run(args.spec, args.target, cache, True)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        assert not cold["from_disk"] and warm["from_disk"] and up["from_disk"]
        rows["import ssmc"] += [warm["import"], up["import"]]
        rows["compile, cold cache"].append(cold["compile"])
        rows["compile, warm cache"].append(warm["compile"])
        rows["compile, warm cache, backend up"].append(up["compile"])
    print(f"{pathlib.Path(args.spec).name}, target {args.target}, {args.runs} runs, fresh process each\n")
    print("| step | median wall ms | min-max wall ms | median CPU ms |\n|---|---|---|---|")
    for name, xs in rows.items():
        ms = [1e3 * w for w, _ in xs]
        cpu = [1e3 * c for _, c in xs]
        print(f"| {name} | {statistics.median(ms):.1f} | {min(ms):.1f}-{max(ms):.1f} | {statistics.median(cpu):.1f} |")
    import jax
    import lark
    print(f"\npython {platform.python_version()}, jax {jax.__version__}, lark {lark.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus")


if __name__ == "__main__":
    main()
