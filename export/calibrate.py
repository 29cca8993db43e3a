"""Activation calibration for W8A8 (SmoothQuant-style), from a few prompts through the torch model.

For every quantized linear we record the per-input-channel max |x| over all tokens, steps and
prompts. At export, smoothing moves activation outliers into the weights,
``s_j = amax_x[j]**alpha / amax_w[j]**(1 - alpha)``, ``x' = x / s``, ``W' = W * s``, and the
activation gets one static quantization scale, ``max_j(amax_x[j] / s_j) / qmax``, emitted as a
QuantizeLinear/DequantizeLinear pair in front of the weight's DequantizeLinear (TensorRT fuses
such pairs into int8/fp8 GEMMs; ONNX Runtime runs them too).
"""

from __future__ import annotations

import numpy as np

CALIBRATION_PROMPTS = [
    "a photo of a cat sitting on a red sofa",
    "an astronaut riding a horse on the moon, highly detailed",
    "a watercolor painting of mountains at sunrise",
    "close-up portrait of an old fisherman, dramatic light",
    "a bowl of ramen with chopsticks, studio photography",
    "cyberpunk city street at night in the rain, neon signs",
    "a minimalist logo of a fox, flat vector",
    "an oil painting of a sailing ship in a storm",
]


def smoothing(amax_x: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """Per-input-channel smoothing factors s (x / s, W * s); w is (out, in)."""
    amax_w = np.abs(w).max(axis=0).astype(np.float64)
    s = np.power(np.maximum(amax_x, 1e-5), alpha) / np.power(np.maximum(amax_w, 1e-5), 1 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def calibrate(
    mf,
    prompts: list[str],
    steps: int = 4,
    height: int = 512,
    width: int = 512,
    device: str = "cpu",
    guidance: float = 3.5,
) -> dict[str, np.ndarray]:
    """Run the fp32 torch pipeline on ``prompts``; per linear weight name: amax over input channels."""
    import torch

    from ..engine.backends.torch_backend import TorchTextEncoder, TorchTransformer
    from ..engine.runtime.modulation import modulation_names
    from ..engine.runtime.noise import initial_noise
    from ..engine.runtime.sampler import denoise
    from ..engine.runtime.schedule import flow_match_schedule
    from ..engine.runtime.tokenizer import TextTokenizer

    tr = TorchTransformer(mf, "fp32", device)
    skip = set(modulation_names(mf.transformer_cfg))
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in tr.model.named_modules():
        if (
            isinstance(m, torch.nn.Linear)
            and name + ".weight" not in skip
            and not name.startswith("time_step_proj")
        ):

            def hook(mod, inp, name=name):
                a = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(dim=0).float().cpu()
                stats[name + ".weight"] = (
                    torch.maximum(stats[name + ".weight"], a) if name + ".weight" in stats else a
                )

            hooks.append(m.register_forward_pre_hook(hook))
    tok = TextTokenizer(mf.component("tokenizer"))
    enc = TorchTextEncoder(mf.component("text_encoder"), "fp32", device)
    sched = flow_match_schedule(steps, mf.scheduler_shift())
    tr.prepare(sched)
    uncond = enc(*tok(""))
    for i, p in enumerate(prompts):
        ctx = enc(*tok(p))
        denoise(tr, initial_noise(i, height, width), ctx, sched, guidance, uncond)
    for h in hooks:
        h.remove()
    enc.close()
    tr.close()
    return {k: v.numpy() for k, v in stats.items()}
