"""Full-size AuraFlow v0.3 (random weights) at 1024x1024 with CFG on one GPU, under an 8 GiB cap.

    python3 bench/gpu_fullsize.py --json OUT/gpu_fullsize.json [--steps 2]

Stages run one at a time, each loaded, run and freed, with the same noise and text context:
  text encoder  UMT5 with the Pile-T5-XL encoder's shapes, bf16, capped: the [uncond, cond] context
  transformer   ours bf16 (the engine's TorchTransformer) and diffusers' AuraFlowTransformer2DModel
                bf16, both uncapped; ours int8 and fp8 (sm_89+; the engine's QuantTorchTransformer:
                our kernels, modulation evaluated on the CPU) capped. One warm-up call, then
                ``--steps`` Euler steps; the time of each transformer call is recorded.
  VAE decode    the SDXL VAE's shapes, fp32, capped: every run's final latents to an image.
Every run gets identical weights (random, seeded by tensor name); fidelity is the final latents'
relative L2 and the image PSNR against our bf16 run.

Memory per stage. The cap is torch.cuda.set_per_process_memory_fraction, which limits torch's caching
allocator only. So each stage reports torch's ``max_memory_allocated`` and ``max_memory_reserved``,
and at device level (torch.cuda.mem_get_info, sampled every 5 ms): ``device_drop``, free memory at
the stage's start minus its lowest point, and ``device_used_peak``, total minus that lowest point,
which includes the CUDA context, Triton's modules and anything else outside the allocator (and any
other process on the GPU: the check's log shows nvidia-smi's memory.used before it starts). The
7.5 GiB target is checked against ``device_used_peak``, the figure an 8 GiB card would see.
Targets: every stage of an int8/fp8 run <= 7.5 GiB there; per step <= 0.6x diffusers bf16.
The JSON is rewritten after every stage. ``--size small --device cpu`` runs the same code on a
tiny model (the CPU test suite does).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from auraflow_edge.bench.gpu_report import Report, error_text, machine_info
from auraflow_edge.engine.model.config import AURAFLOW_V03, AuraFlowConfig
from auraflow_edge.engine.model.spec import TEXT_LENGTH
from auraflow_edge.engine.model.transformer import AuraFlowTransformer
from auraflow_edge.engine.runtime.image import to_uint8
from auraflow_edge.engine.runtime.sampler import denoise
from auraflow_edge.engine.runtime.schedule import flow_match_schedule
from auraflow_edge.engine.runtime.vae_tiling import decode_tiled

GiB = 2**30
SIZES = {
    "full": dict(
        transformer=AURAFLOW_V03,
        text=dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    ),
    "small": dict(
        transformer=AuraFlowConfig(
            num_attention_heads=2,
            attention_head_dim=32,
            num_mmdit_layers=1,
            num_single_dit_layers=2,
            joint_attention_dim=48,
            caption_projection_dim=64,
            pos_embed_max_size=256,
        ),
        text=dict(vocab_size=300, d_model=48, d_kv=12, d_ff=96, num_layers=2, num_heads=4),
        vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
    ),
}
RUNS = ("ours bf16", "diffusers bf16", "ours int8", "ours fp8")


def capped(stage: str) -> bool:
    """The stages of our low-memory run: text encoder, our quantized transformers, VAE decode."""
    return stage.startswith(("text_encoder", "vae_decode")) or stage in ("ours int8", "ours fp8")


# ---- identical random weights for every model ----


def make_weight(name: str, shape, dtype, device) -> torch.Tensor:
    """The tensor ``name`` of every run: normal with std 1/sqrt(fan_in), seeded by the name; 1-D
    weights (norm scales) 1, biases 0. The same call gives the same values on the same device."""
    if len(shape) == 1:
        return torch.full(tuple(shape), 0.0 if name.endswith("bias") else 1.0, dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()))
    std = math.prod(shape[1:]) ** -0.5
    return torch.empty(tuple(shape), dtype=dtype, device=device).normal_(0.0, std, generator=g)


def materialize(module: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """A meta-built module on ``device`` in ``dtype`` with make_weight's values.

    Cast first, then ``to_empty``: only the ``dtype`` copy is ever allocated. ``to_empty`` unties
    shared parameters (UMT5's embedding), so aliases are dropped before and re-tied after.
    """
    if any(True for _ in module.buffers()):
        raise RuntimeError(f"{type(module).__name__} has buffers, which make_weight would not fill")
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    aliases = [(names[0], alias) for names in groups.values() for alias in names[1:]]

    def set_param(name, value):
        mod, _, attr = name.rpartition(".")
        setattr(module.get_submodule(mod), attr, value)

    for _, alias in aliases:
        set_param(alias, None)
    module = module.to(dtype).to_empty(device=device)
    for first, alias in aliases:
        set_param(alias, module.get_parameter(first))
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(make_weight(name, p.shape, dtype, device))
    return module


class RandomCheckpoint:
    """Stands in for the engine's ModelFolder: ``transformer_cfg`` and ``weights.read(name)`` giving
    make_weight's bf16 values as float32 numpy, as a checkpoint read gives them."""

    def __init__(self, cfg: AuraFlowConfig, device):
        self.transformer_cfg, self.device, self.root = cfg, device, "random weights"
        with torch.device("meta"):
            self.index = {n: tuple(p.shape) for n, p in AuraFlowTransformer(cfg).named_parameters()}
        self.weights = self  # the engine reads mf.weights.read / mf.weights.index

    def read(self, name: str) -> np.ndarray:
        # generated in bf16 on the device, widened on the host: no fp32 copy on the device
        return make_weight(name, self.index[name], torch.bfloat16, self.device).cpu().float().numpy()


# ---- memory of one stage ----


class StageMemory:
    """torch's allocator peaks and the device-level lowest free memory over a block (CUDA only)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.result: dict = {}

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.free0, self.total = torch.cuda.mem_get_info()
            self.base = torch.cuda.memory_allocated()
            self.retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
            self.min_free = self.free0
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.005):
            self.min_free = min(self.min_free, torch.cuda.mem_get_info()[0])

    def __exit__(self, *exc):
        if not self.cuda:
            return False
        try:
            torch.cuda.synchronize()
        finally:
            self._stop.set()
            self._thread.join()
        self.min_free = min(self.min_free, torch.cuda.mem_get_info()[0])
        self.result = {
            "allocated_peak": torch.cuda.max_memory_allocated(),
            "reserved_peak": torch.cuda.max_memory_reserved(),
            "device_drop": self.free0 - self.min_free,
            "device_used_peak": self.total - self.min_free,
            "allocated_at_start": self.base,
            # the allocator freed its cache and retried: it ran into the cap
            "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) - self.retries,
        }
        return False


def set_cap(device: torch.device, cap: int | None) -> None:
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else min(1.0, cap / total), device)


# ---- the stages ----


def prompt_ids(vocab: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[uncond, cond] ids padded with 0: "" is just </s> (2); the prompt 40 tokens then </s>."""
    ids = np.zeros((2, length), np.int64)
    ids[0, 0] = 2
    ids[1, :40] = np.random.default_rng(1).integers(3, vocab, 40)
    ids[1, 40] = 2
    return torch.from_numpy(ids), torch.from_numpy((ids != 0).astype(np.int64))


def text_encoder(size: str, device) -> np.ndarray:
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        **SIZES[size]["text"], feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0
    )
    with torch.device("meta"):
        m = UMT5EncoderModel(cfg)
    m = materialize(m, device, torch.bfloat16).eval()
    ids, mask = prompt_ids(cfg.vocab_size, TEXT_LENGTH)
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask)[0]
        out = out * mask[..., None].to(out.dtype)  # pad positions zeroed, as the pipeline does
    return out.float().cpu().numpy()


class DiffusersTransformer:
    """diffusers' AuraFlowTransformer2DModel behind the engine's ``(latents, context, step)`` call."""

    def __init__(self, cfg: AuraFlowConfig, device):
        from diffusers import AuraFlowTransformer2DModel

        with torch.device("meta"):
            m = AuraFlowTransformer2DModel(
                sample_size=64,
                patch_size=cfg.patch_size,
                in_channels=cfg.in_channels,
                num_mmdit_layers=cfg.num_mmdit_layers,
                num_single_dit_layers=cfg.num_single_dit_layers,
                attention_head_dim=cfg.attention_head_dim,
                num_attention_heads=cfg.num_attention_heads,
                joint_attention_dim=cfg.joint_attention_dim,
                caption_projection_dim=cfg.caption_projection_dim,
                out_channels=cfg.out_channels,
                pos_embed_max_size=cfg.pos_embed_max_size,
            )
        self.device, self.model = device, materialize(m, device, torch.bfloat16).eval()

    def prepare(self, schedule) -> None:
        self.timesteps = schedule.timesteps

    @torch.no_grad()
    def __call__(self, latents: np.ndarray, context: np.ndarray, step: int) -> np.ndarray:
        x = torch.from_numpy(latents).to(self.device, torch.bfloat16)
        c = torch.from_numpy(context).to(self.device, torch.bfloat16)
        # as AuraFlowPipeline: t/1000 in the latents' dtype
        t = torch.full((x.shape[0],), float(self.timesteps[step]), dtype=torch.bfloat16, device=self.device)
        return self.model(x, encoder_hidden_states=c, timestep=t).sample.float().cpu().numpy()

    def close(self) -> None:
        self.model = None


def open_transformer(run: str, cfg: AuraFlowConfig, device):
    if run == "diffusers bf16":
        return DiffusersTransformer(cfg, device)
    if run == "ours bf16":
        from auraflow_edge.engine.backends.torch_backend import TorchTransformer

        with torch.device("meta"):
            model = AuraFlowTransformer(cfg)
        model = materialize(model, device, torch.bfloat16).eval()
        return TorchTransformer(RandomCheckpoint(cfg, device), "bf16", str(device), model=model)
    from auraflow_edge.engine.backends.torch_quant import QuantTorchTransformer

    fmt = run.split()[-1]
    return QuantTorchTransformer(RandomCheckpoint(cfg, device), fmt, device, torch.bfloat16)


def transformer(run, cfg, device, noise, context, schedule, guidance, entry: dict) -> np.ndarray:
    t0 = time.perf_counter()
    tr = open_transformer(run, cfg, device)
    tr.prepare(schedule)
    entry["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tr(np.concatenate([noise, noise]), context, 0)  # warm-up: Triton compiles, cuBLAS picks kernels
    entry["warmup_s"] = time.perf_counter() - t0
    times: list[float] = []

    def timed(latents, ctx, step):
        t = time.perf_counter()
        v = tr(latents, ctx, step)  # returns numpy: the device is synchronised
        times.append(time.perf_counter() - t)
        return v

    latents = denoise(timed, noise, context[1:], schedule, guidance, uncond_context=context[:1])
    entry["step_s"], entry["step_median_s"] = times, statistics.median(times)
    tr.close()
    return latents


def vae_decode(size: str, device, latents: dict, tiles: int) -> dict:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            scaling_factor=0.13025,
            force_upcast=True,
            **SIZES[size]["vae"],
        )
    vae = materialize(vae, device, torch.float32).eval()  # force_upcast: the SDXL VAE runs in fp32

    @torch.no_grad()
    def decode(z):
        return vae.decode(torch.from_numpy(np.ascontiguousarray(z)).to(device)).sample.float().cpu().numpy()

    scale = np.float32(vae.config.scaling_factor)
    return {k: to_uint8(decode_tiled(decode, z / scale, tiles))[0] for k, z in latents.items()}


# ---- the run ----


def fidelity(ref_lat, lat, ref_img, img) -> dict:
    a, b = ref_lat.astype(np.float64), lat.astype(np.float64)
    out = {"latent_rel_l2": float(np.linalg.norm(a - b) / np.linalg.norm(a))}
    if ref_img is not None and img is not None:
        mse = np.mean((ref_img.astype(np.float64) - img.astype(np.float64)) ** 2)
        out["image_psnr_db"] = 99.0 if mse == 0 else float(10 * np.log10(255**2 / mse))
    return out


def targets(stages: dict, vae_stage: str | None, target_gib: float) -> list[dict]:
    out = []
    base = stages.get("diffusers bf16", {}).get("step_median_s")
    for run in ("ours int8", "ours fp8"):
        st = stages.get(run)
        if st is None or "skipped" in st:
            continue
        names = ["text_encoder bf16", run] + ([vae_stage] if vae_stage else [])
        used = {n: stages.get(n, {}).get("device_used_peak") for n in names}
        known = vae_stage is not None and all(v is not None for v in used.values())
        step = st.get("step_median_s")
        ratio = step / base if step is not None and base else None
        out.append(
            {
                "run": run,
                "device_used_peak_gib": {n: None if v is None else v / GiB for n, v in used.items()},
                "memory_target_gib": target_gib,
                "memory_met": all(v <= target_gib * GiB for v in used.values()) if known else None,
                "step_vs_diffusers_bf16": ratio,
                "step_target": 0.6,
                "step_met": None if ratio is None else ratio <= 0.6,
            }
        )
    return out


def _gib(v) -> str:
    return "-" if v is None else f"{v / GiB:.2f}"


def print_stage(name: str, e: dict) -> None:
    step = f" {e['step_median_s'] * 1e3:.0f} ms/step" if "step_median_s" in e else ""
    mem = (
        f" peaks GiB: allocated {_gib(e.get('allocated_peak'))}, reserved {_gib(e.get('reserved_peak'))},"
        f" device used {_gib(e.get('device_used_peak'))} (drop {_gib(e.get('device_drop'))})"
        if "allocated_peak" in e
        else ""
    )
    err = f" ERROR {e['error']}" if "error" in e else ""
    print(f"stage {name}: {e.get('seconds', 0):.1f} s{step}{mem}{err}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--cap-gib", type=float, default=8.0)
    ap.add_argument("--target-gib", type=float, default=7.5)
    ap.add_argument("--vae-tiles", type=int, default=1)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "gpu_fullsize.json"))
    a = ap.parse_args(argv)
    from auraflow_edge.engine.backends.torch_backend import quiet_libraries

    quiet_libraries()
    device = torch.device(a.device)
    cfg = SIZES[a.size]["transformer"]
    rep = Report(
        a.json,
        machine=machine_info(),
        settings=dict(
            size=a.size,
            height=a.height,
            width=a.width,
            steps=a.steps,
            guidance=a.guidance,
            cap_gib=a.cap_gib,
            target_gib=a.target_gib,
            capped_stages="text encoder, ours int8 / fp8, VAE decode",
        ),
        memory_note="7.5 GiB target checked against device_used_peak (device level: total - lowest free)",
        stages={},
    )
    rep.save()

    def stage(name: str, fn):
        entry, result, t0 = {"capped": capped(name)}, None, time.perf_counter()
        mem = StageMemory(device)
        try:
            with mem:  # frees the previous stage's cache first, then the cap applies
                set_cap(device, int(a.cap_gib * GiB) if capped(name) else None)
                result = fn(entry)
        except Exception as e:  # keep going: the other stages' numbers still count
            entry["error"] = error_text(e)
        entry["seconds"] = time.perf_counter() - t0
        entry.update(mem.result)
        rep["stages"][name] = entry
        rep.save()
        print_stage(name, entry)
        return result

    noise = np.random.default_rng(0).standard_normal((1, 4, a.height // 8, a.width // 8), dtype=np.float32)
    context = stage("text_encoder bf16", lambda e: text_encoder(a.size, device))
    if context is None:
        rep["note"] = "the text encoder failed: the runs use a random context"
        context = np.random.default_rng(2).standard_normal(
            (2, TEXT_LENGTH, cfg.joint_attention_dim), np.float32
        )
    schedule = flow_match_schedule(a.steps)
    latents = {}
    for run in RUNS:
        if run == "ours fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            rep["stages"][run] = {"skipped": "fp8 needs sm_89+"}
            continue
        lat = stage(
            run, lambda e, run=run: transformer(run, cfg, device, noise, context, schedule, a.guidance, e)
        )
        if lat is not None:
            latents[run] = lat
    vae_stage = f"vae_decode fp32 {a.vae_tiles}x{a.vae_tiles} tiles"
    images = stage(vae_stage, lambda e: vae_decode(a.size, device, latents, a.vae_tiles))
    if images is None and a.vae_tiles == 1:  # e.g. out of memory under the cap: tiles, as the planner would
        vae_stage = "vae_decode fp32 2x2 tiles"
        images = stage(vae_stage, lambda e: vae_decode(a.size, device, latents, 2))
    images = images or {}
    if "ours bf16" in latents:
        rep["fidelity_vs_ours_bf16"] = {
            run: fidelity(latents["ours bf16"], lat, images.get("ours bf16"), images.get(run))
            for run, lat in latents.items()
            if run != "ours bf16"
        }
    vae_ok = vae_stage if "error" not in rep["stages"][vae_stage] else None
    rep["targets"] = targets(rep["stages"], vae_ok, a.target_gib)
    rep.save()
    for run, f in rep.get("fidelity_vs_ours_bf16", {}).items():
        print(f"fidelity {run} vs ours bf16: {f}", flush=True)
    for t in rep["targets"]:
        print(f"targets {t}", flush=True)
    failed = [n for n, e in rep["stages"].items() if "error" in e]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
