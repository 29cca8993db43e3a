"""Fused qk-LayerNorm flash attention for AuraFlow (head_dim up to 256), with an int8 Q/K variant.

attention(q, k, v, qk_norm=True) = softmax(LN(q) LN(k)^T / sqrt(d)) v, where LN is AuraFlow's
per-head LayerNorm (fp32 statistics, no affine). Online softmax: the (tokens x tokens) score
matrix is never materialised. Q is normalised inside the attention kernel (its tile is loaded once
per program); K is normalised once by a row pre-pass, not once per query block.

``qk_int8=True`` (SageAttention's recipe, extended to head_dim 256): after the norm, K is smoothed
by subtracting its per-channel mean over tokens (softmax is invariant to it), Q and K are
quantized to int8 with one scale per block of tokens, QK^T is an int8 dot with int32 accumulation,
and P.V stays in fp16/bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path still works
    triton = None

LOG2E = 1.4426950408889634
PREP_WARPS = 8  # the row pre-pass holds a (BLOCK, 256) fp32 tile: 4 warps would spill
QUANT_GROUP = 32  # int8 Q/K: one scale per 32 tokens (a 64-row quantizing pre-pass spills on sm_90)


def attention_reference(q, k, v, *, qk_norm: bool = True, eps: float = 1e-5, scale: float | None = None):
    """Plain torch: the same function, in the input dtype with fp32 norms."""
    d = q.shape[-1]
    if qk_norm:
        q = F.layer_norm(q.float(), (d,), eps=eps).to(q.dtype)
        k = F.layer_norm(k.float(), (d,), eps=eps).to(k.dtype)
    return F.scaled_dot_product_attention(q, k, v, scale=scale if scale is not None else d**-0.5)


if triton is not None:

    @triton.jit
    def _rows_prep(
        X, Y, YS, SHIFT,
        sxb, sxh, sxn, sxd,
        N, D, H, eps, mult,
        NORM: tl.constexpr, HAS_SHIFT: tl.constexpr, QUANT: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One block of rows of one (batch, head): optional LayerNorm, minus a per-channel shift,
        times ``mult``; writes Y (contiguous (B, H, N, D)) in Y's dtype, or int8 plus one scale per block."""
        pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        rows = pid_n * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, BLOCK_D)
        msk = (rows < N)[:, None] & (cols < D)[None, :]
        x = tl.load(X + b * sxb + h * sxh + rows[:, None] * sxn + cols[None, :] * sxd, mask=msk, other=0.0)
        x = x.to(tl.float32)
        if NORM:
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(msk, x - mean[:, None], 0.0)
            var = tl.sum(xc * xc, axis=1) / D
            x = xc * (1.0 / tl.sqrt(var + eps))[:, None]
        if HAS_SHIFT:
            sh = tl.load(SHIFT + pid_bh * D + cols, mask=cols < D, other=0.0)
            x = tl.where(msk, x - sh[None, :], 0.0)
        x = x * mult
        out = Y + pid_bh * N * D + rows[:, None] * D + cols[None, :]
        if QUANT:
            amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
            s = tl.maximum(amax, 1e-12) / 127.0
            qv = x / s
            qv = tl.where(qv >= 0, qv + 0.5, qv - 0.5).to(tl.int32)  # round half away from zero
            tl.store(out, qv.to(tl.int8), mask=msk)
            tl.store(YS + pid_bh * tl.cdiv(N, BLOCK) + pid_n, s)
        else:
            tl.store(out, x.to(Y.dtype.element_ty), mask=msk)

    @triton.jit
    def _attn_fwd(
        Q, K, V, Out, QS, KS,
        sqb, sqh, sqn, sqd,
        skb, skh, skn, skd,
        svb, svh, svn, svd,
        sob, soh, son, sod,
        H, N_Q, N_K, D, qk_scale, eps,
        Q_NORM: tl.constexpr, INT8: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, QB: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        mmask = (offs_m < N_Q)[:, None] & dmask[None, :]
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=mmask, other=0.0
        )
        if INT8:
            # one scale per QB tokens (the pre-pass block), looked up per row / per key
            q_scale = tl.load(QS + pid_bh * tl.cdiv(N_Q, QB) + offs_m // QB, mask=offs_m < N_Q, other=0.0)
            n_kgroups = tl.cdiv(N_K, QB)
        else:
            qf = q.to(tl.float32)
            if Q_NORM:
                mean = tl.sum(qf, axis=1) / D
                qc = tl.where(mmask, qf - mean[:, None], 0.0)
                var = tl.sum(qc * qc, axis=1) / D
                qf = qc * (1.0 / tl.sqrt(var + eps))[:, None]
            q = (qf * qk_scale).to(V.dtype.element_ty)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        for start in range(0, N_K, BLOCK_N):
            cols = start + offs_n
            nmask = cols < N_K
            k = tl.load(
                k_base + cols[:, None] * skn + offs_d[None, :] * skd,
                mask=nmask[:, None] & dmask[None, :],
                other=0.0,
            )
            if INT8:
                s = tl.dot(q, tl.trans(k)).to(tl.float32)
                k_scale = tl.load(KS + pid_bh * n_kgroups + cols // QB, mask=nmask, other=0.0)
                s = s * q_scale[:, None] * k_scale[None, :]
            elif IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            v = tl.load(
                v_base + cols[:, None] * svn + offs_d[None, :] * svd,
                mask=nmask[:, None] & dmask[None, :],
                other=0.0,
            )
            if IEEE:
                acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(
            Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
            acc.to(Out.dtype.element_ty),
            mask=mmask,
        )


def block_sizes(head_dim: int, int8: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), chosen so no variant spills registers and all fit
    sm_86's 99 KiB of shared memory (bench/kernel_resources.py checks sm_86/89/90)."""
    if head_dim <= 64:
        return (64, 64, 4, 2)
    if head_dim <= 128 or int8:
        return (64, 64, 8, 2)
    return (64, 32, 8, 2)


def q_norm_in_kernel(head_dim: int) -> bool:
    """At d = 256 an in-kernel LayerNorm of the Q tile would spill; Q then goes through the row pre-pass."""
    return head_dim <= 128


def _prep(
    x, *, norm: bool, shift=None, mult: float = 1.0, quant: bool, block: int, eps: float, out_dtype=None
):
    b, h, n, d = x.shape
    bd = triton.next_power_of_2(d)
    y = torch.empty((b, h, n, d), device=x.device, dtype=torch.int8 if quant else (out_dtype or x.dtype))
    ys = torch.empty((b * h, triton.cdiv(n, block)), device=x.device, dtype=torch.float32)
    sh = shift if shift is not None else ys
    _rows_prep[(triton.cdiv(n, block), b * h)](
        x, y, ys, sh, *x.stride(), n, d, h, eps, mult,
        NORM=norm, HAS_SHIFT=shift is not None, QUANT=quant, BLOCK=block, BLOCK_D=bd, num_warps=PREP_WARPS,
    )  # fmt: skip
    return y, ys


def attention(
    q, k, v, *, qk_norm: bool = True, eps: float = 1e-5, qk_int8: bool = False, scale: float | None = None
):
    """q, k, v: (batch, heads, tokens, head_dim), fp16 / bf16 / fp32 -> same shape and dtype as q."""
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or v.shape != k.shape or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"attention expects (B, H, N, D) q/k/v with matching dims, got {q.shape} {k.shape} {v.shape}"
        )
    if triton is None:
        return attention_reference(q, k, v, qk_norm=qk_norm, eps=eps, scale=scale)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    sm = scale if scale is not None else d**-0.5
    bm, bn, warps, stages = block_sizes(d, qk_int8)
    bd = triton.next_power_of_2(d)
    o = torch.empty_like(q)
    if qk_int8:
        kn, _ = _prep(k, norm=qk_norm, quant=False, block=QUANT_GROUP, eps=eps, out_dtype=torch.float32)
        kmean = kn.mean(dim=2).reshape(b * h, d).contiguous()  # smoothing: softmax is invariant to it
        kq, ks = _prep(kn, norm=False, shift=kmean, quant=True, block=QUANT_GROUP, eps=eps)
        qq, qs = _prep(q, norm=qk_norm, mult=sm * LOG2E, quant=True, block=QUANT_GROUP, eps=eps)
        qa, ka, q_norm = qq, kq, False
    else:
        ka = _prep(k, norm=True, quant=False, block=QUANT_GROUP, eps=eps)[0] if qk_norm else k
        qa, qs, ks, q_norm = q, o, o, qk_norm
        if qk_norm and not q_norm_in_kernel(d):
            qa, q_norm = _prep(q, norm=True, quant=False, block=QUANT_GROUP, eps=eps)[0], False
    _attn_fwd[(triton.cdiv(nq, bm), b * h)](
        qa, ka, v, o, qs, ks,
        *qa.stride(), *ka.stride(), *v.stride(), *o.stride(),
        h, nq, nk, d, sm * LOG2E, eps,
        Q_NORM=q_norm, INT8=qk_int8, IEEE=q.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, QB=QUANT_GROUP, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return o


def attention_flops(b: int, h: int, n: int, d: int) -> float:
    return 4.0 * b * h * n * n * d


__all__ = ["attention", "attention_reference", "attention_flops", "block_sizes", "math"]
