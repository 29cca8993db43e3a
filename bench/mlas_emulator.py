"""MLAS's two integer GEMM paths emulated in numpy, per CPU class (the int8 tests and benchmark).

ONNX Runtime's DynamicQuantizeMatMul runs u8 x s8 through vpmaddubsw (int16 pair sums, saturating)
on x86-64 without VNNI and exactly elsewhere; the runtime's choice of weight encoding
(engine/backends/ort_int8.py) must never saturate. This is the independent model of that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CpuClass:
    name: str
    machine: str
    flags: frozenset[str]
    saturating_u8s8: bool  # MLAS multiplies u8 x s8 with vpmaddubsw (int16 pair sums, saturating)


# Every CPU class ONNX Runtime's MLAS dispatches int8 GEMMs for, with representative flags.
CPU_CLASSES = (
    CpuClass("x86-64 AVX2 (no VNNI)", "x86_64", frozenset({"avx2"}), True),
    CpuClass("x86-64 AVX512BW (no VNNI)", "x86_64", frozenset({"avx2", "avx512bw"}), True),
    CpuClass("x86-64 AVX-VNNI", "x86_64", frozenset({"avx2", "avx_vnni"}), False),
    CpuClass("x86-64 AVX512-VNNI", "x86_64", frozenset({"avx2", "avx512bw", "avx512_vnni"}), False),
    # AVX-VNNI without AVX512-VNNI beside AVX-512 BW: MLAS picks its AVX-512 core kernel (saturating)
    CpuClass("x86-64 AVX512BW + AVX-VNNI only", "x86_64", frozenset({"avx2", "avx512bw", "avx_vnni"}), True),
    CpuClass("x86-64 AMX", "x86_64", frozenset({"avx2", "avx512bw", "avx512_vnni", "amx_int8"}), False),
    CpuClass("ARM64 NEON", "aarch64", frozenset({"asimd"}), False),
    CpuClass("ARM64 dotprod/i8mm", "aarch64", frozenset({"asimd", "asimddp", "i8mm"}), False),
)


def quantize_activations(a: np.ndarray, act_range=None) -> tuple[np.ndarray, float, int]:
    """DynamicQuantizeMatMul's activation quantization: uint8, per tensor, range including 0.
    ``act_range``: (min, max) of the whole tensor when ``a`` is a slice of it (batched products)."""
    lo, hi = act_range or (float(a.min()), float(a.max()))
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = int(np.clip(np.rint(-lo / scale), 0, 255))
    q = np.clip(np.rint(a / np.float32(scale)) + zp, 0, 255).astype(np.int32)
    return q, scale, zp


def emulate_matmul(
    a: np.ndarray,
    b: np.ndarray,
    b_zp: int,
    b_scale: np.ndarray,
    saturating: bool,
    rows: int = 64,
    act_range=None,
) -> tuple[np.ndarray, int]:
    """One DynamicQuantizeMatMul in integers as MLAS does it: ``a`` float (M, K), ``b`` the stored
    weight bytes as int (K, N) (int8 values, or uint8 with ``b_zp``). With ``saturating`` the
    kernel's inner products are summed in int16 pairs along K with saturation (vpmaddubsw), the zero
    points corrected afterwards from row and column sums. ``act_range``: see quantize_activations.
    -> (float32 output, saturated pairs)."""
    qa, sa, za = quantize_activations(a, act_range)
    m, k = qa.shape
    if k % 2:
        qa, b = np.pad(qa, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    bb = b.astype(np.int32).reshape(-1, 2, b.shape[1])  # (K/2, 2, N)
    acc = np.empty((m, b.shape[1]), np.int64)
    clipped = 0
    for r in range(0, m, rows):
        pa = qa[r : r + rows].reshape(-1, bb.shape[0], 2)  # (rows, K/2, 2)
        pairs = np.einsum("mip,ipn->min", pa, bb)  # (rows, K/2, N) int32
        if saturating:
            clipped += int(((pairs > 32767) | (pairs < -32768)).sum())
            pairs = np.clip(pairs, -32768, 32767)
        acc[r : r + rows] = pairs.sum(axis=1, dtype=np.int64)
    # sum (qa - za)(b - zb) = sum qa*b - za*colsum(b) - zb*rowsum(qa) + K*za*zb
    acc -= za * b.astype(np.int64).sum(0)[None, :] + b_zp * qa.astype(np.int64).sum(1)[:, None]
    acc += k * za * b_zp
    return (acc * (sa * b_scale.astype(np.float64))[None, :]).astype(np.float32), clipped


def encode_for(q: np.ndarray, encoding: str) -> tuple[np.ndarray, int]:
    """int8 weight values -> (stored values as int, zero point) for the encoding."""
    return (q.astype(np.int32) + 128, 128) if encoding == "u8" else (q.astype(np.int32), 0)
