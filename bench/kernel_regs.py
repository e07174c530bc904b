"""Registers and spills of a spec's generated Triton kernels, compiled for sm_90 on this machine (no GPU needed):
Triton's CUDA backend to PTX, then `ptxas -v` (the ptxas Triton ships). A walk kernel holds its state tile and the
chunk's tiles in registers; what does not fit is spilled to local memory, which costs more than its size suggests
(each spill is a round trip per chunk). Cheaper than a GPU run for comparing two emissions of one kernel.

    python bench/kernel_regs.py [--spec examples/mamba2.ssm] [--backward] [--sizes p=64,n=128,g=1]
                                [--warps 4 8] [--stages 1 2] [--dtype bfloat16]

Pointers: activations in --dtype, log-decays, states and the outs the IR keeps in fp32 in float32 (as the
backward feeds them). Sizes: every constexpr N_<dim> from --sizes, its block the next power of two; strides 1.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _tree  # noqa: E402,F401  (ssmc from the working tree, installed or not)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["TRITON_INTERPRET"] = "0"  # the CUDA backend compiles; the interpreter would not


def kernels(spec: str, backward: bool):
    """(label, module, its MODULE_INFO, its layouts' fp32 outs) of the forward kernel and, with `backward`, of the
    derived ones."""
    import ssmc
    k = ssmc.compile(spec, target="triton", cache=False)  # source only: nothing runs here
    out = [("forward", k)]
    if backward:
        out += [(f"{kind} {part}", kk) for kind, part, kk in k._derived_backward().parts()]
    for label, kk in out:
        mod = kk._module
        yield label, mod, mod.MODULE_INFO, set(getattr(mod, "LAYOUT", {}).get("fp32_outs", ()))


def ptxas_report(fn, consts: dict, pointer, warps: int, stages: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, cons = {}, {}
    for prm in fn.params:
        if prm.is_constexpr:
            sig[prm.name], cons[prm.name] = "constexpr", consts.get(prm.name, 1)  # strides: any value
        elif prm.name.endswith("_ptr"):
            sig[prm.name] = pointer(prm.name)
        else:
            sig[prm.name] = "i32"
    out = triton.compile(ASTSource(fn, sig, cons), target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps, num_stages=stages))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = pathlib.Path(tmp, "k.ptx")
        ptx.write_text(out.asm["ptx"])
        ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
        r = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(pathlib.Path(tmp, "k.o"))],
                           capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
    if not regs:
        return "ptxas: " + r.stderr.strip()[-300:]
    return (f"{regs.group(1)} registers, spills {spill.group(1)} B stored / {spill.group(2)} B loaded per thread"
            if spill else f"{regs.group(1)} registers")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(_tree.ROOT / "examples" / "mamba2.ssm"))
    ap.add_argument("--backward", action="store_true", help="also the derived backward kernels")
    ap.add_argument("--sizes", default="p=64,n=128,g=1", help="sizes of the dims compiled into the kernels")
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args()
    import triton.language as tl

    from ssmc.targets.writer import py_name
    sizes = {d: int(v) for d, v in (kv.split("=") for kv in args.sizes.split(",") if kv)}
    act = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}[args.dtype]
    mm = {"bfloat16": tl.bfloat16, "float16": tl.float16, "float32": tl.float32}[args.dtype]
    for label, mod, info, fp32_outs in kernels(args.spec, args.backward):
        consts = {"MM": mm, "PREC": "tf32x3" if args.dtype == "float32" else "tf32", "I64": False, "PACKED": False,
                  "Q": info.chunk or 64}
        for d, n in sizes.items():
            consts[f"N_{d}"] = n
            consts[f"BLOCK_{d}"] = 1 << max(0, (n - 1).bit_length())
        # pointer parameters are named <python name>_ptr (a final state's <state>_final_ptr)
        wide = {p.py for p in info.params if p.kind == "state" or p.name.startswith("log_a")}
        wide |= {py_name(r.name) for r in info.returns if r.name in fp32_outs}

        def pointer(name, wide=wide):
            base = name[:-len("_ptr")]
            return "*fp32" if base in wide or base.endswith("_final") or base == "cu_seqlens" else act
        for name, fn in vars(mod).items():
            if not hasattr(fn, "params") or not callable(getattr(fn, "run", None)):
                continue  # not a @triton.jit kernel
            for w in args.warps:
                for s in args.stages:
                    try:
                        rep = ptxas_report(fn, consts, pointer, w, s)
                    except Exception as e:  # noqa: BLE001  (report and go on)
                        rep = f"{type(e).__name__}: {str(e)[-200:]}"
                    print(f"{label:14s} {name:40s} warps {w} stages {s}: {rep}", flush=True)


if __name__ == "__main__":
    main()
