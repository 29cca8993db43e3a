"""Text-to-image pipeline: tokenize, encode, denoise, decode; one stage resident at a time.

``Pipeline.load(path)`` accepts a diffusers AuraFlow folder / single file / cached hub id (torch
backend) or an engine folder built by ``auraflow-edge build`` (ONNX Runtime backend, no torch).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .image import to_pil
from .model_config import check_latent_size
from .schedule import flow_match_schedule
from .tokenizer import TextTokenizer

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


def initial_noise(seed: int, height: int, width: int, channels: int = 4) -> np.ndarray:
    """Documented generator: numpy PCG64 standard normal, float32, shape (1, C, H/8, W/8)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.standard_normal((1, channels, height // 8, width // 8), dtype=np.float32)


def check_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v < 16 or v % 16:
            raise UserError(f"{name} must be a positive multiple of 16, got {v}")


def load_noise(path: str | Path, height: int, width: int) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: noise file not found") from None
    except ValueError as e:
        raise UserError(f"{path}: not a plain .npy array ({e})") from None
    want = (1, 4, height // 8, width // 8)
    if a.shape != want:
        raise UserError(f"{path}: noise has shape {a.shape}, expected {want} for {width}x{height}")
    if not np.isfinite(a).all():
        raise UserError(f"{path}: noise contains non-finite values")
    return a.astype(np.float32)


@dataclass
class StageReport:
    name: str
    seconds: float
    peak_bytes: int | None = None


@dataclass
class Result:
    image: object  # PIL.Image
    latents: np.ndarray
    parameters: dict
    stages: list[StageReport] = field(default_factory=list)
    plan: object = None


class Pipeline:
    """Holds a stage factory (``text_encoder()``, ``transformer()``, ``vae()``) from one backend."""

    def __init__(self, stages, tokenizer: TextTokenizer, transformer_cfg, shift: float, info: dict):
        self.stages = stages
        self.tokenizer = tokenizer
        self.cfg = transformer_cfg
        self.shift = shift
        self.info = info

    @classmethod
    def load(
        cls,
        path: str | Path,
        backend: str = "auto",
        precision: str = "fp32",
        device: str = "cpu",
        components: str | Path | None = None,
        **backend_options,
    ) -> Pipeline:
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS[1:])}")
        p = Path(path)
        is_engine = (p / "manifest.json").is_file()
        if backend == "auto":
            backend = "onnxruntime" if is_engine else "torch"
        if backend in ("onnxruntime", "tensorrt"):
            if not is_engine:
                raise UserError(
                    f"{path}: the {backend} backend runs an engine folder; build one with "
                    f"`auraflow-edge build {path} -o ENGINE_DIR --backend {backend}`"
                )
            if backend == "onnxruntime":
                from .ort_backend import OrtStages

                stages = OrtStages(p, device=device, **backend_options)
            else:
                from .tensorrt_backend import TensorRTStages

                stages = TensorRTStages(p, **backend_options)
            tok = TextTokenizer(stages.tokenizer_dir)
            return cls(stages, tok, stages.cfg, stages.shift, {"backend": backend, **stages.describe()})
        if is_engine:
            raise UserError(f"{path}: an engine folder runs on --backend onnxruntime or tensorrt, not torch")
        from .torch_backend import TorchStages

        stages = TorchStages(
            path, precision=precision, device=device, components=components, **backend_options
        )
        tok = TextTokenizer(stages.mf.component("tokenizer"))
        return cls(stages, tok, stages.mf.transformer_cfg, stages.mf.scheduler_shift(), stages.describe())

    def __call__(self, prompt: str, **kw):
        return self.generate(prompt, **kw).image

    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        steps: int = 50,
        guidance: float = 3.5,
        seed: int = 0,
        height: int = 1024,
        width: int = 1024,
        noise: np.ndarray | str | Path | None = None,
        progress: bool | Callable[[int, int], None] = False,
        vram_budget: int | str | None = None,
        vae_tiles: int | None = None,
    ) -> Result:
        check_size(height, width)
        check_latent_size(self.cfg, height // 8, width // 8)
        if hasattr(self.stages, "check_shape"):
            self.stages.check_shape(height, width)
        if not isinstance(steps, int) or steps < 1:
            raise UserError(f"steps must be an integer >= 1, got {steps!r}")
        if not math.isfinite(guidance):
            raise UserError(f"guidance must be a finite number, got {guidance}")
        if noise is None:
            latents = initial_noise(seed, height, width)
        elif isinstance(noise, (str, Path)):
            latents = load_noise(noise, height, width)
        else:
            latents = np.asarray(noise, dtype=np.float32)
        schedule = flow_match_schedule(steps, self.shift)
        cfg_on = guidance > 1.0  # as diffusers: no unconditional pass at guidance <= 1
        plan = self.plan(height, width, vram_budget, batch=2 if cfg_on else 1, vae_tiles=vae_tiles)
        tiles = plan.vae_tiles
        reports = []

        t0 = time.perf_counter()
        with self.stages.stage("text_encoder") as enc:
            ctx = enc(*self.tokenizer(prompt))
            uctx = enc(*self.tokenizer(negative_prompt or "")) if cfg_on else None
        reports.append(StageReport("text_encoder", time.perf_counter() - t0, self.stages.last_peak))

        from .sampler import denoise

        cb = progress if callable(progress) else (_bar(steps) if progress else None)
        t0 = time.perf_counter()
        with self.stages.stage("transformer", height=height, width=width, batch=2 if cfg_on else 1) as tr:
            tr.prepare(schedule)
            latents = denoise(tr, latents, ctx, schedule, guidance, uctx, progress=cb)
        if cb is not None and hasattr(cb, "close"):
            cb.close()
        reports.append(StageReport("transformer", time.perf_counter() - t0, self.stages.last_peak))

        t0 = time.perf_counter()
        with self.stages.stage("vae", height=height, width=width) as vae:
            pixels = vae(latents, tiles=tiles)
        reports.append(StageReport("vae", time.perf_counter() - t0, self.stages.last_peak))
        params = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "steps": steps,
            "guidance": guidance,
            "seed": None if noise is not None else seed,
            "height": height,
            "width": width,
            "shift": self.shift,
            **self.info,
        }
        return Result(to_pil(pixels[0]), latents, params, reports, plan)

    def plan(self, height: int, width: int, vram_budget=None, batch: int = 2, vae_tiles: int | None = None):
        """The stage memory plan, before anything is loaded (refuses, with options, when nothing fits)."""
        from .planner import make_plan, parse_bytes

        free, baseline = self.stages.free_memory()
        budget = parse_bytes(vram_budget) if vram_budget is not None else free
        if vae_tiles is not None and vae_tiles < 1:
            raise UserError(f"--vae-tiles must be >= 1, got {vae_tiles}")
        return make_plan(self.stages.sizes(), height, width, budget, batch, baseline, vae_tiles)


class _bar:
    """Progress over sampling steps on stderr (tqdm)."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self.t = tqdm(total=total, desc="sampling", unit="step", file=sys.stderr)

    def __call__(self, i: int, n: int) -> None:
        self.t.update(1)

    def close(self) -> None:
        self.t.close()
