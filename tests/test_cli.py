"""The `ssmc` command line (ssmc.cli), in-process through main(argv) and as `python -m ssmc` subprocesses."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import ssmc
from ssmc import cli
from ssmc.cache import DiskCache
from ssmc.sampling import batch_dims, random_inputs

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MAMBA2 = str(EXAMPLES / "mamba2.ssm")
TINY = "b=1,t=40,h=2,p=4,n=4,g=1"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "ssmc-cache"
    monkeypatch.setenv("SSMC_CACHE_DIR", str(d))
    return d


def run_main(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def run_module(*argv, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "ssmc", *argv], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def bad_spec(tmp_path) -> pathlib.Path:
    p = tmp_path / "bad.ssm"
    p.write_text((EXAMPLES / "mamba2.ssm").read_text().replace("y = C·h + D*x", "y = C·h + E*x"))
    return p


# ---- check ------------------------------------------------------------------------------------------------

def test_check_ok(capsys):
    rc, out, err = run_main(capsys, "check", MAMBA2)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    line = lines[0]
    for part in ("mamba2", "x[b,t,h,p]", "dt[b,t,h]", "h[b,h,p,n] scalar", "y[b,t,h,p]", "chunk length 64"):
        assert part in line, line


def test_check_reports_sequential_schedule(capsys):
    rc, out, _ = run_main(capsys, "check", str(EXAMPLES / "deltanet.ssm"))
    assert rc == 0
    assert "S[b,h,dk,dv] non-diagonal" in out and "sequential scan (not chunkable)" in out


def test_check_error_exit_code_and_caret(tmp_path):
    p = bad_spec(tmp_path)
    proc = run_module("check", str(p))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"{p}:11:13: undeclared name 'E'"), proc.stderr
    assert lines[1] == "    y = C·h + E*x"
    assert lines[2] == "  " + " " * 12 + "^"


def test_missing_file(capsys, tmp_path):
    rc, out, err = run_main(capsys, "check", str(tmp_path / "nope.ssm"))
    assert rc == 1 and out == ""
    assert "nope.ssm" in err and "not found" in err and "Traceback" not in err


def test_bad_target_is_friendly(capsys):
    rc, _, err = run_main(capsys, "compile", MAMBA2, "--target", "cuda9")
    assert rc == 1
    assert err.startswith("ssmc: error:") and "unknown target 'cuda9'" in err


# ---- compile ----------------------------------------------------------------------------------------------

def test_compile_emit_ir(capsys):
    rc, out, _ = run_main(capsys, "compile", MAMBA2, "--emit", "ir", "--chunk-size", "16")
    assert rc == 0
    k = ssmc.compile(MAMBA2, chunk_size=16)
    assert out == k.ir + ("" if k.ir.endswith("\n") else "\n")
    assert "# chunk: chunk-parallel form, chunk length 16" in out


def test_compile_emit_passes(capsys):
    rc, out, _ = run_main(capsys, "compile", MAMBA2, "--emit", "passes")
    assert rc == 0
    k = ssmc.compile(MAMBA2)
    headers = re.findall(r"^// ===== pass (\d+): (\S+) =====$", out, re.M)
    assert headers == [(str(i), name) for i, (name, _) in enumerate(k.passes)]
    assert [n for _, n in headers][:1] == ["lower"] and len(headers) >= 3
    for _, text in k.passes:
        assert text.strip() in out


def test_compile_emit_source(capsys):
    rc, out, _ = run_main(capsys, "compile", MAMBA2, "--emit", "source", "--chunk-size", "1")
    assert rc == 0
    assert out.rstrip("\n") == ssmc.compile(MAMBA2, chunk_size=1).source.rstrip("\n")
    compile(out, "<emitted>", "exec")


def test_compile_emit_graph(capsys):
    rc, out, _ = run_main(capsys, "compile", MAMBA2, "--emit", "graph")
    assert rc == 0
    assert re.match(r"\s*(strict\s+)?digraph\b", out) and out.rstrip().endswith("}")


def test_compile_rejects_bad_emit(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["compile", MAMBA2, "--emit", "asm"])
    assert info.value.code == 2


# ---- run --------------------------------------------------------------------------------------------------

def parse_errors(out: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+((?:out|state) \S+)\s+\S+\s+(\S+)$", out, re.M)}


def test_run_mamba2_module(cache_dir):
    proc = run_module("run", "examples/mamba2.ssm", "--dims", TINY, "--repeats", "2", "--chunk-size", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for part in ("mamba2", "target    xla", "chunk length 8", "b=1 t=40 h=2 p=4", "chunked", "sequential",
                 "speedup", "OK"):
        assert part in out, out
    errs = parse_errors(out)
    assert set(errs) == {"out y", "state h"}, out
    assert all(0 <= e < 1e-4 for e in errs.values()), errs
    assert DiskCache(cache_dir).info()["entries"] >= 2  # the run used the private cache


def test_run_other_example(capsys):
    rc, out, err = run_main(capsys, "run", str(EXAMPLES / "linear_attention.ssm"), "--dims",
                            "b=1,t=24,h=2,dk=3,dv=5", "--repeats", "1", "--chunk-size", "8")
    assert rc == 0, out + err
    assert set(parse_errors(out)) == {"out o", "out den", "state S", "state z"}
    assert "OK" in out


@pytest.mark.parametrize("target", ["triton", "tpu"])
def test_run_kernel_target_interpreted(cache_dir, target):
    """`--interpret` runs a kernel target's chunked and sequential kernels in its CPU interpreter."""
    proc = run_module("run", "examples/mamba2.ssm", "--target", target, "--interpret", "--dims", TINY,
                      "--repeats", "1", "--chunk-size", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"target    {target}" in proc.stdout and "OK" in proc.stdout, proc.stdout
    errs = parse_errors(proc.stdout)
    assert set(errs) == {"out y", "state h"} and all(0 <= e < 1e-4 for e in errs.values()), errs


def test_run_fails_above_tolerance(capsys):
    rc, out, _ = run_main(capsys, "run", MAMBA2, "--dims", TINY, "--repeats", "1", "--chunk-size", "8",
                          "--tol", "0")
    assert rc == 1
    assert "FAIL" in out


def test_run_bad_dims(capsys):
    rc, _, err = run_main(capsys, "run", MAMBA2, "--dims", "b=1,zz=3")
    assert rc == 1 and "zz" in err and "Traceback" not in err
    rc, _, err = run_main(capsys, "run", MAMBA2, "--dims", "b=two")
    assert rc == 1 and "b" in err and "integer" in err
    rc, _, err = run_main(capsys, "run", MAMBA2, "--dims", "h=3,g=2")
    assert rc == 1 and "multiple" in err


def test_default_dims():
    k = ssmc.compile(MAMBA2)
    assert cli.default_dims(k, {}) == dict(b=2, t=1024, h=16, p=16, n=16, g=1)
    # the mapped dim is rounded up to a multiple of the group dim's size when not given
    assert cli.default_dims(k, {"g": 3})["h"] == 18
    assert cli.default_dims(k, {"t": 7, "g": 2, "h": 4}) == dict(b=2, t=7, h=4, p=16, n=16, g=2)


# ---- sampling ---------------------------------------------------------------------------------------------

def test_random_inputs_shapes_and_stability():
    k = ssmc.compile(MAMBA2)
    sizes = dict(b=2, t=300, h=4, p=3, n=2, g=2)
    xs = random_inputs(k, sizes, seed=1)
    assert set(xs) == {"x", "dt", "A", "B", "C", "D"}
    assert xs["B"].shape == (2, 300, 2, 2) and xs["A"].shape == (4,)
    assert all(x.dtype == np.float32 and np.all(x != 0) for x in xs.values())
    # dt*A < 0 everywhere: exp(dt*A) is a decay
    assert np.all(np.sign(xs["dt"])[..., :] * np.sign(xs["A"]) < 0)
    assert np.all(np.abs(xs["A"]) < 1)
    y, h = k(**xs)
    assert np.all(np.isfinite(np.asarray(y))) and np.abs(np.asarray(h)).max() < 1e3
    again = random_inputs(k, sizes, seed=1)
    assert all(np.array_equal(xs[n], again[n]) for n in xs)
    other = random_inputs(k, sizes, seed=2)
    assert not np.array_equal(xs["x"], other["x"])
    assert batch_dims(k) == ["b"]


def test_random_inputs_errors():
    k = ssmc.compile(MAMBA2)
    with pytest.raises(ssmc.ShapeError, match="multiple"):
        random_inputs(k, dict(b=1, t=4, h=3, p=2, n=2, g=2))
    with pytest.raises(ssmc.ShapeError, match="no size given for dim n"):
        random_inputs(k, dict(b=1, t=4, h=2, p=2, g=1))


def test_random_inputs_bfloat16():
    import jax.numpy as jnp

    k = ssmc.compile(str(EXAMPLES / "retnet.ssm"))
    xs = random_inputs(k, dict(b=1, t=16, h=2, dk=2, dv=2), dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in xs.values())
    assert 0 < float(np.abs(xs["gamma"].astype(np.float32)).max()) < 1


# ---- cache ------------------------------------------------------------------------------------------------

def test_cache_info_and_clear(capsys, cache_dir):
    ssmc.clear_cache()  # an in-process hit (retnet compiled by an earlier test) would write nothing to this root
    ssmc.compile((EXAMPLES / "retnet.ssm").read_text() + "\n# cli cache test\n", cache=True)
    rc, out, _ = run_main(capsys, "cache", "info")
    assert rc == 0
    assert re.search(rf"^root\s+{re.escape(str(cache_dir))}$", out, re.M), out
    assert re.search(r"^entries\s+1$", out, re.M), out
    assert int(re.search(r"^bytes\s+(\d+)$", out, re.M).group(1)) > 0
    rc, out, _ = run_main(capsys, "cache", "clear")
    assert rc == 0 and out.startswith("removed 1 entry from ")
    rc, out, _ = run_main(capsys, "cache", "info")
    assert re.search(r"^entries\s+0$", out, re.M)


def test_cache_info_module(cache_dir):
    proc = run_module("cache", "info")
    assert proc.returncode == 0, proc.stderr
    assert str(cache_dir) in proc.stdout
