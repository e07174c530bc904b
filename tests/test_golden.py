"""Golden tests: the IR after every pass and the emitted XLA source, pinned for a few examples.

Regenerate after an intended change with `SSMC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py` and review
the diff like code.
"""
import os
import pathlib

import pytest

import ssmc

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = pathlib.Path(__file__).parent / "golden"
CASES = ["mamba2", "mamba1", "rwkv6", "deltanet"]


def _check(path: pathlib.Path, text: str):
    if os.environ.get("SSMC_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with SSMC_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} changed; review and regenerate with SSMC_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("name", CASES)
def test_passes_golden(name):
    k = ssmc.compile(ROOT / "examples" / f"{name}.ssm", cache=False)
    text = "".join(f"==== {p}\n{t}" for p, t in k.passes)
    _check(GOLDEN / f"{name}.passes.ir", text)


@pytest.mark.parametrize("name", CASES)
def test_source_golden(name):
    k = ssmc.compile(ROOT / "examples" / f"{name}.ssm", cache=False)
    _check(GOLDEN / f"{name}.xla.py", k.source)
