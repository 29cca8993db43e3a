"""Full-size AuraFlow v0.3 (random weights) at 1024x1024 on one GPU, under an 8 GiB cap (needs CUDA).

    python bench/gpu_fullsize.py --json bench/results/gpu_fullsize.json [--steps 2]

Ours, torch backend with our kernels, int8 and fp8 (sm_89+), with
torch.cuda.set_per_process_memory_fraction = 8 GiB: each stage (UMT5 text encoder bf16, transformer,
SDXL-VAE decode fp32, tiled when the plan says so) is loaded, run and freed in turn; its peak
allocated memory is recorded. Baseline in the same run: diffusers AuraFlowTransformer2DModel in bf16,
uncapped. Targets: every stage <= 7.5 GiB; per-step time <= 0.6x diffusers bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from auraflow_edge.engine.model import AURAFLOW_V03, AuraFlowTransformer
from auraflow_edge.engine.torch_quant import build_quantized_transformer

GiB = 2**30
H = W = 1024


def _randomize(module: torch.nn.Module, device: str, dtype) -> torch.nn.Module:
    module = module.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
    return module


def _step_times(fn, steps: int) -> list[float]:
    times = []
    for _ in range(steps + 1):  # first call is warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times[1:]


def stage_text_encoder() -> float:
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(
        vocab_size=32128,
        d_model=2048,
        d_kv=64,
        d_ff=5120,
        num_layers=24,
        num_heads=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    )
    torch.cuda.reset_peak_memory_stats()
    with torch.device("meta"):
        m = UMT5EncoderModel(cfg)
    m = _randomize(m, "cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 32128, (1, 256), device="cuda")
    with torch.no_grad():
        for _ in range(2):  # prompt and negative prompt
            m(input_ids=ids, attention_mask=torch.ones_like(ids))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del m
    torch.cuda.empty_cache()
    return peak


def stage_transformer(fmt: str, steps: int) -> tuple[float, list[float]]:
    cfg = AURAFLOW_V03
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AuraFlowTransformer(cfg).named_parameters()}
    torch.cuda.reset_peak_memory_stats()
    model = build_quantized_transformer(
        cfg, fmt, torch.device("cuda"), torch.bfloat16, lambda n: torch.randn(shapes[n], device="cuda") * 0.02
    )
    x = torch.randn(2, 4, H // 8, W // 8, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(2, 256, 2048, device="cuda", dtype=torch.bfloat16)
    mod = torch.randn(1, cfg.num_modulations, cfg.hidden, device="cuda", dtype=torch.bfloat16) * 0.1
    with torch.no_grad():
        times = _step_times(lambda: model(x, c, modulation=mod), steps)
    peak = torch.cuda.max_memory_allocated()
    model = None  # noqa: F841 - free before the next stage
    torch.cuda.empty_cache()
    return peak, times


def stage_vae(tiles: int) -> float:
    from diffusers import AutoencoderKL

    from auraflow_edge.engine.vae_tiling import decode_tiled

    torch.cuda.reset_peak_memory_stats()
    with torch.device("meta"):
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
        )
    vae = _randomize(vae, "cuda", torch.float32).eval()
    z = torch.randn(1, 4, H // 8, W // 8, device="cuda")
    with torch.no_grad():
        if tiles > 1:
            decode_tiled(
                lambda t: vae.decode(torch.from_numpy(t).cuda()).sample.cpu().numpy(), z.cpu().numpy(), tiles
            )
        else:
            vae.decode(z)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    vae = None  # noqa: F841 - free before the next stage
    torch.cuda.empty_cache()
    return peak


def diffusers_baseline(steps: int) -> tuple[float, list[float]]:
    from diffusers import AuraFlowTransformer2DModel

    cfg = AURAFLOW_V03
    torch.cuda.reset_peak_memory_stats()
    with torch.device("meta"):
        m = AuraFlowTransformer2DModel(
            sample_size=64,
            patch_size=2,
            in_channels=4,
            num_mmdit_layers=4,
            num_single_dit_layers=32,
            attention_head_dim=256,
            num_attention_heads=12,
            joint_attention_dim=2048,
            caption_projection_dim=3072,
            out_channels=4,
            pos_embed_max_size=cfg.pos_embed_max_size,
        )
    m = _randomize(m, "cuda", torch.bfloat16).eval()
    x = torch.randn(2, 4, H // 8, W // 8, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(2, 256, 2048, device="cuda", dtype=torch.bfloat16)
    t = torch.full((2,), 0.5, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        times = _step_times(lambda: m(x, encoder_hidden_states=c, timestep=t), steps)
    peak = torch.cuda.max_memory_allocated()
    m = None  # noqa: F841 - free before the capped runs
    torch.cuda.empty_cache()
    return peak, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cap-gib", type=float, default=8.0)
    ap.add_argument("--vae-tiles", type=int, default=1)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "gpu_fullsize.json"))
    a = ap.parse_args()
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "steps": a.steps,
        "size": [H, W],
    }
    base_peak, base_t = diffusers_baseline(a.steps)
    res["diffusers_bf16_uncapped"] = {"peak_bytes": base_peak, "step_s": statistics.median(base_t)}
    print(
        f"diffusers bf16 (uncapped): {statistics.median(base_t) * 1e3:.0f} ms/step, peak {base_peak / GiB:.2f} GiB",
        flush=True,
    )
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(a.cap_gib * GiB / total)
    caps = ["int8"] + (["fp8"] if torch.cuda.get_device_capability() >= (8, 9) else [])
    for fmt in caps:
        te = stage_text_encoder()
        tr, times = stage_transformer(fmt, a.steps)
        vae = stage_vae(a.vae_tiles)
        step = statistics.median(times)
        r = {
            "text_encoder_peak": te,
            "transformer_peak": tr,
            "vae_peak": vae,
            "step_s": step,
            "ratio_vs_diffusers": step / res["diffusers_bf16_uncapped"]["step_s"],
            "all_stages_within_7_5_GiB": max(te, tr, vae) <= 7.5 * GiB,
        }
        res[f"ours_{fmt}_capped_{a.cap_gib:g}GiB"] = r
        print(
            f"ours {fmt} (cap {a.cap_gib:g} GiB): {step * 1e3:.0f} ms/step ({r['ratio_vs_diffusers']:.2f}x diffusers, "
            f"target <= 0.6); peaks TE {te / GiB:.2f} / transformer {tr / GiB:.2f} / VAE {vae / GiB:.2f} GiB "
            f"(target <= 7.5)",
            flush=True,
        )
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
