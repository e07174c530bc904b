"""Small helpers several test files share (parametrisation of the fast and the slow set, ids)."""
from __future__ import annotations

import numpy as np
import pytest


def case_id(case) -> str:
    """Test id of a (chunk_size, t, with initial states) case."""
    chunk, t, init = case
    return f"chunk{chunk}-t{t}-{'init' if init else 'zero'}"


def first_fast(cases, ids=case_id):
    """pytest params of `cases`: the first stays in the fast set (-m "not slow"), the others are marked slow."""
    return [pytest.param(c, id=ids(c), marks=() if k == 0 else pytest.mark.slow) for k, c in enumerate(cases)]


def central_differences(loss, arrays: dict, name: str, idx, eps: float = 1e-3) -> np.ndarray:
    """d loss() / d arrays[name].flat[i] for every i in idx, by central differences: `loss` takes no arguments and
    reads `arrays` (float64), whose entry is perturbed in place and restored."""
    out = []
    a = arrays[name]
    for i in idx:
        orig = a.flat[i]
        a.flat[i] = orig + eps
        lp = loss()
        a.flat[i] = orig - eps
        lm = loss()
        a.flat[i] = orig
        out.append((lp - lm) / (2 * eps))
    return np.array(out)
