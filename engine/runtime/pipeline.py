"""Text-to-image pipeline: tokenize, encode, denoise, decode; one stage resident at a time.

``Pipeline.load(path)`` accepts a diffusers AuraFlow folder / single file / hub id (torch
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

from ..errors import UserError
from ..model.config import check_latent_size, check_size
from .image import to_pil
from .noise import initial_noise, load_noise
from .schedule import flow_match_schedule
from .tokenizer import TextTokenizer

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


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


def check_jobs(prompts: list[str], num_images: int, noise: bool) -> None:
    """What a request for images must satisfy before anything loads (the CLI asks early too)."""
    if not prompts:
        raise UserError("no prompt given")
    if not isinstance(num_images, int) or num_images < 1:
        raise UserError(f"number of images must be an integer >= 1, got {num_images!r}")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise UserError("empty prompt: describe the image to draw")
    if noise and len(prompts) * num_images > 1:
        raise UserError("--noise sets the latents of one image; use --seed for several")


def _engine_backend(folder: Path) -> str:
    from .manifest import Manifest

    return Manifest.load(folder)["backend"]


def _engine_precision(folder: Path) -> str:
    from .manifest import Manifest

    return Manifest.load(folder)["precision"]


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
        precision: str = "auto",
        device: str = "auto",
        components: str | Path | None = None,
        loras=None,
        revision: str | None = None,
        progress: bool = True,
        **backend_options,
    ) -> Pipeline:
        if backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS[1:])}")
        from ..model.checkpoint import resolve_model

        path = resolve_model(path, revision, progress)  # a hub id: found in or fetched into the HF cache
        p = Path(path)
        is_engine = (p / "manifest.json").is_file()
        if backend == "auto":  # an engine folder runs on the backend it was built for
            backend = _engine_backend(p) if is_engine else "torch"
        if backend in ("onnxruntime", "tensorrt"):
            if not is_engine:
                raise UserError(
                    f"{path}: the {backend} backend runs an engine folder; build one with "
                    f"`auraflow-edge build {path} -o ENGINE_DIR --backend {backend}`"
                )
            if loras:
                raise UserError(
                    f"{path}: an engine folder has its LoRAs merged at build time; build it with "
                    "`auraflow-edge build MODEL ... --lora FILE[:SCALE]` (TensorRT: `auraflow-edge refit`)"
                )
            if components is not None:
                raise UserError(
                    f"{path}: an engine folder holds its components; --components is for single files"
                )
            built = _engine_precision(p)
            if precision not in ("auto", built):
                raise UserError(f"{path}: a {built} engine (its precision is fixed when it is built)")
            if backend == "onnxruntime":
                from ..backends.ort_backend import OrtStages

                stages = OrtStages(p, device=device, **backend_options)
            else:
                from ..backends.tensorrt_backend import TensorRTStages

                stages = TensorRTStages(p, **backend_options)
            info = {"backend": backend, **stages.describe()}
        else:
            from ..backends.torch_backend import TorchStages

            stages = TorchStages(
                path,
                precision=precision,
                device=device,
                components=components,
                loras=loras,
                **backend_options,
            )
            info = stages.describe()
        return cls(stages, TextTokenizer(stages.tokenizer_dir), stages.cfg, stages.shift, info)

    def set_loras(self, loras) -> None:
        """Switch LoRAs ([(file, scale)]; [] removes them) without reloading the base weights (torch)."""
        self.stages.set_loras(loras)
        self.info = {k: v for k, v in self.info.items() if k != "loras"} | self.stages.describe()

    def __call__(self, prompt: str, **kw):
        return self.generate(prompt, **kw).image

    def default_size(self) -> tuple[int, int]:
        """The checkpoint's own image size, as diffusers picks it (sample_size x VAE scale factor)."""
        return tuple(self.stages.default_size())

    def generate(self, prompt: str, **kw) -> Result:
        """One image; the keywords of ``generate_many`` (a ``noise`` array or .npy path allowed)."""
        return self.generate_many([prompt], **kw)[0]

    def generate_many(
        self,
        prompts: str | list[str],
        negative_prompt: str = "",
        steps: int = 50,
        guidance: float = 3.5,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        noise: np.ndarray | str | Path | None = None,
        progress: bool | Callable[[int, int], None] = False,
        vram_budget: int | str | None = None,
        vae_tiles: int | None = None,
        num_images: int = 1,
        announce: Callable[[str], None] | None = None,
        seeds: list[int] | None = None,
    ) -> list[Result]:
        """``num_images`` per prompt, seeds ``seed, seed + 1, ...`` in order. Each stage runs for
        every image before the next loads: the text encoder once for all prompts, the transformer
        over all latents, then the VAE. ``announce(line)``: told the backend, precision and device
        (and why, where they were "auto") once the arguments are checked, before any stage loads.
        ``seeds``: one seed per image instead of ``seed + i`` (the server batches requests of
        different seeds into one call)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_jobs(prompts, num_images, noise is not None)
        jobs = [p for p in prompts for _ in range(num_images)]
        if seeds is None:
            seeds = [seed + i for i in range(len(jobs))]
        elif len(seeds) != len(jobs) or noise is not None:
            raise UserError(
                f"{len(seeds)} seeds for {len(jobs)} images"
                + (" and a noise array" if noise is not None else "")
            )
        dh, dw = self.default_size()
        height, width = height or dh, width or dw
        check_size(height, width)
        check_latent_size(self.cfg, height // 8, width // 8)
        self.stages.check_shape(height, width)
        if not isinstance(steps, int) or steps < 1:
            raise UserError(f"steps must be an integer >= 1, got {steps!r}")
        if not math.isfinite(guidance):
            raise UserError(f"guidance must be a finite number, got {guidance}")
        if noise is None:
            latents = [initial_noise(s, height, width) for s in seeds]
        elif isinstance(noise, (str, Path)):
            latents = [load_noise(noise, height, width)]
        else:
            latents = [np.asarray(noise, dtype=np.float32)]
        schedule = flow_match_schedule(steps, self.shift)
        cfg_on = guidance > 1.0  # as diffusers: no unconditional pass at guidance <= 1
        plan = self.plan(height, width, vram_budget, batch=2 if cfg_on else 1, vae_tiles=vae_tiles)
        if announce is not None:  # every check passed; nothing is loaded yet
            for line in ("auto", "hint"):  # why "auto" chose what it chose; a faster way, if any
                if line in self.info:
                    announce(self.info[line])
            i = self.info
            announce(f"{i.get('backend')} backend, {i.get('precision')}, {i.get('device')}, {width}x{height}")
        reports = []

        t0 = time.perf_counter()
        with self.stages.stage("text_encoder") as enc:
            texts = list(dict.fromkeys(jobs + ([negative_prompt or ""] if cfg_on else [])))
            ctx = {t: enc(*self.tokenizer(t)) for t in texts}
        reports.append(StageReport("text_encoder", time.perf_counter() - t0, self.stages.last_peak))

        from .sampler import denoise

        total = steps * len(jobs)
        bar = _bar(total) if progress and not callable(progress) else None
        cb = progress if callable(progress) else bar
        t0 = time.perf_counter()
        with self.stages.stage("transformer", height=height, width=width, batch=2 if cfg_on else 1) as tr:
            tr.prepare(schedule)
            for i, p in enumerate(jobs):
                step_cb = None if cb is None else (lambda k, n, i=i: cb(i * steps + k, total))
                uctx = ctx[negative_prompt or ""] if cfg_on else None
                latents[i] = denoise(tr, latents[i], ctx[p], schedule, guidance, uctx, progress=step_cb)
        if bar is not None:
            bar.close()
        reports.append(StageReport("transformer", time.perf_counter() - t0, self.stages.last_peak))

        t0 = time.perf_counter()
        with self.stages.stage("vae", height=height, width=width) as vae:
            pixels = [vae(x, tiles=plan.vae_tiles) for x in latents]
        reports.append(StageReport("vae", time.perf_counter() - t0, self.stages.last_peak))
        out = []
        for i, p in enumerate(jobs):
            params = {
                "prompt": p,
                "negative_prompt": negative_prompt,
                "steps": steps,
                "guidance": guidance,
                "seed": None if noise is not None else seeds[i],
                "height": height,
                "width": width,
                "shift": self.shift,
                **{k: v for k, v in self.info.items() if k not in ("auto", "hint")},  # lines, not parameters
            }
            out.append(Result(to_pil(pixels[i][0]), latents[i], params, reports, plan))
        return out

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
