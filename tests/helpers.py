"""Small helpers several test files share (parametrisation of the fast and the slow set, ids); finite differences
are tests/reference.py's."""
from __future__ import annotations

import pytest


def case_id(case) -> str:
    """Test id of a (chunk_size, t, with initial states) case."""
    chunk, t, init = case
    return f"chunk{chunk}-t{t}-{'init' if init else 'zero'}"


def first_fast(cases, ids=case_id):
    """pytest params of `cases`: the first stays in the fast set (-m "not slow"), the others are marked slow."""
    return [pytest.param(c, id=ids(c), marks=() if k == 0 else pytest.mark.slow) for k, c in enumerate(cases)]
