"""Quantized torch backend: weights quantized at load, linears swapped for 8-bit / 4-bit modules.

Quantization is a transformation of the weights plus a module swap, kept out of the model
definition. On CUDA with Triton the swapped modules run our kernels (W8A8 int8 or fp8 GEMMs
with per-token activation scales, SwiGLU fused into the first feed-forward GEMM, weight-only
int4, the fused qk-norm attention and the fused norm-modulate); elsewhere they run the reference
ops on dequantized weights with the same activation quantization, so the numerics match.
The timestep-only modulation is folded out: evaluated on the CPU in numpy, never on the device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..model import quant as qz
from ..model.checkpoint import ModelFolder
from ..model.config import check_latent_size
from ..model.spec import QUANT_PRECISIONS, keeps_float
from ..model.transformer import AuraFlowTransformer, FeedForward
from ..runtime.modulation import ModulationTable, modulation_names
from ..runtime.schedule import Schedule


def _kernels_ok(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _act_quant_ref(x: torch.Tensor, fmt: str):
    """Per-token activation quantization (reference), returning the dequantized activation."""
    from ...kernels.norm_modulate import quantize_rows_reference

    q, s = quantize_rows_reference(x, "fp8" if fmt == "fp8" else "int8")
    return q.float() * s[..., None]


def quantize_weight(w: torch.Tensor, fmt: str, block: int = 64):
    """The torch twin of engine/model/quant.py (same rounding: half to even), kept because it runs on
    w's device: quantizing a 6.86 B-parameter transformer at load on the GPU instead of in numpy on
    the CPU (tests/test_torch_quant.py holds the two equal).
    -> (w_q, w_s): int8 (N, K) + (N,); fp8 (N, K) + (N,); int4 packed (N, K/2) + (N, K/block)."""
    w = w.float()
    if fmt == "int4":
        n, k = w.shape
        wb = w.reshape(n, k // block, block)
        s = (wb.abs().amax(dim=2) / 7.0).clamp_min(1e-12)
        q = torch.round(wb / s[:, :, None]).clamp(-7, 7).to(torch.int8).reshape(n, k)
        from ...kernels.gemm import pack_int4_rows

        return pack_int4_rows(q), s
    qmax = qz.FP8_MAX if fmt == "fp8" else 127.0
    s = (w.abs().amax(dim=1) / qmax).clamp_min(1e-12)
    if fmt == "fp8":
        return (w / s[:, None]).clamp(-qz.FP8_MAX, qz.FP8_MAX).to(torch.float8_e4m3fn), s
    return torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8), s


class QuantizedLinear(nn.Module):
    """y = x @ dequant(W)^T; int8/fp8: W8A8 with per-token activation scales; int4: weight-only."""

    def __init__(
        self, fmt: str, w: torch.Tensor | None, dtype, use_kernels: bool, block: int = 64, packed=None
    ):
        """``w`` float (N, K), quantized here; or ``packed`` = (w_q, w_s) as quantize_weight made them
        (a torch engine folder), used as they are."""
        super().__init__()
        self.fmt, self.dtype, self.use_kernels, self.block = fmt, dtype, use_kernels, block
        w_q, w_s = quantize_weight(w, fmt, block) if packed is None else packed
        self.out_features = w_s.shape[0]
        self.in_features = w_q.shape[1] * (2 if fmt == "int4" else 1)
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_s", w_s.float().contiguous())

    def dequantized(self) -> torch.Tensor:
        from ...kernels.gemm import dequant_weight

        if self.fmt == "int4":
            return dequant_weight(self.w_q, self.w_s, self.block)
        return self.w_q.float() * self.w_s[:, None]

    def _quant_act(self, x2):
        from ...kernels.norm_modulate import quantize_rows

        return quantize_rows(x2, "fp8" if self.fmt == "fp8" else "int8")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.use_kernels:
            from ...kernels.gemm import scaled_mm, weight_only_mm

            if self.fmt == "int4":
                y = weight_only_mm(x2.to(self.dtype).contiguous(), self.w_q, self.w_s, self.block)
            else:
                a_q, a_s = self._quant_act(x2.to(self.dtype))
                y = scaled_mm(a_q, a_s, self.w_q, self.w_s, out_dtype=self.dtype)
        else:
            a = x2.float() if self.fmt == "int4" else _act_quant_ref(x2.float(), self.fmt)
            y = a @ self.dequantized().T
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class QuantizedFeedForward(nn.Module):
    """out(silu(l1 x) * l2 x) with the SwiGLU in the first GEMM's epilogue (W8A8)."""

    def __init__(self, l1: QuantizedLinear, l2: QuantizedLinear, out: QuantizedLinear):
        super().__init__()
        self.linear_1, self.linear_2, self.out_projection = l1, l2, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        l1 = self.linear_1
        # A LoRA branch on linear_1/linear_2 must add before the SwiGLU: then the unfused path runs.
        branched = hasattr(l1, "lora_branch") or hasattr(self.linear_2, "lora_branch")
        if l1.use_kernels and l1.fmt in ("int8", "fp8") and not branched:
            from ...kernels.gemm import scaled_mm

            shape = x.shape
            a_q, a_s = l1._quant_act(x.reshape(-1, shape[-1]).to(l1.dtype))
            h = scaled_mm(
                a_q, a_s, l1.w_q, l1.w_s, w2_q=self.linear_2.w_q, w2_s=self.linear_2.w_s, out_dtype=l1.dtype
            )
            return self.out_projection(h.reshape(*shape[:-1], -1)).to(x.dtype)
        return self.out_projection(F.silu(self.linear_1(x)) * self.linear_2(x))


def load_quantized_transformer(
    mf: ModelFolder, fmt: str, device: torch.device, dtype: torch.dtype, int4_block: int = 64
):
    """Meta-built model; every linear quantized tensor by tensor; modulation linears never loaded."""

    def weight(name: str) -> torch.Tensor:
        return torch.from_numpy(mf.weights.read(name).astype(np.float32)).to(device)

    return build_quantized_transformer(mf.transformer_cfg, fmt, device, dtype, weight, int4_block)


def build_quantized_transformer(
    cfg, fmt: str, device: torch.device, dtype: torch.dtype, weight, int4_block: int = 64, packed=None
):
    """``weight(name) -> tensor`` supplies each parameter (a checkpoint, or random weights for
    benchmarks); ``packed(module name) -> (fmt, w_q, w_s) | None`` linears already quantized."""
    if fmt not in QUANT_PRECISIONS:
        raise UserError(f"unknown quantized precision {fmt!r}")
    if fmt == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise UserError("fp8 needs an sm_89+ GPU (Ada, Hopper); use --precision int8 on this card")
    use_k = _kernels_ok(device)
    with torch.device("meta"):
        model = AuraFlowTransformer(cfg)
    folded = set(modulation_names(cfg)) | {
        n for n, _ in model.time_step_proj.named_parameters(prefix="time_step_proj")
    }
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, mod in linears.items():
        if name + ".weight" in folded:
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        pre = packed(name) if packed is not None else None
        if pre is not None:
            f, w_q, w_s = pre
            new = QuantizedLinear(f, None, dtype, use_k, int4_block, packed=(w_q.to(device), w_s.to(device)))
            _put(parent, attr, new)
            continue
        w = weight(name + ".weight")
        if keeps_float(name) or (fmt == "int4" and w.shape[1] % int4_block):
            new = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device=device, dtype=dtype)
            with torch.no_grad():
                new.weight.copy_(w)
                if mod.bias is not None:
                    new.bias.copy_(weight(name + ".bias"))
        else:
            new = QuantizedLinear(fmt, w, dtype, use_k, int4_block)
        del w
        _put(parent, attr, new)
    for n, p in list(model.named_parameters()):
        if p.is_meta and n not in folded:
            mod_name, _, pname = n.rpartition(".")
            t = weight(n).to(device, dtype)
            setattr(
                model.get_submodule(mod_name) if mod_name else model,
                pname,
                nn.Parameter(t, requires_grad=False),
            )
    _swap_feedforwards(model)
    if use_k:
        _install_kernels(model, qk_int8=fmt in ("int8", "fp8"))
    return model.eval()


def _swap_feedforwards(model: nn.Module) -> None:
    for name, m in list(model.named_modules()):
        if isinstance(m, FeedForward) and isinstance(m.linear_1, QuantizedLinear):
            parent_name, _, attr = name.rpartition(".")
            setattr(
                model.get_submodule(parent_name),
                attr,
                QuantizedFeedForward(m.linear_1, m.linear_2, m.out_projection),
            )


def _install_kernels(model: nn.Module, qk_int8: bool) -> None:
    from ...kernels.attention import attention
    from ...kernels.norm_modulate import norm_modulate

    def core(q, k, v, eps, scale):
        return attention(q, k, v, qk_norm=True, eps=eps, qk_int8=qk_int8, scale=scale)

    def nm(x, scale, shift, res=None, gate=None, eps=1e-5):
        return norm_modulate(
            x,
            scale.expand(x.shape[0], -1),
            shift.expand(x.shape[0], -1),
            res=res,
            gate=None if gate is None else gate.expand(x.shape[0], -1),
            eps=eps,
        )

    for m in model.modules():
        if hasattr(m, "core"):
            m.core = core
        if hasattr(m, "norm_modulate"):
            m.norm_modulate = nm


def _put(parent: nn.Module, attr: str, new: nn.Module) -> None:
    if isinstance(parent, nn.ModuleList):
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def _load_packed(mf, engine, fmt, device, dtype, int4_block):
    """A torch engine folder's transformer: linears as stored (quantized), the rest as float."""
    from ..model.safetensors_io import SafetensorsFile

    formats = engine.component("transformer")["formats"]
    sf = SafetensorsFile(engine.path(engine.component("transformer")["file"]))

    def tensor(key: str) -> torch.Tensor:
        a = sf.read(key)
        if a.dtype == qz.FP8:
            return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
        if a.dtype.kind == "V" or a.dtype == np.float16:  # bf16 / fp16 parameters: float32 until placed
            return torch.from_numpy(a.astype(np.float32))
        return torch.from_numpy(a.copy())  # int8 / uint8 / float32 as stored

    def weight(name: str) -> torch.Tensor:
        return tensor(name).float().to(device)

    def packed(name: str):
        return (formats[name], tensor(name + ".w_q"), tensor(name + ".w_s")) if name in formats else None

    return build_quantized_transformer(mf.transformer_cfg, fmt, device, dtype, weight, int4_block, packed)


class QuantTorchTransformer:
    """Callable ``(latents, context, step) -> velocity``; the modulation table comes from the CPU."""

    def __init__(
        self,
        mf: ModelFolder,
        fmt: str,
        device: torch.device,
        dtype: torch.dtype,
        int4_block: int = 64,
        engine=None,
    ):
        """``engine``: a torch engine folder's Manifest; its linears are loaded as quantized."""
        self.cfg = mf.transformer_cfg
        self.device, self.dtype = device, dtype
        if engine is None:
            self.model = load_quantized_transformer(mf, fmt, device, dtype, int4_block)
            self.table = ModulationTable(self.cfg, read=mf.weights.read)
        else:
            self.model = _load_packed(mf, engine, fmt, device, dtype, int4_block)
            self.table = ModulationTable(self.cfg, engine.path(engine.component("modulation")["file"]))
        self.mod: torch.Tensor | None = None

    def prepare(self, schedule: Schedule) -> None:
        # (steps, rows, hidden): 242 x 3072 floats per step for v0.3, kept on the CPU until used
        self.mod = torch.from_numpy(self.table(schedule.timesteps))

    @torch.no_grad()
    def __call__(self, latents: np.ndarray, context: np.ndarray, step: int) -> np.ndarray:
        check_latent_size(self.cfg, latents.shape[2], latents.shape[3])
        x = torch.from_numpy(latents).to(self.device, self.dtype)
        c = torch.from_numpy(context).to(self.device, self.dtype)
        m = self.mod[step : step + 1].to(self.device, self.dtype)
        return self.model(x, c, modulation=m).float().cpu().numpy()

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
