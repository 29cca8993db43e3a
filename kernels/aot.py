"""Ahead-of-time compilation of every kernel variant for sm_86 / sm_89 / sm_90, with no GPU needed.

    python -m auraflow_edge.kernels.aot --out build/aot [--arch 86,89,90]

For each variant and architecture: ``triton.compile`` for that target, then a C file that embeds the
cubin and exposes one entry point, ``CUresult afe_<variant>_sm<cc>(CUstream, gx, gy, gz, args...)``
(the grid is the caller's: it depends on the shapes), loaded lazily through the CUDA driver API.
``auraflow_edge_kernels.h`` declares them all; CMakeLists.txt builds them into one shared library
for the TensorRT plugin and for runtimes without a Triton compiler.

Each variant is compiled with the specialization Triton's JIT gives the same launch on a GPU:
pointers and the listed integers divisible by 16 (``tt.divisibility = 16``), unit inner strides as
the constant 1. Without it Triton cannot prove the loads contiguous and aligned, and the kernels
lose vectorised ``cp.async`` pipelining. That is a launch contract: the C entry point checks it
and returns ``CUDA_ERROR_INVALID_VALUE`` (launching nothing) when a call breaks it.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path
from typing import NamedTuple

C_TYPES = {"i32": "int32_t", "fp32": "float", "i64": "int64_t"}


def _i32(*names):
    return {n: "i32" for n in names}


class Variant(NamedTuple):
    label: str
    kernel: object
    sig: dict  # every runtime argument -> Triton type (unit strides included: they stay in the C prototype)
    const: dict  # constexpr arguments
    warps: int
    stages: int
    archs: tuple
    unit: tuple = ()  # integer arguments the launch contract fixes to 1 (inner strides)
    aligned: tuple = ()  # integer arguments the launch contract makes multiples of 16


def variants() -> list[Variant]:
    """Every kernel variant compiled ahead of time, with its signature and launch constants. Long
    because it is a table (one entry per kernel, dtype and shape class), not logic; split by kernel
    it would scatter the one list the C header and kernels.json are generated from."""
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
                    QB=A.QUANT_GROUP,
                )
                out.append(
                    Variant(
                        f"attention {dt} d{d}{' int8qk' if int8 else ''}",
                        A._attn_fwd,
                        sig,
                        const,
                        warps,
                        stages,
                        (86, 89, 90),
                        unit=tuple(f"s{t}d" for t in "qkvo"),
                        aligned=(*(f"s{t}{a}" for t in "qkvo" for a in "bhn"), "D"),
                    )
                )
        for quant in (False, True):
            sig = {"X": f"*{dt}", "Y": "*i8" if quant else f"*{dt}", "YS": "*fp32", "SHIFT": "*fp32"}
            sig |= _i32("sxb", "sxh", "sxn", "sxd", "N", "D", "H") | {"eps": "fp32", "mult": "fp32"}
            const = dict(NORM=True, HAS_SHIFT=quant, QUANT=quant, BLOCK=A.QUANT_GROUP, BLOCK_D=256)
            out.append(
                Variant(
                    f"rows_prep {dt} d256{' int8' if quant else ''}",
                    A._rows_prep,
                    sig,
                    const,
                    A.PREP_WARPS,
                    1,
                    (86, 89, 90),
                    unit=("sxd",),
                    aligned=("sxb", "sxh", "sxn", "D"),
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
            out.append(
                Variant(
                    f"norm_modulate {dt} D3072 out={qt}", N._norm_mod, sig, const, 8, 1, archs, aligned=("D",)
                )
            )
        for int4 in (False, True):
            sig = {"A": f"*{dt}", "W": "*u8" if int4 else "*i8", "WS": "*fp32", "C": f"*{dt}"}
            sig |= _i32("M", "N", "K", "sam", "sak", "swn", "swk", "sws_n", "scm", "scn")
            const = dict(INT4=int4, QBLOCK=64 if int4 else 1, **G.WO_BLOCKS[int4])
            out.append(
                Variant(
                    f"weight_only {dt} {'int4' if int4 else 'int8'}",
                    G._weight_only_mm,
                    sig,
                    const,
                    G.WO_WARPS[int4],
                    3,
                    (86, 89, 90),
                    unit=("sak", "swk", "scn"),
                    aligned=("N", "K", "sam", "swn", "scm"),
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
            const = dict(SWIGLU=swiglu, IS_INT=qt == "i8", **G.gemm_blocks(swiglu, qt != "i8"))
            out.append(
                Variant(
                    f"scaled_mm {qt}{' swiglu' if swiglu else ''}",
                    G._scaled_mm,
                    sig,
                    const,
                    8,
                    3,
                    archs,
                    unit=("sak", "swk", "scn"),
                    aligned=("N", "K", "sam", "swn", "scm"),
                )
            )
    return out


def c_name(label: str, arch: int) -> str:
    return "afe_" + re.sub(r"[^0-9a-zA-Z]+", "_", label).strip("_").lower() + f"_sm{arch}"


def specialization(kernel, sig: dict, const: dict, unit=(), aligned=()) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``ASTSource``, as Triton's JIT builds them at launch
    (``JITFunction._pack_args``): an integer equal to 1 becomes the constant 1; pointers and
    integers divisible by 16 get ``tt.divisibility = 16``. Here the launch contract says which."""
    named = (*unit, *aligned)
    if set(unit) & set(aligned) or any(sig.get(a) != "i32" for a in named):
        raise ValueError(
            f"{kernel.__name__}: unit / aligned arguments must be distinct i32 arguments: {named}"
        )
    const = {**const, **dict.fromkeys(unit, 1)}
    signature = {
        a: ("constexpr" if a in const else sig[a]) for a in kernel.arg_names if a in sig or a in const
    }
    div16 = [["tt.divisibility", 16]]
    attrs = {
        (kernel.arg_names.index(a),): div16
        for a, t in signature.items()
        if t.startswith("*") or (a in aligned and t == "i32")
    }
    return signature, const, attrs


def compile_variant(
    kernel,
    sig,
    const,
    arch: int,
    warps: int,
    stages: int,
    unit=(),
    aligned=(),
    ptx_version: int | None = None,
):
    """``triton.compile`` for sm_``arch``; ``ptx_version`` (e.g. 87) caps the PTX ISA written, for a
    driver older than Triton's toolchain."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialization(kernel, sig, const, unit, aligned)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return triton.compile(
            ASTSource(kernel, signature, constexprs, attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": warps, "num_stages": stages}
            | ({"ptx_version": ptx_version} if ptx_version else {}),
        )


def c_source(name: str, v: Variant, compiled) -> tuple[str, str]:
    """(C file, prototype) for one compiled variant. The prototype keeps every runtime argument of
    the kernel (unit strides too, so the ABI does not depend on the specialization); the launch
    contract is checked before the launch."""
    params, ptrs, checks = [], [], []
    for arg in v.kernel.arg_names:
        if arg not in v.sig:
            continue  # constexpr: baked into the cubin
        t = v.sig[arg]
        params.append(f"CUdeviceptr {arg}" if t.startswith("*") else f"{C_TYPES[t]} {arg}")
        if t.startswith("*"):
            checks.append(f"({arg} & 15)")
        elif arg in v.unit:
            checks.append(f"{arg} != 1")
        elif arg in v.aligned:
            checks.append(f"{arg} % 16")
        if arg not in v.unit:  # a unit stride is the constant 1 in the cubin, not a kernel parameter
            ptrs.append(f"&{arg}")
    ptrs += ["&global_scratch", "&profile_scratch"]  # Triton's two trailing kernel parameters
    proto = f"CUresult {name}(CUstream stream, unsigned gx, unsigned gy, unsigned gz, {', '.join(params)})"
    cubin = compiled.asm["cubin"]
    data = ",".join(str(b) for b in cubin)
    shared = int(compiled.metadata.shared)
    contract = " ||\n      ".join(checks) or "0"
    src = f"""/* generated by auraflow_edge.kernels.aot: {v.kernel.__name__}, do not edit */
#include <stdint.h>
#include <cuda.h>

static const unsigned char cubin[{len(cubin)}] = {{{data}}};
static CUmodule module_ = 0;
static CUfunction function_ = 0;

static CUresult load_(void) {{
  CUresult r = cuModuleLoadData(&module_, cubin);
  if (r != CUDA_SUCCESS) return r;
  r = cuModuleGetFunction(&function_, module_, "{compiled.metadata.name}");
  if (r != CUDA_SUCCESS) return r;
  if ({shared} > 49152)
    r = cuFuncSetAttribute(function_, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, {shared});
  return r;
}}

{proto} {{
  /* compiled for 16-byte aligned pointers, these integers multiples of 16 and unit inner strides */
  if ({contract})
    return CUDA_ERROR_INVALID_VALUE;
  if (!function_) {{
    CUresult r = load_();
    if (r != CUDA_SUCCESS) return r;
  }}
  CUdeviceptr global_scratch = 0, profile_scratch = 0;
  void *args[] = {{{", ".join(ptrs)}}};
  if (gx * gy * gz == 0) return CUDA_SUCCESS;
  return cuLaunchKernel(function_, gx, gy, gz, {v.warps} * 32, 1, 1, {shared}, stream, args, 0);
}}
"""
    return src, proto


def generate(out: Path, archs: list[int], only: str = "") -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    entries, protos = [], []
    for v in variants():
        if only not in v.label:
            continue
        for arch in archs:
            if arch not in v.archs:
                continue
            name = c_name(v.label, arch)
            k = compile_variant(v.kernel, v.sig, v.const, arch, v.warps, v.stages, v.unit, v.aligned)
            src, proto = c_source(name, v, k)
            (out / f"{name}.c").write_text(src)
            protos.append(proto + ";")
            entries.append(
                {
                    "function": name,
                    "kernel": v.label,
                    "arch": f"sm_{arch}",
                    "shared_bytes": int(k.metadata.shared),
                    "num_warps": v.warps,
                    "constexprs": v.const,
                    "unit_args": list(v.unit),
                    "aligned_args": list(v.aligned),
                }
            )
            print(f"  {name}", flush=True)
    header = (
        '#pragma once\n#include <cuda.h>\n#include <stdint.h>\n#ifdef __cplusplus\nextern "C" {\n#endif\n'
    )
    header += "\n".join(protos) + "\n#ifdef __cplusplus\n}\n#endif\n"
    (out / "auraflow_edge_kernels.h").write_text(header)
    (out / "kernels.json").write_text(json.dumps(entries, indent=1) + "\n")
    return entries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="86,89,90")
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    e = generate(Path(a.out), [int(x) for x in a.arch.split(",")], a.only)
    print(f"{len(e)} entry points in {a.out}")


if __name__ == "__main__":
    main()
