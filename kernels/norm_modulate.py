"""Fused residual + LayerNorm + modulation (+ per-token quantization) for AuraFlow's blocks.

    residual form: y = LN(res + gate * x) * (1 + scale) + shift
    plain form:    y = LN(x) * (1 + scale) + shift

LN is fp32, no affine. ``scale``, ``shift``, ``gate`` are per batch item (B, D) and broadcast
over its tokens. With ``quant="int8"|"fp8"`` the output is quantized per token (one scale per
row: amax/127 or amax/448), ready for the next W8A8 GEMM; ``quantize_rows`` does only that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

QMAX = {"int8": 127.0, "fp8": 448.0}


def norm_modulate_reference(
    x, scale, shift, *, res=None, gate=None, eps: float = 1e-5, quant: str | None = None
):
    """x (B, N, D); scale/shift/gate (B, D). Returns y, or (q, row_scales) when quantizing."""
    h = x if res is None else res + gate[:, None] * x
    y = (
        F.layer_norm(h.float(), (h.shape[-1],), eps=eps) * (1 + scale[:, None].float())
        + shift[:, None].float()
    )
    if quant is None:
        return y.to(x.dtype)
    return quantize_rows_reference(y, quant)


def quantize_rows_reference(y, quant: str):
    yf = y.float().reshape(-1, y.shape[-1])
    s = (yf.abs().amax(dim=1) / QMAX[quant]).clamp_min(1e-12)
    if quant == "int8":
        q = torch.round(yf / s[:, None]).clamp(-127, 127).to(torch.int8)
    else:
        q = (yf / s[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.reshape(y.shape), s.reshape(y.shape[:-1])


if triton is not None:

    @triton.jit
    def _norm_mod(
        X, RES, GATE, SCALE, SHIFT, Y, YS,
        N, D, eps,
        HAS_RES: tl.constexpr, QUANT: tl.constexpr, NORM: tl.constexpr, QMAX_: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One program per token row; QUANT: 0 none, 1 int8, 2 fp8."""
        row = tl.program_id(0)
        b = row // N
        cols = tl.arange(0, BLOCK_D)
        m = cols < D
        x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            g = tl.load(GATE + b * D + cols, mask=m, other=0.0).to(tl.float32)
            x = tl.load(RES + row * D + cols, mask=m, other=0.0).to(tl.float32) + g * x
        if NORM:
            mean = tl.sum(x, axis=0) / D
            xc = tl.where(m, x - mean, 0.0)
            var = tl.sum(xc * xc, axis=0) / D
            x = xc / tl.sqrt(var + eps)
        sc = tl.load(SCALE + b * D + cols, mask=m, other=0.0).to(tl.float32)
        sh = tl.load(SHIFT + b * D + cols, mask=m, other=0.0).to(tl.float32)
        y = x * (1.0 + sc) + sh
        if QUANT == 0:
            tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=m)
        else:
            s = tl.maximum(tl.max(tl.where(m, tl.abs(y), 0.0), axis=0) / QMAX_, 1e-12)
            v = y / s
            if QUANT == 1:
                v = tl.where(v >= 0, v + 0.5, v - 0.5).to(tl.int32)
                v = tl.minimum(tl.maximum(v, -127), 127)
            else:
                v = tl.minimum(tl.maximum(v, -448.0), 448.0)
            tl.store(Y + row * D + cols, v.to(Y.dtype.element_ty), mask=m)
            tl.store(YS + row, s)


def _launch(x, scale, shift, res, gate, eps, quant, norm):
    if triton is None or not (x.is_cuda or _interpreting()):
        if not norm:
            return quantize_rows_reference(x, quant)
        return norm_modulate_reference(x, scale, shift, res=res, gate=gate, eps=eps, quant=quant)
    b, n, d = x.shape
    x = x.contiguous()
    qdt = {None: x.dtype, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[quant]
    y = torch.empty((b, n, d), device=x.device, dtype=qdt)
    ys = torch.empty((b, n), device=x.device, dtype=torch.float32)
    dummy = scale if scale is not None else ys
    _norm_mod[(b * n,)](
        x, res.contiguous() if res is not None else x, gate if gate is not None else dummy,
        scale if scale is not None else dummy, shift if shift is not None else dummy, y, ys,
        n, d, eps,
        HAS_RES=res is not None, QUANT={None: 0, "int8": 1, "fp8": 2}[quant], NORM=norm,
        QMAX_=QMAX.get(quant, 1.0), BLOCK_D=triton.next_power_of_2(d),
    )  # fmt: skip
    return y if quant is None else (y, ys)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def norm_modulate(x, scale, shift, *, res=None, gate=None, eps: float = 1e-5, quant: str | None = None):
    """x (B, N, D) fp16/bf16/fp32; scale/shift/gate (B, D). See the module docstring."""
    if (res is None) != (gate is None):
        raise ValueError("res and gate go together")
    return _launch(
        x,
        scale.contiguous(),
        shift.contiguous(),
        res,
        None if gate is None else gate.contiguous(),
        eps,
        quant,
        True,
    )


def quantize_rows(x, quant: str = "int8"):
    """Per-token quantization of (B, N, D) (or (M, D)) -> (q, row scales)."""
    x3 = x.reshape(1, -1, x.shape[-1]) if x.dim() == 2 else x
    z = torch.zeros(x3.shape[0], x3.shape[-1], device=x.device, dtype=torch.float32)
    q, s = _launch(x3, z, z, None, None, 0.0, quant, False)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])
