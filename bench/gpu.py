#!/usr/bin/env python
"""ssmc on an NVIDIA GPU against the hand-written Mamba2 kernels (mamba_ssm, fla): correctness and speed.

On the device machine (the `run` tool), from the repository root, with `.whl` and `.anchors` carried:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 bench/gpu.py

What runs, each part in its own fresh process (a failure in one is printed and the rest goes on):
  (a) environment: GPU, driver, versions (jax, triton, torch, jax_triton, fla, mamba_ssm, ...), and the copy
      bandwidth (1 GiB device-to-device copy, bytes read + written, median of many; torch `copy_` timed with
      CUDA events and jax `a * 1.0001`; the larger is the memory-floor bandwidth);
  (b) check_variants(): every ssmc example on target="triton" against the float64 references of
      tests/reference.py (raises TargetError until the Triton target exists; printed, the run goes on);
  (c) anchors check: mamba_ssm and fla (and mamba_ssm's decode step) against a float64 numpy Mamba2
      (bench/anchors.py);
  (d) forward timing at S1 = b=4 h=80 p=64 n=128 g=1 L=2048, S2 = the same at L=8192, S3 = b=8 h=32 p=64
      n=64 g=1 L=4096, bf16 and fp32, for ssmc-triton (when available), ssmc-xla, mamba_ssm and fla. Each
      (shape, dtype) runs in a FRESH PROCESS (`bench/gpu.py --one S1 bf16`): Triton autotuners keyed without
      the sequence length keep the configs of the first shape a process sees (fla's on-disk autotune cache is
      switched off for the same reason: FLA_CACHE_RESULTS=0). All implementations first run on the same
      random inputs and are compared (rel L2) with ssmc-xla on the same values in fp32; then timed;
  (e) with --decode: one decode step (mamba_ssm selective_state_update; ssmc `k.step` once it exists) for the
      Mamba2-2.7B layer (h=80 p=64 n=128 g=1) at batch 1, 16, 128.
The table is printed last, and written to $OUT/gpu.json and $OUT/gpu.md when $OUT is set.

Timing: torch anchors with triton.testing.do_bench (CUDA events, L2 flushed between calls, median); jax
callables with a host loop (10 back-to-back calls per sample, block_until_ready on the last, median of the
samples). "ms loop" times every implementation the jax way, for a like-for-like column. Inputs rotate among 3
freshly drawn sets (never zeros). Floor = bytes of x, dt, B, C read + y written at the dtype over the copy
bandwidth; "% floor" = floor / time.

Cost on the H100 (first run, 2026-11-24, cold Triton cache): env + bandwidth 11 s; anchors check 195 s with fp32 +
bf16 and an extra chunk-64 mamba_ssm row (since dropped); `--one S1 bf16` (mamba_ssm, fla, fla-kernel, ssmc-xla)
104 s, mostly Triton compiles and autotuning (each record's setup_s says how much). The whole default run does not
fit one 10-minute `run` call: split it, e.g. `--skip-anchors-check --skip-variants --shapes S1 S2 --dtypes bf16`,
and give `--budget` (seconds) a little under the call's timeout so that the table is still printed.

    python bench/gpu.py --shapes S1 S3 --dtypes bf16 --impls mamba_ssm fla   # a subset
    python bench/gpu.py --one S1 bf16 --bw 3000                              # one shape, JSON lines out
    python bench/gpu.py --decode --shapes                                    # decode timings only
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # jax and torch share the GPU
os.environ.setdefault("FLA_CACHE_RESULTS", "0")                   # no autotune results carried across shapes
os.environ.setdefault("SSMC_CACHE_DIR", tempfile.mkdtemp(prefix="ssmc-gpu-"))

ROOT = pathlib.Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "bench"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SPEC = ROOT / "examples" / "mamba2.ssm"
SHAPES = {"S1": dict(b=4, l=2048, h=80, p=64, n=128, g=1),
          "S2": dict(b=4, l=8192, h=80, p=64, n=128, g=1),
          "S3": dict(b=8, l=4096, h=32, p=64, n=64, g=1),
          # batch 1, long sequences: (batch x heads) programs alone cannot fill the GPU
          "L64K": dict(b=1, l=65536, h=80, p=64, n=128, g=1),
          "L128K": dict(b=1, l=131072, h=80, p=64, n=128, g=1)}
# gated linear attention (key-wise decay) against fla's chunk_gla: q, k, v bf16, the log-gate g fp32
GLA_SHAPES = {"G1": dict(b=4, l=4096, h=16, dk=64, dv=64),
              "G2": dict(b=4, l=4096, h=8, dk=128, dv=128)}
GLA_SPEC = """ssm gla_loggate {
  dims b, t, h, dk, dv
  scan t
  in q[b,t,h,dk], k[b,t,h,dk], v[b,t,h,dv], g[b,t,h,dk]
  state S[b,h,dk,dv]
  out o[b,t,h,dv]
  S = exp(g)*S + k⊗v
  o = q·S
}
"""
GLA_IMPLS = ("ssmc-triton", "ssmc-xla", "fla-gla")
IMPLS = ("ssmc-triton", "ssmc-xla", "mamba_ssm", "fla", "fla-kernel")
AGREE_TOL = {"bf16": 1e-2, "mixed": 1e-2, "fp32": 3e-3}   # fp32: the anchors' Triton dots run at TF32 (1.35e-3 seen on H100)
MAMBA_SSM_BF16_MS_ISSUE = {"S1": 0.476, "S2": 1.62, "S3": 0.474}   # the Triton issue's quoted figures
DECODE_BATCHES = (1, 16, 128)
JSON_TAG = "@@JSON "


# ----------------------------------------------------------------------------------------------------------
# ssmc from the working tree (pyproject maps ssmc.passes -> passes/, ssmc.targets -> targets/, ...)
# ----------------------------------------------------------------------------------------------------------

sys.path.insert(0, str(ROOT / "bench"))
import _tree  # noqa: E402,F401  (ssmc from the working tree)


def emit(kind: str, **rec):
    rec["kind"] = kind
    print(JSON_TAG + json.dumps(rec, default=str), flush=True)


def short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]


# ----------------------------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------------------------

def time_jax(f, argsets, repeats=30, inner=10, warmup=2) -> float:
    """Median ms per call: `repeats` samples of `inner` back-to-back calls (rotating argument sets), each sample
    ended by block_until_ready on its last result (one stream: the last done means all done)."""
    import jax
    for a in argsets:                      # compile + first run of every set
        jax.block_until_ready(f(*a))
    for i in range(warmup * inner):
        out = f(*argsets[i % len(argsets)])
    jax.block_until_ready(out)
    times = []
    k = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = f(*argsets[k % len(argsets)])
            k += 1
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times) * 1e3


def time_torch_loop(f, argsets, repeats=30, inner=10, warmup=2) -> float:
    """The same host loop as time_jax, for torch callables (torch.cuda.synchronize instead of blocking)."""
    import torch
    for a in argsets:
        f(*a)
    for i in range(warmup * inner):
        f(*argsets[i % len(argsets)])
    torch.cuda.synchronize()
    times, k = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            f(*argsets[k % len(argsets)])
            k += 1
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times) * 1e3


def time_torch_events(f, argsets, warmup_ms=50, rep_ms=300) -> float:
    """triton.testing.do_bench (CUDA events around each call, L2 flushed between calls), median ms; the
    argument sets rotate between calls."""
    import triton.testing

    import anchors
    anchors.guard_triton_cache()
    state = {"i": 0}

    def call():
        a = argsets[state["i"] % len(argsets)]
        state["i"] += 1
        return f(*a)

    return float(triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


# ----------------------------------------------------------------------------------------------------------
# (a) environment and copy bandwidth
# ----------------------------------------------------------------------------------------------------------

def environment() -> dict:
    import platform
    import anchors
    env = {"python": platform.python_version()}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        env["nvidia-smi"] = q.stdout.strip() or q.stderr.strip()
    except Exception as e:  # noqa: BLE001
        env["nvidia-smi"] = short_error(e)
    try:
        import torch
        env["torch_device"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        env["sms"] = props.multi_processor_count
        env["cuda_runtime(torch)"] = torch.version.cuda
    except Exception as e:  # noqa: BLE001
        env["torch_device"] = short_error(e)
    try:
        import jax
        env["jax_devices"] = [d.device_kind for d in jax.devices()]
        env["jax_backend"] = jax.default_backend()
    except Exception as e:  # noqa: BLE001
        env["jax_devices"] = short_error(e)
    env["versions"] = anchors.versions()
    for mod in ("jax_triton", "fla"):
        try:
            m = __import__(mod)
            env["versions"][f"{mod} (import)"] = getattr(m, "__version__", "imported")
        except Exception as e:  # noqa: BLE001
            env["versions"][f"{mod} (import)"] = short_error(e)
    anchors.guard_triton_cache()          # importing jax_triton blanked TRITON_CACHE_DIR
    return env


def copy_bandwidth(repeats=30) -> dict:
    """Bytes read + written per second of a 1 GiB device-to-device copy (GB/s)."""
    out = {}
    nbytes = 2**30
    try:
        import torch
        a = torch.randn(nbytes // 4, device="cuda")
        b = torch.empty_like(a)
        ms = time_torch_events(lambda: b.copy_(a), [()], warmup_ms=100, rep_ms=500)
        out["torch_copy_GBps"] = 2 * nbytes / (ms * 1e-3) / 1e9
        del a, b
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        out["torch_copy_error"] = short_error(e)
    try:
        import jax
        import jax.numpy as jnp
        x = jax.random.normal(jax.random.PRNGKey(0), (nbytes // 4,), jnp.float32)
        f = jax.jit(lambda a: a * 1.0001)
        ms = time_jax(f, [(x,)], repeats=repeats, inner=5)
        out["jax_scale_GBps"] = 2 * nbytes / (ms * 1e-3) / 1e9
        del x
    except Exception as e:  # noqa: BLE001
        out["jax_scale_error"] = short_error(e)
    vals = [v for k, v in out.items() if k.endswith("GBps")]
    out["floor_GBps"] = max(vals) if vals else None
    return out


# ----------------------------------------------------------------------------------------------------------
# (b) every example on the Triton target vs the float64 references
# ----------------------------------------------------------------------------------------------------------

def load_test_reference():
    """tests/reference.py, loaded by path (no `tests` package name to collide with site-packages)."""
    name = "ssmc_tests_reference"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "reference.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def check_variants(target="triton", cases=None, tol_fp32=1e-3, tol_bf16=3e-2, seed=0) -> list[dict]:
    """Compile every example (tests/reference.py VARIANTS) with `ssmc.compile(path, target=target)`, run it on
    fresh random inputs and random initial states (fp32 and bf16 inputs) and compare every out and final state
    with the float64 reference (bf16: reference on the rounded inputs). Returns one row per variant and case.

    Raises ssmc.TargetError when the target is not available (today, for "triton"); errors of single variants
    are recorded in their rows. Cases: the variant's small dims at t=150 (a few chunks, not a chunk multiple),
    and GPU-sized head dims (64) at t=300. Tolerances: fp32 1e-3 (Triton's tf32 dots land near 3e-4), bf16 3e-2
    (as tests/test_variants.py)."""
    import jax.numpy as jnp
    import numpy as np

    import ssmc
    ref_mod = load_test_reference()
    VARIANTS, rel_l2 = ref_mod.VARIANTS, ref_mod.rel_l2

    if cases is None:
        cases = [("small t=150", {"t": 150}),
                 ("wide t=300", {"t": 300, "b": 2, "h": 4, "p": 64, "n": 64, "g": 2, "d": 256, "dk": 64, "dv": 64})]
    rng = np.random.default_rng(seed)
    rows = []
    compiled_any = False
    for name, v in VARIANTS.items():
        try:
            k = ssmc.compile(str(v.path), target=target)
        except ssmc.TargetError as e:
            if not compiled_any:
                raise                      # the target itself is missing: one clear error, not eight
            rows.append(dict(variant=name, case="compile", ok=False, error=short_error(e)))
            continue
        except Exception as e:  # noqa: BLE001
            rows.append(dict(variant=name, case="compile", ok=False, error=short_error(e)))
            continue
        compiled_any = True
        import anchors
        anchors.guard_triton_cache()
        for case, over in cases:
            dims = {d: s for d, s in over.items() if d in v.small_dims}
            try:
                inputs = v.make_inputs(rng, dims)
                init = v.make_initial_states(rng, dims)
                row = dict(variant=name, case=case, dims=v.dims(**dims))
                for dname, dt, tol in (("fp32", jnp.float32, tol_fp32), ("bf16", jnp.bfloat16, tol_bf16)):
                    xin = {n: jnp.asarray(a).astype(dt) for n, a in inputs.items()}
                    rin = {n: np.asarray(a.astype(jnp.float32), np.float64) for n, a in xin.items()}
                    ref_outs, ref_states = v.reference(rin, init)
                    kw = dict(xin)
                    if len(v.state_names) == 1:
                        kw["initial_state"] = jnp.asarray(init[v.state_names[0]])
                    else:
                        kw["initial_states"] = {s: jnp.asarray(a) for s, a in init.items()}
                    res = tuple(k(**kw))
                    got = res[:len(v.out_names)], res[len(v.out_names):]
                    errs = []
                    for g, w in zip(got[0] + got[1], tuple(ref_outs) + tuple(ref_states)):
                        ga = np.asarray(jnp.asarray(g, jnp.float32), np.float64)
                        errs.append(rel_l2(ga, w) if ga.shape == w.shape else float("inf"))
                    err = max(errs)
                    row[f"err_{dname}"] = err
                    row[f"ok_{dname}"] = bool(np.isfinite(err) and err < tol)
                row["ok"] = row["ok_fp32"] and row["ok_bf16"]
                rows.append(row)
            except Exception as e:  # noqa: BLE001
                rows.append(dict(variant=name, case=case, ok=False, error=short_error(e)))
    return rows


# ----------------------------------------------------------------------------------------------------------
# (d) one shape and dtype: agreement, then timing
# ----------------------------------------------------------------------------------------------------------

ORDER = ("x", "dt", "A", "B", "C", "D")


def floor_bytes(s: dict, itemsize: int) -> int:
    b, l, h, p, n, g = (s[d] for d in "blhpng")
    return itemsize * (2 * b * l * h * p + b * l * h + 2 * b * l * g * n)


def run_one(shape: str, dtype: str, impls, bw_gbps: float | None, repeats: int, nsets: int = 3, seed: int = 0):
    import jax
    import jax.numpy as jnp
    import torch

    import anchors as an
    try:
        import ssmc
    except Exception as e:  # noqa: BLE001  (a broken working tree must not cost the anchors' numbers)
        ssmc = None
        ssmc_error = short_error(e)

    s = SHAPES[shape]
    if bw_gbps is None:
        bw_gbps = copy_bandwidth(repeats=10)["floor_GBps"]
    jdt = jnp.dtype(an.DTYPES[dtype])
    t_sets = [an.make_inputs(s["b"], s["l"], s["h"], s["p"], s["n"], s["g"], dtype, seed=seed + 100 * i)
              for i in range(nsets)]
    j_sets = [{k: an.to_jax(v) for k, v in st.items()} for st in t_sets]
    nbytes = floor_bytes(s, jdt.itemsize)
    floor_ms = nbytes / (bw_gbps * 1e9) * 1e3 if bw_gbps else None
    base = dict(shape=shape, dtype=dtype, dims=s, floor_ms=floor_ms, floor_bytes=nbytes, bw_GBps=bw_gbps)

    # reference: ssmc-xla on the same (rounded) values in fp32, full-precision contractions
    ref = None
    try:
        if ssmc is None:
            raise ImportError(ssmc_error)
        k32 = ssmc.compile(SPEC, target="xla", matmul="float32")
        y32 = jax.block_until_ready(k32(*[j_sets[0][n].astype(jnp.float32) for n in ORDER])[0])
        ref = an.to_torch(y32).double()
    except Exception as e:  # noqa: BLE001
        emit("note", **base, note=f"no fp32 ssmc-xla reference ({short_error(e)}); using mamba_ssm on fp32 inputs")
        try:
            st = t_sets[0]
            ref = an.mamba_ssm_forward(*(st[n].float() for n in ORDER)).double()
        except Exception as e2:  # noqa: BLE001
            emit("note", **base, note=f"no fp32 reference at all: {short_error(e2)}")
    ref_norm = torch.linalg.vector_norm(ref).item() if ref is not None else None

    def rel_err(y) -> float | None:
        if ref is None:
            return None
        yt = y if isinstance(y, torch.Tensor) else an.to_torch(y)
        if tuple(yt.shape) != tuple(ref.shape):
            return float("inf")
        return (torch.linalg.vector_norm(yt.double() - ref).item() / ref_norm)

    # implementations: name -> (kind, callable, argsets)
    def ssmc_impl(target):
        if ssmc is None:
            raise ImportError(ssmc_error)
        k = ssmc.compile(SPEC, target=target)
        an.guard_triton_cache()
        sets = [tuple(js[n] for n in ORDER) for js in j_sets]
        f = jax.jit(lambda *a: k(*a))
        try:
            jax.block_until_ready(f(*sets[0]))
        except Exception as e:  # noqa: BLE001  (a kernel target that can't be traced under an outer jit)
            emit("note", **base, note=f"{target}: jax.jit(k) failed ({short_error(e)}); timing k directly")
            f = k
        f.kernel = k  # new_length_times also times the kernel called directly
        return "jax", f, sets, (lambda r: r[0])

    def mamba_impl():
        f = an.mamba_chunk_scan_combined_fn()
        sets = [(st["x"], st["dt"], st["A"].float(), st["B"], st["C"], st["D"].float()) for st in t_sets]
        return "torch", (lambda x, dt, A, B, C, D: f(x, dt, A, B, C, chunk_size=256, D=D)), sets, (lambda r: r)

    def fla_impl():
        return "torch", an.fla_forward, [tuple(st[n] for n in ORDER) for st in t_sets], (lambda r: r)

    def fla_kernel_impl():
        sets = [an.fla_prepare(st["x"], st["dt"], st["A"], st["B"], st["C"]) for st in t_sets]
        # agreement is checked on the end-to-end form; the kernel alone returns o without D*x
        return "torch", an.fla_kernel, sets, None

    makers = {"ssmc-triton": lambda: ssmc_impl("triton"), "ssmc-xla": lambda: ssmc_impl("xla"),
              "mamba_ssm": mamba_impl, "fla": fla_impl, "fla-kernel": fla_kernel_impl}
    for name in impls:
        try:
            kind, fn, sets, pick = makers[name]()
        except Exception as e:  # noqa: BLE001
            emit("result", **base, impl=name, error=f"unavailable: {short_error(e)}")
            continue
        measure(dict(base, impl=name), kind, fn, sets, pick, rel_err, AGREE_TOL[dtype], floor_ms, s["l"], repeats)


def measure(rec, kind, fn, sets, pick, rel_err, tol, floor_ms, l, repeats):
    """One implementation on the shape's argument sets: its first call (compile, autotune), agreement with the
    reference (`pick` takes the output from the result, None: not compared), the timing (jax: host loop; torch:
    CUDA events and host loop), the memory-floor fraction, and (ssmc-triton) a new length's first call. The
    record is emitted, errors included."""
    import jax
    import torch
    t0 = time.time()
    try:
        res = fn(*sets[0])
        if kind == "jax":
            jax.block_until_ready(res)
        else:
            torch.cuda.synchronize()
        if pick is not None:
            y = pick(res)
            rec["out_dtype"] = str(y.dtype)
            err = rel_err(y)
            rec["rel_err"] = err
            rec["agree"] = err is not None and err < tol
            del y
        del res
        rec["setup_s"] = time.time() - t0          # compile / autotune / first call
        if kind == "jax":
            rec["ms_loop"] = time_jax(fn, sets, repeats=repeats)
            rec["ms"] = rec["ms_loop"]
            rec["timer"] = "host loop"
        else:
            rec["ms"] = time_torch_events(fn, sets)
            rec["ms_loop"] = time_torch_loop(fn, sets, repeats=repeats)
            rec["timer"] = "do_bench events"
        if floor_ms:
            rec["frac_floor"] = floor_ms / rec["ms"]
        if rec["impl"] == "ssmc-triton":
            rec.update(new_length_times(fn, sets[0], l))
    except Exception as e:  # noqa: BLE001
        rec["error"] = short_error(e)
        traceback.print_exc()
    rec["total_s"] = time.time() - t0
    emit("result", **rec)
    torch.cuda.empty_cache()


def new_length_times(fn, args, l, scan_axis=1) -> dict:
    """Wall time of the first call at two sequence lengths this warm process has not seen (inputs sliced along
    the scan axis of the time-indexed arguments): l - 96 (the same power-of-two bucket) and l // 2 + 40 (another
    bucket). Everything a new length costs is in it: retrace, any Triton compile or autotune, the run. `fn` is the
    jitted wrapper; where it carries the kernel (`fn.kernel`), the kernel called directly at two more unseen lengths
    too (no outer jit: the call's own jit holds only the kernels when no state is given)."""
    import jax
    out = {}
    runs = [("new_len_same_bucket_ms", fn, l - 96), ("new_len_other_bucket_ms", fn, l // 2 + 40)]
    k = getattr(fn, "kernel", None)
    if k is not None:
        runs += [("new_len_direct_same_bucket_ms", k, l - 104), ("new_len_direct_other_bucket_ms", k, l // 2 + 48)]
    for key, f, l2 in runs:
        a2 = tuple(a[:, :l2] if getattr(a, "ndim", 0) > scan_axis and a.shape[scan_axis] == l else a for a in args)
        jax.block_until_ready(a2)
        t0 = time.perf_counter()
        jax.block_until_ready(f(*a2))
        out[key] = (time.perf_counter() - t0) * 1e3
    return out


def run_gla(shape: str, impls, bw_gbps: float | None, repeats: int, nsets: int = 3, seed: int = 0):
    """GLA forward at one GLA_SHAPES entry: ssmc (GLA_SPEC) on the Triton and XLA targets against fla's
    chunk_gla, same bf16 q, k, v and fp32 log-gate g; agreement vs ssmc-xla with fp32 matmuls on the same values."""
    import jax
    import jax.numpy as jnp
    import torch

    import anchors as an
    import ssmc

    s = GLA_SHAPES[shape]
    b, l, h, dk, dv = (s[d] for d in ("b", "l", "h", "dk", "dv"))
    t_sets = [an.make_gla_inputs(b, l, h, dk, dv, seed=seed + 100 * i) for i in range(nsets)]
    names = ("q", "k", "v", "g")
    j_sets = [tuple(an.to_jax(st[n]) for n in names) for st in t_sets]
    nbytes = 2 * (2 * b * l * h * dk + 2 * b * l * h * dv) + 4 * b * l * h * dk   # q, k, v, o bf16 + g fp32
    floor_ms = nbytes / (bw_gbps * 1e9) * 1e3 if bw_gbps else None
    base = dict(shape=shape, dtype="mixed", dims=s, floor_ms=floor_ms, floor_bytes=nbytes, bw_GBps=bw_gbps)
    k32 = ssmc.compile(GLA_SPEC, target="xla", matmul="float32")
    ref = an.to_torch(jax.block_until_ready(k32(*[a.astype(jnp.float32) for a in j_sets[0]])[0])).double()
    ref_norm = torch.linalg.vector_norm(ref).item()

    def ssmc_impl(target):
        k = ssmc.compile(GLA_SPEC, target=target)
        an.guard_triton_cache()
        f = jax.jit(lambda *a: k(*a)[0])
        f.kernel = k
        return "jax", f, j_sets

    def rel_err(y):
        yt = y if isinstance(y, torch.Tensor) else an.to_torch(y)
        return torch.linalg.vector_norm(yt.double() - ref).item() / ref_norm

    makers = {"ssmc-triton": lambda: ssmc_impl("triton"), "ssmc-xla": lambda: ssmc_impl("xla"),
              "fla-gla": lambda: ("torch", an.fla_gla, [tuple(st[n] for n in names) for st in t_sets])}
    for name in impls:
        try:
            kind, fn, sets = makers[name]()
        except Exception as e:  # noqa: BLE001
            emit("result", **base, impl=name, error=f"unavailable: {short_error(e)}")
            continue
        measure(dict(base, impl=name), kind, fn, sets, lambda y: y, rel_err, AGREE_TOL["bf16"], floor_ms, l, repeats)


# ----------------------------------------------------------------------------------------------------------
# (e) decode step
# ----------------------------------------------------------------------------------------------------------

def ssmc_decode_step(k, state, x, dt, A, B, C, D):
    """HOOK: one ssmc decode step, `Kernel.step(state, *inputs)` (ssmc/step.py: scan-dim inputs given without the
    scan dim; returns (y, new_state), y without the scan dim). Adapt here if that API changes."""
    return k.step(state, x, dt, A, B, C, D)


def run_decode(dtype: str, batches, state_dtype: str, bw_gbps=None, h=80, p=64, n=128, g=1, seed=0):
    """One decode step of the Mamba2-2.7B layer at each batch size: mamba_ssm's selective_state_update (state
    updated in place, as in Mamba2.step) and ssmc's Kernel.step on each target that has it. Both are first run
    from the same state on the same inputs and compared (y and new state, rel L2, vs mamba_ssm)."""
    import jax
    import torch

    import anchors as an
    try:
        import ssmc
    except Exception as e:  # noqa: BLE001
        ssmc = None
        emit("note", note=f"decode: ssmc import failed: {short_error(e)}")

    sdt = an.torch_dtype(state_dtype)
    ssmc_kernels = {}
    for target in ("triton", "xla") if ssmc is not None else ():
        try:
            k = ssmc.compile(SPEC, target=target)
            if hasattr(k, "step"):
                ssmc_kernels[target] = k
            else:
                emit("note", note=f"decode: ssmc target {target}: Kernel has no .step yet, skipped")
        except Exception as e:  # noqa: BLE001
            emit("note", note=f"decode: ssmc target {target} unavailable: {short_error(e)}")
    an.guard_triton_cache()
    for b in batches:
        base = dict(shape=f"decode b={b}", dtype=dtype, state_dtype=state_dtype, dims=dict(b=b, h=h, p=p, n=n, g=g))
        try:
            inp = an.make_inputs(b, 3, h, p, n, g, dtype, seed=seed + b)   # 3 steps: one argument set each
            sets = []
            for i in range(3):
                st = (0.5 * torch.randn(b, h, p, n, device="cuda")).to(sdt)
                sets.append((st, inp["x"][:, i].contiguous(), inp["dt"][:, i].contiguous(), inp["A"],
                             inp["B"][:, i].contiguous(), inp["C"][:, i].contiguous(), inp["D"]))
            isz = torch.tensor([], dtype=sdt).element_size()
            xsz = sets[0][1].element_size()
            nbytes = 2 * b * h * p * n * isz + xsz * (2 * b * h * p + b * h + 2 * b * g * n)
            base["floor_bytes"] = nbytes
            base["floor_ms"] = nbytes / (bw_gbps * 1e9) * 1e3 if bw_gbps else None
            # agreement from one state: mamba_ssm's result is the yardstick
            st0 = sets[0][0].clone()
            y_m = an.selective_state_update(st0, *sets[0][1:]).float()
            st_m = st0.float()
            j0 = tuple(an.to_jax(a.clone()) for a in sets[0])
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            emit("result", **base, impl="mamba_ssm selective_state_update", error=short_error(e))
            continue
        rec = dict(base, impl="mamba_ssm selective_state_update")
        try:
            ms = time_torch_events(an.selective_state_update, sets, warmup_ms=20, rep_ms=200)
            rec.update(ms=ms, ms_loop=time_torch_loop(an.selective_state_update, sets), timer="do_bench events")
            if base["floor_ms"]:
                rec["frac_floor"] = base["floor_ms"] / ms
        except Exception as e:  # noqa: BLE001
            rec["error"] = short_error(e)
        emit("result", **rec)
        for target, k in ssmc_kernels.items():
            rec = dict(base, impl=f"ssmc-{target} step")
            try:
                f = jax.jit(lambda st, x, dt, A, B, C, D, k=k: ssmc_decode_step(k, st, x, dt, A, B, C, D))
                y, st_new = f(*j0)[:2]
                ey = (torch.linalg.vector_norm(an.to_torch(y).float() - y_m) / torch.linalg.vector_norm(y_m)).item()
                es = (torch.linalg.vector_norm(an.to_torch(st_new).float() - st_m)
                      / torch.linalg.vector_norm(st_m)).item()
                rec["rel_err"] = max(ey, es)          # vs mamba_ssm here (not vs xla fp32)
                rec["agree"] = rec["rel_err"] < AGREE_TOL[dtype]
                jsets = [tuple(an.to_jax(a) for a in st) for st in sets]
                rec.update(ms=time_jax(f, jsets), timer="host loop")
                rec["ms_loop"] = rec["ms"]
                if base["floor_ms"]:
                    rec["frac_floor"] = base["floor_ms"] / rec["ms"]
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rec["error"] = short_error(e)
            emit("result", **rec)


# ----------------------------------------------------------------------------------------------------------
# driver: one fresh process per part
# ----------------------------------------------------------------------------------------------------------

def child(args: list[str], timeout: float, label: str, extra_env: dict | None = None) -> list[dict]:
    """Run `python bench/gpu.py ARGS` in a fresh process, echo its output (prefixed), collect its JSON lines."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *args]
    print(f"\n=== {label}: {' '.join(args)} (timeout {timeout:.0f}s{', env ' + str(extra_env) if extra_env else ''})",
          flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
    if not env.get("TRITON_CACHE_DIR"):
        env.pop("TRITON_CACHE_DIR", None)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=str(ROOT))
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    recs = []
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(JSON_TAG):
                try:
                    recs.append(json.loads(line[len(JSON_TAG):]))
                except json.JSONDecodeError:
                    print(f"  [{label}] (bad json) {line}")
                    continue
                short = {k: v for k, v in recs[-1].items() if k not in ("dims", "floor_bytes", "bw_GBps", "env")}
                print(f"  [{label}] {json.dumps(short, default=str)[:600]}", flush=True)
                if "env" in recs[-1]:
                    print(f"  [{label}] env: {json.dumps(recs[-1]['env'], default=str)}", flush=True)
            else:
                print(f"  [{label}] {line}", flush=True)
        rc = proc.wait()
    finally:
        timer.cancel()
    dt = time.time() - t0
    if rc != 0:
        why = "killed at timeout" if dt >= timeout - 1 else f"exit code {rc}"
        recs.append(dict(kind="child_failed", label=label, args=args, error=why, seconds=dt))
        print(f"=== {label}: FAILED ({why}) after {dt:.0f}s", flush=True)
    else:
        print(f"=== {label}: done in {dt:.0f}s", flush=True)
    return recs


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def table(records: list[dict]) -> str:
    lines = []
    env = next((r for r in records if r["kind"] == "env"), None)
    bw = next((r for r in records if r["kind"] == "bandwidth"), None)
    if env:
        v = env.get("env", {}).get("versions", {})
        lines.append(f"device: {env['env'].get('torch_device')} ({env['env'].get('nvidia-smi')}); "
                     + ", ".join(f"{k} {val}" for k, val in v.items()))
    if bw:
        lines.append("copy bandwidth (read + write, 1 GiB): "
                     + ", ".join(f"{k} {val:.0f}" for k, val in bw.items() if k.endswith("GBps") and val))
    var = [r for r in records if r["kind"] in ("variant", "variants_error")]
    if var:
        lines.append("")
        lines.append("check_variants (target=triton vs float64): " + (
            var[0]["error"] if var[0]["kind"] == "variants_error" else
            f"{sum(1 for r in var if r.get('ok'))}/{len(var)} ok"))
        for r in var:
            if r["kind"] == "variant" and not r.get("ok"):
                lines.append(f"  FAIL {r.get('variant')} {r.get('case')}: {r.get('error') or r}")
    anc = [r for r in records if r["kind"] == "anchor_check"]
    if anc:
        lines.append("")
        lines.append("anchors check vs float64 numpy Mamba2: " + ("OK" if all(r["ok"] for r in anc) else "FAILED"))
        for r in anc:
            f32 = f", fp32 dots {r['f32_dot']}" if r.get("f32_dot") else ""
            lines.append(f"  {r['check']:<34} {r['dtype']:<5} rel err {fmt(r.get('rel_err'), '.1e'):>8}"
                         f" (tol {r.get('tol')}{f32}) {'ok' if r['ok'] else 'FAIL ' + str(r.get('error', ''))}")
    res = [r for r in records if r["kind"] == "result"]
    if res:
        lines.append("")
        lines.append("| shape | dtype | impl | ms | ms loop | vs anchor | % floor | floor ms | rel err vs xla fp32 |"
                     " note |")
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
        mamba = {(r["shape"], r["dtype"]): r.get("ms") for r in res
                 if r["impl"].startswith("mamba_ssm") or r["impl"] == "fla-gla"}
        for r in res:
            m = mamba.get((r["shape"], r["dtype"]))
            ratio = f"{r['ms'] / m:.2f}x" if r.get("ms") and m else ""
            note = r.get("error", "")
            if r.get("agree") is False:
                note = (note + " DISAGREES").strip()
            if r["impl"] == "mamba_ssm" and r["dtype"] == "bf16" and r["shape"] in MAMBA_SSM_BF16_MS_ISSUE:
                note = (note + f" issue quotes {MAMBA_SSM_BF16_MS_ISSUE[r['shape']]} ms").strip()
            if r["shape"].startswith("decode") and r.get("rel_err") is not None:
                note = (note + " rel err vs mamba_ssm").strip()
            if r["impl"] == "fla-kernel":
                note = (note + " kernel only (q,k,v,g prepared; no D*x)").strip()
            if r.get("out_dtype"):
                note = (note + f" out {r['out_dtype'].replace('torch.', '')}").strip()
            if r.get("new_len_same_bucket_ms") is not None:
                note = (note + f" new length: {r['new_len_same_bucket_ms']:.0f} ms same bucket, "
                        f"{r['new_len_other_bucket_ms']:.0f} ms other bucket").strip()
            if r.get("new_len_direct_same_bucket_ms") is not None:
                note += (f"; k(...) directly: {r['new_len_direct_same_bucket_ms']:.0f} / "
                         f"{r['new_len_direct_other_bucket_ms']:.0f} ms")
            frac = f"{100 * r['frac_floor']:.0f}%" if r.get("frac_floor") else ""
            lines.append(f"| {r['shape']} | {r['dtype']}{'/' + r['state_dtype'] if r.get('state_dtype') else ''}"
                         f" | {r['impl']} | {fmt(r.get('ms'), '.3f')} | {fmt(r.get('ms_loop'), '.3f')} | {ratio} | "
                         f"{frac} | {fmt(r.get('floor_ms'), '.3f')} | {fmt(r.get('rel_err'), '.1e')} | {note[:160]} |")
    fails = [r for r in records if r["kind"] == "child_failed"]
    for r in fails:
        lines.append(f"child failed: {r['label']} {' '.join(r['args'])}: {r['error']} after {r['seconds']:.0f}s")
    notes = [r for r in records if r["kind"] == "note"]
    for r in notes:
        lines.append(f"note: {r.get('shape', '')} {r.get('dtype', '')} {r['note']}".replace("  ", " "))
    return "\n".join(lines)


def main_driver(args):
    t_start = time.time()
    deadline = t_start + args.budget if args.budget else None
    records: list[dict] = []

    def left(default):
        if deadline is None:
            return default
        return max(0.0, min(default, deadline - time.time() - 5))

    def run(label, cargs, timeout, extra_env=None):
        to = left(timeout)
        if to < 20:
            records.append(dict(kind="child_failed", label=label, args=cargs, error="skipped: out of budget",
                                seconds=0.0))
            print(f"=== {label}: skipped (budget)", flush=True)
            return []
        recs = child(cargs, to, label, extra_env)
        records.extend(recs)
        write_out(records)
        return recs

    recs = run("env", ["--part", "env"], 180)
    bw = next((r for r in recs if r["kind"] == "bandwidth"), {}).get("floor_GBps")
    bw_args = ["--bw", f"{bw:.1f}"] if bw else []
    if not args.skip_anchors_check:
        # fp32 rows with full-precision Triton dots (TF32 would sit at ~1.4e-3, over the 1e-3 bound)
        run("anchors check", ["--part", "anchors", "--dtypes", *args.anchors_dtypes], 300,
            {"TRITON_F32_DEFAULT": args.anchors_f32})
    for shape in args.shapes:
        for dtype in args.dtypes:
            cargs = ["--one", shape, dtype, "--impls", *args.impls, "--repeats", str(args.repeats), *bw_args]
            run(f"{shape} {dtype}", cargs, args.child_timeout)
    for shape in args.gla:
        run(f"GLA {shape}", ["--one-gla", shape, "--gla-impls", *args.gla_impls, "--repeats", str(args.repeats),
                             *bw_args], args.child_timeout)
    if args.decode:
        for dtype in args.dtypes:
            run(f"decode {dtype}", ["--part", "decode", "--dtypes", dtype, "--state-dtype", args.state_dtype,
                                    "--batches", *map(str, args.batches), *bw_args], 240)
    if not args.skip_variants:             # last: the Triton target is work in progress
        # heuristic configs: correctness does not need the autotuner (it would tune every variant and case)
        run("check_variants", ["--part", "variants"], 240, {"SSMC_AUTOTUNE": "0"})
    text = table(records)
    print("\n" + "=" * 100 + f"\nbench/gpu.py summary ({time.time() - t_start:.0f}s)\n" + text, flush=True)
    write_out(records, text)


def write_out(records, text=None):
    out = os.environ.get("OUT")
    if not out:
        return
    p = pathlib.Path(out)
    p.mkdir(parents=True, exist_ok=True)
    (p / "gpu.json").write_text(json.dumps(records, indent=1, default=str))
    (p / "gpu.md").write_text(text if text is not None else table(records))


def main_part(args):
    if args.part == "env":
        emit("env", env=environment())
        emit("bandwidth", **copy_bandwidth(args.repeats))
    elif args.part == "variants":
        try:
            for r in check_variants():
                emit("variant", **r)
        except Exception as e:  # noqa: BLE001  (TargetError today)
            print(f"check_variants raised: {short_error(e)}", flush=True)
            emit("variants_error", error=short_error(e))
    elif args.part == "anchors":
        import anchors
        for r in anchors.check_anchors(dtypes=tuple(args.dtypes)):
            emit("anchor_check", **r)
    elif args.part == "decode":
        for dtype in args.dtypes:
            try:
                run_decode(dtype, args.batches, args.state_dtype, args.bw)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                emit("note", note=f"decode {dtype}: {short_error(e)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["mixed", "bf16"], choices=["mixed", "bf16", "fp32"],
                    help="mixed: x, dt, B, C bf16 with A, D fp32 (as models hold them); bf16: every input bf16")
    ap.add_argument("--gla", nargs="*", default=list(GLA_SHAPES), choices=list(GLA_SHAPES),
                    help="GLA shapes timed against fla's chunk_gla")
    ap.add_argument("--gla-impls", nargs="+", default=list(GLA_IMPLS), choices=list(GLA_IMPLS))
    ap.add_argument("--one-gla", metavar="SHAPE", help="(child) time one GLA shape")
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--decode", action="store_true", help="also time one decode step (batches 1, 16, 128)")
    ap.add_argument("--batches", type=int, nargs="+", default=list(DECODE_BATCHES))
    ap.add_argument("--state-dtype", default="fp32", choices=["bf16", "fp32"])
    ap.add_argument("--skip-variants", action="store_true")
    ap.add_argument("--skip-anchors-check", action="store_true")
    ap.add_argument("--anchors-dtypes", nargs="+", default=["fp32", "bf16"], choices=["bf16", "fp32"],
                    help="dtypes of the anchors check (each costs a full autotune of both anchors' kernels)")
    ap.add_argument("--anchors-f32", default="ieee", choices=["ieee", "tf32"],
                    help="TRITON_F32_DEFAULT for the anchors check (fp32 rows; tf32 is checked against 3e-3)")
    ap.add_argument("--budget", type=float, default=0, help="seconds for the whole run; later parts are skipped")
    ap.add_argument("--child-timeout", type=float, default=300)
    ap.add_argument("--one", nargs=2, metavar=("SHAPE", "DTYPE"), help="(child) time one shape and dtype")
    ap.add_argument("--bw", type=float, default=None, help="(child) copy bandwidth GB/s for the floor")
    ap.add_argument("--part", choices=["env", "variants", "anchors", "decode"], help="(child) one part")
    args = ap.parse_args(argv)
    if args.one or args.part or args.one_gla:
        # import jax_triton once, up front, then undo its TRITON_CACHE_DIR="" (see anchors.guard_triton_cache),
        # so that a later import (ssmc's Triton target) can't break torch-side Triton compiles mid-run
        try:
            import jax_triton  # noqa: F401
        except Exception:  # noqa: BLE001
            pass
        import anchors
        anchors.guard_triton_cache()
    if args.one:
        shape, dtype = args.one
        run_one(shape, dtype, args.impls, args.bw, args.repeats)
    elif args.one_gla:
        run_gla(args.one_gla, args.gla_impls, args.bw, args.repeats)
    elif args.part:
        main_part(args)
    else:
        main_driver(args)


if __name__ == "__main__":
    main()
