"""Golden tests: the IR after every pass and the emitted source (XLA, the kernel targets, a derived backward),
pinned for a few examples.

Regenerate after an intended change with `SSMC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py` and review
the diff like code.
"""
import os
import pathlib

import pytest

import ssmc

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = pathlib.Path(__file__).parent / "golden"
# (example, chunk_size): scalar SSD, elementwise chunked scan (forced) and its CPU default, key-wise with a
# read-before-update readout, and a non-diagonal sequential scan
CASES = [("mamba2", None), ("mamba1", 32), ("mamba1", None), ("rwkv6", None), ("deltanet", None)]


def _check(path: pathlib.Path, text: str):
    if os.environ.get("SSMC_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with SSMC_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path.name} changed; review and regenerate with SSMC_UPDATE_GOLDEN=1"


def _stem(name, chunk):
    return name if chunk is None else f"{name}.q{chunk}"


@pytest.mark.parametrize("name,chunk", CASES)
def test_passes_golden(name, chunk):
    k = ssmc.compile(ROOT / "examples" / f"{name}.ssm", chunk_size=chunk, cache=False)
    text = "".join(f"==== {p}\n{t}" for p, t in k.passes)
    _check(GOLDEN / f"{_stem(name, chunk)}.passes.ir", text)


@pytest.mark.parametrize("name,chunk", CASES)
def test_source_golden(name, chunk):
    k = ssmc.compile(ROOT / "examples" / f"{name}.ssm", chunk_size=chunk, cache=False)
    _check(GOLDEN / f"{_stem(name, chunk)}.xla.py", k.source)


# the kernel targets' emitted source: SSD chunk walk, a sequential step kernel, and the Pallas form of the SSD walk
KERNEL_CASES = [("mamba2", "triton"), ("deltanet", "triton"), ("mamba2_gated", "triton"), ("mamba2", "tpu")]


@pytest.mark.parametrize("name,target", KERNEL_CASES)
def test_kernel_source_golden(name, target):
    k = ssmc.compile(ROOT / "examples" / f"{name}.ssm", target=target, cache=False)
    _check(GOLDEN / f"{name}.{target}.py", k.source)


# the derived backward (passes/adjoint.py through the same passes and emitter): its programs after every pass, and
# the Triton kernels of the SSD walk (the per-chunk decay gradient's outs, reversed time)
@pytest.mark.parametrize("name,target", [("mamba2", "triton")])
def test_backward_golden(name, target):
    k = ssmc.compile(ROOT / "examples" / f"{name}.ssm", target=target, cache=False)
    text = "".join(f"==== {p}\n{t}" for p, t in k.backward_passes)
    _check(GOLDEN / f"{name}.{target}.backward.passes.ir", text)
    _check(GOLDEN / f"{name}.{target}.backward.py", k.backward_source)
