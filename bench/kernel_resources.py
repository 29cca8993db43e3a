"""Registers, spills and shared memory of every kernel variant, compiled for sm_86 / sm_89 / sm_90
with no GPU present (Triton compiles for a target; ptxas -v reports the resources).

    python bench/kernel_resources.py [--json bench/results/kernel_resources.json] [--arch 86,89,90]

Fails (exit 1) if any variant spills or needs more shared memory than an sm_86 block may use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

SMEM_LIMIT = {86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _ptxas() -> str:
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(p) if p.exists() else "ptxas"


def _i32(*names):
    return {n: "i32" for n in names}


def variants():
    """(label, kernel, signature, constexprs, num_warps, num_stages, archs)."""
    from auraflow_edge.kernels import attention as A
    from auraflow_edge.kernels import gemm as G
    from auraflow_edge.kernels import norm_modulate as N

    out = []
    strides = [f"s{t}{a}" for t in "qkvo" for a in "bhnd"]
    for dt in ("fp16", "bf16"):
        for int8 in (False, True):
            for d in (64, 128, 256):
                bm, bn, warps, stages = A.block_sizes(d, int8)
                qt = "i8" if int8 else dt
                sig = {
                    "Q": f"*{qt}",
                    "K": f"*{qt}",
                    "V": f"*{dt}",
                    "Out": f"*{dt}",
                    "QS": "*fp32",
                    "KS": "*fp32",
                }
                sig |= _i32(*strides, "H", "N_Q", "N_K", "D") | {"qk_scale": "fp32", "eps": "fp32"}
                const = dict(
                    Q_NORM=not int8 and A.q_norm_in_kernel(d),
                    INT8=int8,
                    IEEE=False,
                    BLOCK_M=bm,
                    BLOCK_N=bn,
                    BLOCK_D=d,
                )
                out.append(
                    (
                        f"attention {dt} d{d}{' int8qk' if int8 else ''}",
                        A._attn_fwd,
                        sig,
                        const,
                        warps,
                        stages,
                        (86, 89, 90),
                    )
                )
        for quant in (False, True):
            sig = {"X": f"*{dt}", "Y": "*i8" if quant else f"*{dt}", "YS": "*fp32", "SHIFT": "*fp32"}
            sig |= _i32("sxb", "sxh", "sxn", "sxd", "N", "D", "H") | {"eps": "fp32", "mult": "fp32"}
            const = dict(NORM=True, HAS_SHIFT=quant, QUANT=quant, BLOCK=64, BLOCK_D=256)
            out.append(
                (
                    f"rows_prep {dt} d256{' int8' if quant else ''}",
                    A._rows_prep,
                    sig,
                    const,
                    4,
                    1,
                    (86, 89, 90),
                )
            )
        for quant, qt in ((0, dt), (1, "i8"), (2, "fp8e4nv")):
            sig = {
                "X": f"*{dt}",
                "RES": f"*{dt}",
                "GATE": f"*{dt}",
                "SCALE": f"*{dt}",
                "SHIFT": f"*{dt}",
                "Y": f"*{qt}",
                "YS": "*fp32",
            }
            sig |= _i32("N", "D") | {"eps": "fp32"}
            const = dict(
                HAS_RES=True, QUANT=quant, NORM=True, QMAX_=127.0 if quant == 1 else 448.0, BLOCK_D=4096
            )
            archs = (89, 90) if quant == 2 else (86, 89, 90)
            out.append((f"norm_modulate {dt} D3072 out={qt}", N._norm_mod, sig, const, 8, 1, archs))
        for int4 in (False, True):
            sig = {"A": f"*{dt}", "W": "*u8" if int4 else "*i8", "WS": "*fp32", "C": f"*{dt}"}
            sig |= _i32("M", "N", "K", "sam", "sak", "swn", "swk", "sws_n", "scm", "scn")
            const = dict(INT4=int4, QBLOCK=64 if int4 else 1, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)
            out.append(
                (
                    f"weight_only {dt} {'int4' if int4 else 'int8'}",
                    G._weight_only_mm,
                    sig,
                    const,
                    4,
                    3,
                    (86, 89, 90),
                )
            )
    for qt, archs in (("i8", (86, 89, 90)), ("fp8e4nv", (89, 90))):
        for swiglu in (False, True):
            sig = {
                "A": f"*{qt}",
                "AS": "*fp32",
                "W": f"*{qt}",
                "WS": "*fp32",
                "W2": f"*{qt}",
                "W2S": "*fp32",
                "C": "*fp16",
            }
            sig |= _i32("M", "N", "K", "sam", "sak", "swn", "swk", "scm", "scn")
            const = dict(SWIGLU=swiglu, IS_INT=qt == "i8", **G.GEMM_BLOCKS)
            out.append(
                (f"scaled_mm {qt}{' swiglu' if swiglu else ''}", G._scaled_mm, sig, const, 8, 3, archs)
            )
    return out


def compile_one(kernel, sig, const, arch: int, warps: int, stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(sig)
    for k in const:
        sig[k] = "constexpr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = triton.compile(
            ASTSource(kernel, sig, const),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(k.asm["ptx"])
        r = subprocess.run(
            [
                _ptxas(),
                f"-arch=sm_{arch}{'a' if arch == 90 else ''}",
                "-v",
                str(ptx),
                "-o",
                str(Path(d) / "k.o"),
            ],
            capture_output=True,
            text=True,
        )
    info = r.stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    return {
        "arch": f"sm_{arch}",
        "registers": regs,
        "spill_bytes": spill,
        "shared_bytes": int(k.metadata.shared),
        "num_warps": warps,
        "num_stages": stages,
    }


def main() -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "kernel_resources.json"))
    ap.add_argument("--arch", default="86,89,90")
    ap.add_argument("--only", default="", help="substring filter on the variant label")
    args = ap.parse_args()
    archs = [int(a) for a in args.arch.split(",")]
    rows, bad = [], []
    print(f"{'kernel':<40} {'arch':<6} {'regs':>4} {'spill B':>7} {'smem KiB':>8}")
    for label, kern, sig, const, warps, stages, ok_archs in variants():
        if args.only not in label:
            continue
        for arch in archs:
            if arch not in ok_archs:
                continue
            r = {"kernel": label, **compile_one(kern, sig, const, arch, warps, stages)}
            rows.append(r)
            flag = ""
            if r["spill_bytes"] or r["shared_bytes"] > SMEM_LIMIT[86]:
                bad.append(r)
                flag = "  <-- FAIL"
            print(
                f"{label:<40} {r['arch']:<6} {r['registers']:>4} {r['spill_bytes']:>7} {r['shared_bytes'] / 1024:>8.1f}{flag}",
                flush=True,
            )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "compiled_on": "CPU machine, no GPU (triton.compile for a target + ptxas -v)",
                "triton": __import__("triton").__version__,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"{len(rows)} compilations, {len(bad)} failing; wrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
