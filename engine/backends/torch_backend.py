"""Torch backend: the reference stages (text encoder, transformer, VAE decoder) as numpy callables.

Each stage is loaded when needed and released with ``close()`` so the pipeline can run them one at
a time inside a memory budget. The transformer is built on the meta device and its weights are
assigned tensor by tensor from safetensors (never two copies of the model).
"""

from __future__ import annotations

import gc

import numpy as np
import torch

from ..errors import UserError
from ..model.checkpoint import ModelFolder, open_model
from ..model.config import check_latent_size
from ..model.safetensors_io import SafetensorsFile
from ..model.spec import FLOAT_PRECISIONS, QUANT_PRECISIONS, torch_dtype
from ..model.transformer import AuraFlowTransformer
from ..runtime.image import to_uint8
from ..runtime.schedule import Schedule
from ..runtime.stages import StageSet


def quiet_libraries() -> None:
    """transformers/diffusers log and draw bars on every load; our own progress is enough."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def torch_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda requested but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_transformer(mf: ModelFolder, dtype: torch.dtype, device: torch.device) -> AuraFlowTransformer:
    with torch.device("meta"):
        model = AuraFlowTransformer(mf.transformer_cfg)
    expected = dict(model.named_parameters())
    missing = [n for n in expected if n not in mf.weights.index]
    if missing:
        raise UserError(
            f"{mf.root}: transformer checkpoint is missing {len(missing)} tensors, e.g. {missing[0]}"
        )
    for name in expected:
        arr = mf.weights.read(name)
        if tuple(arr.shape) != tuple(expected[name].shape):
            raise UserError(
                f"{mf.root}: tensor {name} has shape {tuple(arr.shape)}, expected {tuple(expected[name].shape)}"
            )
        t = torch.from_numpy(np.array(arr.astype(np.float32) if arr.dtype.itemsize < 4 else arr))
        mod_name, _, pname = name.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        setattr(mod, pname, torch.nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
    return model.eval()


class TorchTransformer:
    """Callable ``(latents, context, step) -> velocity`` over numpy float32 arrays."""

    def __init__(self, mf: ModelFolder, precision: str = "fp32", device: str = "cpu", model=None):
        self.device = torch_device(device)
        self.dtype = torch_dtype(precision)
        self.cfg = mf.transformer_cfg
        self.model = model if model is not None else load_transformer(mf, self.dtype, self.device)
        self.timesteps: np.ndarray | None = None

    def prepare(self, schedule: Schedule) -> None:
        self.timesteps = schedule.timesteps

    @torch.no_grad()
    def __call__(self, latents: np.ndarray, context: np.ndarray, step: int) -> np.ndarray:
        check_latent_size(self.cfg, latents.shape[2], latents.shape[3])
        b = latents.shape[0]
        x = torch.from_numpy(latents).to(self.device, self.dtype)
        c = torch.from_numpy(context).to(self.device, self.dtype)
        # The reference pipeline casts t/1000 to the latent dtype before the sinusoid.
        t = torch.full((b,), float(self.timesteps[step]), dtype=self.dtype, device=self.device)
        out = self.model(x, c, timestep=t)
        return out.float().cpu().numpy()

    def close(self) -> None:
        self.model = None
        release(self.device)


class TorchTextEncoder:
    def __init__(self, folder, precision: str = "fp32", device: str = "cpu"):
        from transformers import UMT5EncoderModel

        quiet_libraries()
        self.device = torch_device(device)
        try:
            self.model = UMT5EncoderModel.from_pretrained(
                folder, torch_dtype=torch_dtype(precision), use_safetensors=True
            ).to(self.device)
        except OSError as e:
            raise UserError(f"{folder}: cannot load the text encoder ({str(e).splitlines()[0]})") from None
        self.model.eval()

    @torch.no_grad()
    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        i = torch.from_numpy(ids).to(self.device)
        m = torch.from_numpy(mask).to(self.device)
        out = self.model(input_ids=i, attention_mask=m)[0]
        out = out * m[..., None].to(out.dtype)
        return out.float().cpu().numpy()

    def close(self) -> None:
        self.model = None
        release(self.device)


class TorchVAEDecoder:
    def __init__(self, folder, precision: str = "fp32", device: str = "cpu"):
        from diffusers import AutoencoderKL

        quiet_libraries()
        self.device = torch_device(device)
        try:
            vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True)
        except OSError as e:
            raise UserError(f"{folder}: cannot load the VAE ({str(e).splitlines()[0]})") from None
        dtype = torch_dtype(precision)
        if vae.config.force_upcast:
            dtype = torch.float32  # the SDXL VAE overflows in fp16
        self.dtype = dtype
        self.scaling = float(vae.config.scaling_factor)
        self.model = vae.to(self.device, dtype).eval()

    @torch.no_grad()
    def decode_raw(self, latents: np.ndarray) -> np.ndarray:
        """Latents already divided by the scaling factor -> decoder output in [-1, 1] (float32)."""
        z = torch.from_numpy(np.ascontiguousarray(latents)).to(self.device, self.dtype)
        return self.model.decode(z).sample.float().cpu().numpy()

    def __call__(self, latents: np.ndarray, tiles: int = 1) -> np.ndarray:
        from ..runtime.vae_tiling import decode_tiled

        return to_uint8(decode_tiled(self.decode_raw, latents / np.float32(self.scaling), tiles))

    def close(self) -> None:
        self.model = None
        release(self.device)


def _torch_engine(path):
    from pathlib import Path

    from ..runtime.manifest import MANIFEST, Manifest

    if not (Path(path) / MANIFEST).is_file():
        return None
    m = Manifest.load(path)
    if m["backend"] != "torch":
        raise UserError(f"{path}: engine was built for {m['backend']}; run it with --backend {m['backend']}")
    return m


def _engine_model(m) -> ModelFolder:
    """A torch engine folder seen as a model folder: its transformer file (linears pre-quantized)
    and its copied text encoder, VAE, tokenizer and scheduler."""
    from ..model.checkpoint import WeightSource
    from ..model.config import AuraFlowConfig

    f = m.path(m.component("transformer")["file"])
    sf = SafetensorsFile(f)
    src = WeightSource(files={str(f): sf}, index={k: (str(f), k, False) for k in sf.keys()})
    return ModelFolder(m.folder, AuraFlowConfig(**m["transformer_config"]), src, m.folder)


class TorchStages(StageSet):
    def __init__(
        self,
        path,
        precision: str = "fp32",
        device: str = "cpu",
        components=None,
        keep_resident=False,
        loras=None,
        vram_budget=None,
    ):
        super().__init__()
        if precision not in FLOAT_PRECISIONS and precision not in ("int8", "fp8", "int4", "auto"):
            raise UserError(
                f"unknown precision {precision!r}; choose auto, fp32, bf16, fp16, int8, fp8 or int4"
            )
        self.engine = _torch_engine(path)  # a folder from `build --backend torch`, or None
        if self.engine is not None:
            built = self.engine["precision"]
            if precision not in ("auto", built):
                raise UserError(f"{path}: a {built} engine (its precision is fixed when it is built)")
            if loras:
                raise UserError(
                    f"{path}: LoRAs on a torch engine folder are not supported; run the checkpoint "
                    "with --lora, or build an ONNX Runtime / TensorRT engine with --lora"
                )
            precision = built
            self.mf = _engine_model(self.engine)
        else:
            self.mf = open_model(path, components)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device_name = device
        self.device = torch_device(device)
        self.auto_reason = None
        if precision == "auto":
            precision, self.auto_reason = self._auto_precision(vram_budget)
        self.precision = precision
        self.keep_resident = keep_resident
        self.cfg, self.shift = self.mf.transformer_cfg, self.mf.scheduler_shift()
        self.tokenizer_dir = self.mf.component("tokenizer")
        self._validate()
        self.set_loras(loras)

    def set_loras(self, loras) -> None:
        """[(file, scale)]: read and checked now; a resident transformer switches in place (its
        base weights are neither re-read nor re-quantized), otherwise it gets them when opened."""
        from ..model.lora import attach, load_loras

        if loras and self.engine is not None:
            raise UserError(
                f"{self.engine.folder}: a torch engine folder takes no LoRAs; run the checkpoint with --lora"
            )
        self.loras = load_loras(loras, self.mf)
        if "transformer" in self._resident:
            attach(self._resident["transformer"], self.loras, self.mf.weights.read)

    def _auto_precision(self, vram_budget) -> tuple[str, str]:
        from ..runtime.planner import auto_precision, parse_bytes

        cap = budget = None
        if self.device.type == "cuda":
            cap = torch.cuda.get_device_capability(self.device)
            budget = parse_bytes(vram_budget) if vram_budget else torch.cuda.mem_get_info(self.device)[0]
        h, w = self.mf.default_size()
        return auto_precision(self.mf, self.device.type, budget, h, w, cap)

    def _validate(self) -> None:
        """Fail before any compute: every component present, every weight file complete."""
        for comp in ("tokenizer", "text_encoder", "vae"):
            folder = self.mf.component(comp)
            if comp != "tokenizer":
                if not (folder / "config.json").is_file():
                    raise UserError(f"{folder}: missing config.json")
                for f in folder.glob("*.safetensors"):
                    SafetensorsFile(f)

    @property
    def float_precision(self) -> str:
        """Activation precision of the float stages: bf16 on a GPU for quantized runs, else fp32."""
        if self.precision in FLOAT_PRECISIONS:
            return self.precision
        return "bf16" if self.device.type == "cuda" else "fp32"

    def _open(self, name: str, **shape):
        fp = self.float_precision
        if name == "text_encoder":
            # UMT5 overflows in fp16 activations: fp16 runs use bf16 text encoding on GPU, fp32 on CPU.
            te = "fp32" if fp == "fp16" and self.device.type != "cuda" else ("bf16" if fp == "fp16" else fp)
            return TorchTextEncoder(self.mf.component("text_encoder"), te, self.device_name)
        if name == "transformer":
            from ..model.lora import attach, merged_model

            if self.precision in FLOAT_PRECISIONS:
                # float weights: the LoRAs merge in float32 as the weights load (no cost per step)
                tr = TorchTransformer(merged_model(self.mf, self.loras), self.precision, self.device_name)
                tr.lora_merged = self.loras
            else:
                from .torch_quant import QuantTorchTransformer

                block = self.engine["int4_block"] if self.engine is not None else 64
                tr = QuantTorchTransformer(
                    self.mf, self.precision, self.device, torch_dtype(fp), block, engine=self.engine
                )
            if self.engine is None:  # an engine folder takes no LoRA (refused above)
                attach(tr, self.loras, self.mf.weights.read)
            return tr
        return TorchVAEDecoder(self.mf.component("vae"), fp, self.device_name)

    def _device_peak_reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _device_peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def default_size(self) -> tuple[int, int]:
        return self.mf.default_size()

    def describe(self) -> dict:
        from .cpu import native_bf16

        d = {"backend": "torch", "precision": self.precision, "device": self.device_name}
        if self.auto_reason:
            d["auto"] = self.auto_reason
        if self.device.type == "cpu" and self.precision in QUANT_PRECISIONS:
            # the torch path dequantizes every weight on every call on the CPU (no CPU 8-bit kernels)
            d["hint"] = (
                f"hint: {self.precision} on the torch backend is slow on the CPU; an ONNX Runtime engine "
                f"runs 8-bit matmuls natively: auraflow-edge build MODEL -o ENGINE --precision {self.precision}"
            )
        elif self.device.type == "cpu" and self.precision == "fp32" and native_bf16():
            # mid-size model, 512x512, AMX Xeon: 0.59 vs 1.86 s/step, image 46.7 dB from fp32's
            d["hint"] = "hint: this CPU multiplies bf16 natively: --precision bf16 is about 3x faster"
        return d | ({"loras": self.loras.records()} if self.loras else {})

    def sizes(self):
        from ..runtime.planner import sizes_from_model

        held = self.engine.component("transformer")["weight_bytes"] if self.engine is not None else None
        return sizes_from_model(self.mf, self.precision, self.device.type, transformer_bytes=held)

    def free_memory(self) -> tuple[int, int]:
        """(budget default: what the device has free, baseline already in use)."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return free, torch.cuda.memory_allocated(self.device)
        from ..runtime.stages import available_ram, current_rss

        return available_ram() + current_rss(), current_rss()
