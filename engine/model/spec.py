"""One description of each exported component, read by export, the engine builders, every runtime
and the planner: tensor names, their shapes by named dimension, which dimensions vary, the text
length, which linears stay float, and the name of each float precision's dtype.

Shapes are written with dimension names; ``dims(...)`` gives the names their values for a model
config, batch and image size, so a TensorRT profile, an ONNX Runtime feed and a trace sample are
all the same shapes, never retyped.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .config import AuraFlowConfig

# Tokens the text encoder sees (padded / truncated), as diffusers' AuraFlowPipeline max_sequence_length.
TEXT_LENGTH = 256
# Linears kept in high precision in every quantized build: the patch embedding (K = 16) and the final
# projection (N = 16) are tiny and sit at the ends of the network, where their error is not averaged away.
KEEP_FLOAT = ("pos_embed.proj", "proj_out")
QUANT_PRECISIONS = ("int8", "fp8", "int4")
FLOAT_PRECISIONS = ("fp32", "fp16", "bf16")
NUMPY_DTYPES = {
    "fp32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "bf16": np.dtype(ml_dtypes.bfloat16),
}
# dimensions an engine may leave open (everything else is fixed by the model config)
DYNAMIC_DIMS = ("batch", "latent_h", "latent_w", "rows", "cols")


def keeps_float(weight_name: str) -> bool:
    return any(k in weight_name for k in KEEP_FLOAT)


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def dims(
    cfg: AuraFlowConfig, batch: int, height: int, width: int, latent_channels: int | None = None
) -> dict:
    """Values of the named dimensions for a batch of ``height`` x ``width`` px images."""
    return {
        "batch": batch,
        "channels": cfg.in_channels,
        "latent_channels": cfg.in_channels if latent_channels is None else latent_channels,
        "latent_h": height // 8,
        "latent_w": width // 8,
        "rows": height // (8 * cfg.patch_size),  # positional crop: one row per patch row
        "cols": width // (8 * cfg.patch_size),
        "text": TEXT_LENGTH,
        "joint": cfg.joint_attention_dim,
        "modulations": cfg.num_modulations,
        "hidden": cfg.hidden,
    }


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: dict  # input name -> shape as a tuple of dimension names or ints
    outputs: tuple[str, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    def shapes(self, values: dict) -> dict[str, tuple[int, ...]]:
        return {n: tuple(values[d] if isinstance(d, str) else d for d in s) for n, s in self.inputs.items()}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """{input: {axis: dim name}} for the axes that may vary."""
        out = {}
        for n, s in self.inputs.items():
            axes = {i: d for i, d in enumerate(s) if d in DYNAMIC_DIMS}
            if axes:
                out[n] = axes
        return out

    def feed(self, *arrays) -> dict:
        """Arrays in input order -> {name: array}."""
        if len(arrays) != len(self.inputs):
            raise ValueError(f"{self.name} takes {len(self.inputs)} inputs, got {len(arrays)}")
        return dict(zip(self.inputs, arrays))


# The folded transformer: modulation is the per-step table (timestep MLP and modulation linears folded
# out), pos the positional crop for the image size, so no size is baked into the graph.
TRANSFORMER = ComponentSpec(
    "transformer",
    {
        "latents": ("batch", "channels", "latent_h", "latent_w"),
        "context": ("batch", "text", "joint"),
        "modulation": (1, "modulations", "hidden"),
        "pos": (1, "rows", "cols", "hidden"),
    },
    ("velocity",),
)
TEXT_ENCODER = ComponentSpec(
    "text_encoder", {"input_ids": (1, "text"), "attention_mask": (1, "text")}, ("hidden_states",)
)
# latents already divided by the VAE scaling factor -> image in [-1, 1]
VAE_DECODER = ComponentSpec(
    "vae_decoder", {"latents": (1, "latent_channels", "latent_h", "latent_w")}, ("image",)
)
COMPONENTS = {c.name: c for c in (TRANSFORMER, TEXT_ENCODER, VAE_DECODER)}
