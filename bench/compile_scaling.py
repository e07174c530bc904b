#!/usr/bin/env python
"""Benchmark: compile time against spec length. A state read through a chain of n statements (`v = v * 1.0001` or
`v = v + x`); `ssmc.compile(..., cache=False)` after the parser is built, best of --repeats, wall seconds.

    python bench/compile_scaling.py [--n 1000 2000 4000] [--repeats 2]

Linear work shows as a ratio near 2 between n and 2n. (The count of items the linearity analysis touches, which
does not depend on the machine's load, is pinned in tests/test_compile_scaling.py.)
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))

import ssmc  # noqa: E402
from test_compile_scaling import readout_chain  # noqa: E402


def best(text: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ssmc.compile(text, cache=False)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 2000, 4000])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    ssmc.compile(readout_chain(3, "mul"), cache=False)  # parser built
    print("| n | mul (s) | add (s) |\n|---:|---:|---:|")
    for n in args.n:
        row = [best(readout_chain(n, kind), args.repeats) for kind in ("mul", "add")]
        print(f"| {n} | {row[0]:.2f} | {row[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
