"""The tracer of each exported component: a weightless graph from the model definition, with the
names, shapes and dynamic dimensions of the one component spec (engine/model/spec.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine.model.config import AuraFlowConfig
from ..engine.model.safetensors_io import SafetensorsFile
from ..engine.model.spec import TEXT_ENCODER, TEXT_LENGTH, TRANSFORMER, VAE_DECODER, dims, torch_dtype


def trace_transformer(
    cfg: AuraFlowConfig,
    height: int,
    width: int,
    act_dtype: str = "fp32",
    attention_plugin: bool = False,
    dynamic_size: bool = True,
):
    """Weightless graph of the folded transformer: (latents, context, modulation, pos) -> velocity,
    batch 1-2 and every latent size the positional grid covers (``height``/``width``: trace sample).
    ``attention_plugin``: attention as one auraflow_edge.AuraFlowAttention node (TensorRT plugin)."""
    import torch

    from ..engine.model.transformer import AuraFlowTransformer
    from .onnx_export import trace

    class Folded(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, latents, context, modulation, pos):
            return self.m(latents, context, modulation=modulation, pos=pos)

    dt = torch_dtype(act_dtype)
    shapes = TRANSFORMER.shapes(dims(cfg, 2, height, width))
    with torch.device("meta"):
        model = Folded(AuraFlowTransformer(cfg)).to(dt).eval()
        # Modulation linears and the timestep MLP are folded out: they must not reach the graph.
        args = tuple(torch.zeros(shapes[n], dtype=dt) for n in TRANSFORMER.inputs)
    table = None
    if attention_plugin:
        from . import tensorrt_plugin

        tensorrt_plugin.install(model.m)
        table = tensorrt_plugin.translation_table()
    batch = torch.export.Dim("batch", min=1, max=2)
    if not dynamic_size:  # one size baked in (bench/runtime_use.py compares against it)
        dyn = {"latents": {0: batch}, "context": {0: batch}, "modulation": None, "pos": None}
        proto = trace(model, args, TRANSFORMER.input_names, TRANSFORMER.outputs, dyn, table)
        return proto, (lambda n: n[2:] if n.startswith("m.") else n)
    # patch rows / columns: any size the positional grid covers (sample size only for the trace)
    rows, cols = (torch.export.Dim(n, min=2, max=cfg.grid) for n in ("rows", "cols"))
    p = cfg.patch_size
    dyn = {
        "latents": {0: batch, 2: p * rows, 3: p * cols},
        "context": {0: batch},
        "modulation": None,
        "pos": {1: rows, 2: cols},
    }
    proto = trace(model, args, TRANSFORMER.input_names, TRANSFORMER.outputs, dyn, table)
    return proto, (lambda n: n[2:] if n.startswith("m.") else n)


def trace_text_encoder(folder: Path, act_dtype: str = "fp32"):
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    from .onnx_export import trace

    cfg = UMT5Config.from_pretrained(folder)

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = UMT5EncoderModel(cfg)

        def forward(self, input_ids, attention_mask):
            h = self.m(input_ids=input_ids, attention_mask=attention_mask)[0]
            return h * attention_mask[..., None].to(h.dtype)  # pad positions zeroed, as the pipeline does

    dt = torch_dtype(act_dtype)
    ids, mask = TEXT_ENCODER.shapes({"text": TEXT_LENGTH}).values()
    with torch.device("meta"):
        model = Enc().to(dt).eval()
        args = (torch.zeros(ids, dtype=torch.long), torch.ones(mask, dtype=torch.long))
    proto = trace(model, args, TEXT_ENCODER.input_names, TEXT_ENCODER.outputs)
    return proto, (lambda n: n[2:] if n.startswith("m.") else n)


def trace_vae_decoder(folder: Path):
    """latents already divided by the scaling factor -> image in [-1, 1]; fp32 (the SDXL VAE overflows in fp16)."""
    import torch
    from diffusers import AutoencoderKL

    from .onnx_export import trace

    cfg = AutoencoderKL.load_config(folder)

    class Dec(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = AutoencoderKL.from_config(cfg)

        def forward(self, latents):
            return self.m.decode(latents).sample

    with torch.device("meta"):
        model = Dec().eval()
        args = (torch.zeros(1, cfg["latent_channels"], 16, 24),)
    h, w = torch.export.Dim("h", min=2, max=512), torch.export.Dim("w", min=2, max=512)
    proto = trace(model, args, VAE_DECODER.input_names, VAE_DECODER.outputs, {"latents": {2: h, 3: w}})
    return proto, (lambda n: n[2:] if n.startswith("m.") else n)


class FolderReader:
    """Reads a component's safetensors by name (aliases for tied weights)."""

    def __init__(self, folder: Path, aliases: dict[str, str] | None = None):
        from ..engine.model.checkpoint import safetensors_files

        self.index: dict[str, SafetensorsFile] = {}
        for f in safetensors_files(folder):
            sf = SafetensorsFile(f)
            for k in sf.keys():
                self.index[k] = sf
        self.aliases = aliases or {}

    def __call__(self, name: str) -> np.ndarray:
        key = name if name in self.index else self.aliases.get(name, name)
        if key not in self.index:
            raise KeyError(name)
        return self.index[key].read(key)


def text_encoder_aliases() -> dict[str, str]:
    return {"encoder.embed_tokens.weight": "shared.weight", "shared.weight": "encoder.embed_tokens.weight"}
