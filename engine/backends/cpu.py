"""What this CPU offers the matrix kernels: its feature flags, a one-line description for benchmark
records, and whether torch multiplies bf16 natively here."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_flags() -> set[str] | None:
    """Lower-case CPUID feature names of this machine (Linux /proc/cpuinfo, else numpy's view);
    None when neither says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats
        except ImportError:
            return None
    names = {"AVX2": "avx2", "AVX512BW": "avx512bw", "AVX512VNNI": "avx512_vnni"}
    return {v for k, v in names.items() if feats.get(k)}


def describe_cpu() -> str:
    """CPU model and the flags the int8 path depends on, for benchmark records."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags() or set()
    isa = [
        f
        for f in ("avx2", "avx512bw", "avx_vnni", "avx512_vnni", "amx_int8", "asimddp", "i8mm")
        if f in flags
    ]
    return f"{model} ({', '.join(isa) or 'no SIMD int8 flags read'})"


def native_bf16(flags: set[str] | None = None) -> bool:
    """Whether torch's CPU matmuls (oneDNN) run bf16 on matrix or dot-product units here: AMX-BF16
    (Sapphire Rapids and later) or AVX512-BF16 (Cooper Lake, Zen 4). Elsewhere bf16 is emulated and
    slower than fp32."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags and ({"amx_bf16", "avx512_bf16"} & flags))
