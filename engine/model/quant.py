"""Weight quantization in numpy: symmetric int8 / fp8 e4m3 per output channel, int4 in input blocks.

Weights are (out, in) as in torch's nn.Linear. Each function returns the quantized values and
the scales such that ``dequantize(...)`` reconstructs ``w`` to within half a step per element.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = 448.0
WEIGHT_FORMATS = ("int8", "fp8", "int4")


def _safe(scale: np.ndarray) -> np.ndarray:
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> q int8 (out, in), scale float32 (out,)."""
    w = w.astype(np.float32)
    scale = _safe(np.abs(w).max(axis=1) / 127.0)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def quantize_fp8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> q float8 e4m3fn (out, in), scale float32 (out,)."""
    w = w.astype(np.float32)
    scale = _safe(np.abs(w).max(axis=1) / FP8_MAX)
    q = np.clip(w / scale[:, None], -FP8_MAX, FP8_MAX).astype(FP8)
    return q, scale


def quantize_int4(w: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """-> q int8 holding values in [-7, 7] (out, in), scale float32 (out, in // block)."""
    out, k = w.shape
    if k % block:
        raise ValueError(f"input dim {k} is not a multiple of the int4 block size {block}")
    wb = w.astype(np.float32).reshape(out, k // block, block)
    scale = _safe(np.abs(wb).max(axis=2) / 7.0)
    q = np.clip(np.rint(wb / scale[:, :, None]), -7, 7).astype(np.int8)
    return q.reshape(out, k), scale


def dequantize(fmt: str, q: np.ndarray, scale: np.ndarray, block: int = 64) -> np.ndarray:
    """Reference dequantization back to float32 (out, in)."""
    qf = q.astype(np.float32)
    if fmt == "int4":
        out, k = q.shape
        return (qf.reshape(out, k // block, block) * scale[:, :, None]).reshape(out, k)
    return qf * scale[:, None]


def pack_int4(q: np.ndarray) -> bytes:
    """Signed 4-bit values, two per byte, element 0 in the low nibble (ONNX INT4 layout)."""
    flat = (q.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def matmul_nbits_blob(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """(N, K) signed values -> com.microsoft.MatMulNBits B: uint8 (N, K/block, block*bits/8).

    Stored unsigned with the default zero point 2**(bits-1).
    """
    n, k = q.shape
    u = (q.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8).reshape(n, k // block, block)
    if bits == 8:
        return u
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
