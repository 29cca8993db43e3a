"""8-bit GEMMs: W8A8 (int8, or fp8 on sm_89+) with scales in the epilogue, weight-only int8/int4, SwiGLU.

Weights are (N, K) as nn.Linear stores them.

    scaled_mm(a_q, a_s, w_q, w_s)         = (a_q @ w_q^T) * a_s[:, None] * w_s[None, :]
    scaled_mm(..., w2_q=, w2_s=)          = silu(a @ w^T) * (a @ w2^T)        (SwiGLU epilogue)
    weight_only_mm(a, w_q, w_s, block=)   = a @ dequant(w)^T, int8 per channel or int4 in blocks of K
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def scaled_mm_reference(a_q, a_s, w_q, w_s, *, w2_q=None, w2_s=None, out_dtype=torch.float16):
    a = a_q.double() * a_s.double()[:, None]
    y = a @ (w_q.double() * w_s.double()[:, None]).T
    if w2_q is not None:
        y2 = a @ (w2_q.double() * w2_s.double()[:, None]).T
        y = F.silu(y) * y2
    return y.to(out_dtype)


def dequant_weight(w_q, w_s, block: int | None = None):
    """int8 (N, K) with (N,) scales, or int4 packed (N, K/2) with (N, K/block) scales -> float (N, K)."""
    if block is None:
        return w_q.float() * w_s.float()[:, None]
    lo = (w_q & 0xF).to(torch.int16)
    hi = ((w_q.to(torch.int16) >> 4) & 0xF).to(torch.int16)
    v = torch.stack([lo, hi], dim=-1).reshape(w_q.shape[0], -1)
    v = torch.where(v >= 8, v - 16, v).float()
    return v * w_s.float().repeat_interleave(block, dim=1)


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int values in [-8, 7] -> (N, K/2) uint8, even k in the low nibble."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def weight_only_mm_reference(a, w_q, w_s, block=None):
    return (a.double() @ dequant_weight(w_q, w_s, block).double().T).to(a.dtype)


if triton is not None:

    @triton.jit
    def _scaled_mm(
        A, AS, W, WS, W2, W2S, C,
        M, N, K,
        sam, sak, swn, swk, scm, scn,
        SWIGLU: tl.constexpr, IS_INT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        # grouped ordering: neighbouring programs share A rows (L2 reuse)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        gm = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % gm
        pid_n = (pid % (GROUP_M * num_n)) // gm
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc_t = tl.int32 if IS_INT else tl.float32
        acc = tl.zeros([BLOCK_M, BLOCK_N], acc_t)
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], acc_t)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            amask = (rm < M)[:, None] & (kk < K)[None, :]
            wmask = (kk < K)[:, None] & (rn < N)[None, :]
            zero = 0 if IS_INT else 0.0
            a = tl.load(A + rm[:, None] * sam + kk[None, :] * sak, mask=amask, other=zero)
            w = tl.load(W + rn[None, :] * swn + kk[:, None] * swk, mask=wmask, other=zero)
            acc += tl.dot(a, w, out_dtype=acc_t)
            if SWIGLU:
                w2 = tl.load(W2 + rn[None, :] * swn + kk[:, None] * swk, mask=wmask, other=zero)
                acc2 += tl.dot(a, w2, out_dtype=acc_t)
        a_s = tl.load(AS + rm, mask=rm < M, other=0.0)
        w_s = tl.load(WS + rn, mask=rn < N, other=0.0)
        y = acc.to(tl.float32) * a_s[:, None] * w_s[None, :]
        if SWIGLU:
            w2_s = tl.load(W2S + rn, mask=rn < N, other=0.0)
            y2 = acc2.to(tl.float32) * a_s[:, None] * w2_s[None, :]
            y = y / (1.0 + tl.exp(-y)) * y2
        tl.store(
            C + rm[:, None] * scm + rn[None, :] * scn,
            y.to(C.dtype.element_ty),
            mask=(rm < M)[:, None] & (rn < N)[None, :],
        )

    @triton.jit
    def _weight_only_mm(
        A, W, WS, C,
        M, N, K,
        sam, sak, swn, swk, sws_n, scm, scn,
        INT4: tl.constexpr, QBLOCK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(
                A + rm[:, None] * sam + kk[None, :] * sak,
                mask=(rm < M)[:, None] & (kk < K)[None, :],
                other=0.0,
            )
            wmask = (kk < K)[:, None] & (rn < N)[None, :]
            if INT4:
                byte = tl.load(W + rn[None, :] * swn + (kk // 2)[:, None] * swk, mask=wmask, other=0).to(
                    tl.int32
                )
                nib = (byte >> ((kk % 2) * 4)[:, None]) & 0xF
                wv = tl.where(nib >= 8, nib - 16, nib).to(tl.float32)
                s = tl.load(WS + rn[None, :] * sws_n + (kk // QBLOCK)[:, None], mask=wmask, other=0.0)
            else:
                wv = tl.load(W + rn[None, :] * swn + kk[:, None] * swk, mask=wmask, other=0).to(tl.float32)
                s = tl.load(WS + rn, mask=rn < N, other=0.0)[None, :]
            w = (wv * s).to(A.dtype.element_ty)
            acc += tl.dot(a, w)
        tl.store(
            C + rm[:, None] * scm + rn[None, :] * scn,
            acc.to(C.dtype.element_ty),
            mask=(rm < M)[:, None] & (rn < N)[None, :],
        )


GEMM_BLOCKS = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)


def gemm_blocks(swiglu: bool, fp8: bool) -> dict:
    """Tiles that do not spill on sm_86/89/90 (bench/kernel_resources.py): the SwiGLU epilogue
    keeps two accumulators, so it halves BLOCK_N (and BLOCK_M for fp8)."""
    if not swiglu:
        return dict(GEMM_BLOCKS)
    return dict(GEMM_BLOCKS, BLOCK_N=64, BLOCK_M=64 if fp8 else 128)


WO_BLOCKS = {
    False: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    True: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
}
WO_WARPS = {False: 4, True: 8}


def scaled_mm(
    a_q, a_s, w_q, w_s, *, w2_q=None, w2_s=None, out_dtype=torch.float16, blocks: dict | None = None
):
    """a_q (M, K) int8 or float8_e4m3fn with per-row scales a_s (M,); w_q (N, K) same dtype, w_s (N,)."""
    if triton is None:
        return scaled_mm_reference(a_q, a_s, w_q, w_s, w2_q=w2_q, w2_s=w2_s, out_dtype=out_dtype)
    m, k = a_q.shape
    n = w_q.shape[0]
    sw = w2_q is not None
    bl = dict(gemm_blocks(sw, a_q.dtype != torch.int8), **(blocks or {}))
    c = torch.empty((m, n), device=a_q.device, dtype=out_dtype)
    grid = (triton.cdiv(m, bl["BLOCK_M"]) * triton.cdiv(n, bl["BLOCK_N"]),)
    _scaled_mm[grid](
        a_q, a_s, w_q, w_s, w2_q if sw else w_q, w2_s if sw else w_s, c,
        m, n, k, *a_q.stride(), *w_q.stride(), *c.stride(),
        SWIGLU=sw, IS_INT=a_q.dtype == torch.int8, num_warps=8, num_stages=3, **bl,
    )  # fmt: skip
    return c


def weight_only_mm(a, w_q, w_s, block: int | None = None, blocks: dict | None = None):
    """a (M, K) fp16/bf16/fp32; w_q int8 (N, K) with (N,) scales, or int4 packed (N, K/2) with (N, K/block)."""
    if triton is None:
        return weight_only_mm_reference(a, w_q, w_s, block)
    m, k = a.shape
    n = w_q.shape[0]
    bl = {**WO_BLOCKS[block is not None], **(blocks or {})}
    c = torch.empty((m, n), device=a.device, dtype=a.dtype)
    grid = (triton.cdiv(m, bl["BLOCK_M"]), triton.cdiv(n, bl["BLOCK_N"]))
    _weight_only_mm[grid](
        a, w_q, w_s, c, m, n, k, *a.stride(), *w_q.stride(), w_s.stride(0), *c.stride(),
        INT4=block is not None, QBLOCK=block or 1, num_warps=WO_WARPS[block is not None], num_stages=3, **bl,
    )  # fmt: skip
    return c
