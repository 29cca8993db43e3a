"""Train the tiny AuraFlow of the shapes world from scratch on the CPU, seeded.

    python -P -m auraflow_edge.engine.tiny.train --out DIR [--pack engine/tiny/weights]

The VAE (an ``AutoencoderKL``, 4 latent channels, 8x down) learns on rendered images: its decoder
from a designed latent (block colors and vertical light offset, see ``designed_latents``), its
encoder to that latent, then the decoder alone on noisier latents (``finetune_decoder``). The text
encoder (a small UMT5) and the ``AuraFlowTransformer2DModel`` learn together by flow matching on the
designed latents of a fixed rendered data set (x_s = (1 - s) x0 + s noise, target noise - x0, s
logit-normal then shifted as the scheduler shifts it), the prompt dropped to "" for a tenth of the
samples so that classifier-free guidance works. The two need nothing from each other: with two
threads they run side by side, one process each (about 17 minutes on 2 cores). Writes a diffusers
pipeline folder that ``AuraFlowPipeline.from_pretrained`` loads unchanged; ``--pack`` also writes
the fp16 copy the package ships (see ``weights.py``).

Training sees 16 context tokens, not 256: the pads around a prompt are zero after the text
encoder's mask, hence identical tokens through every block, and k identical keys weigh in attention
as one key with log(k) added to its logit. Of the 16 tokens next to the prompt, the pad farthest
from it stands for all 241 pads; this is exact, and 7x cheaper than the full window.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .world import COLORS, POSITIONS, SHAPES, random_scene, render

MAX_LENGTH = 256  # the pipeline's text window
TRAIN_TOKENS = 16  # context tokens seen in training (longest prompt: 11 tokens with </s>)
REGISTERS = 8
SHIFT = 1.73


@dataclass(frozen=True)
class TinyConfig:
    image: int = 64
    # transformer
    heads: int = 2
    head_dim: int = 64
    joint: int = 2
    single: int = 3
    # text encoder
    text_dim: int = 64
    text_layers: int = 2
    vocab: int = 160
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)
    # training
    seed: int = 0
    data: int = 8192  # rendered images (jittered scenes of the training triples)
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 3e-3
    # then the decoder alone on latents with more noise (uniform 0..decoder_noise times N(0, 1))
    decoder_steps: int = 1500
    decoder_noise: float = 0.2
    decoder_lr: float = 1e-3
    steps: int = 3600
    batch: int = 64
    lr: float = 1e-3
    drop_prompt: float = 0.1
    ema: float = 0.995


def corpus() -> list[str]:
    """Every prompt word, for the tokenizer."""
    words = ["a", "on", "background", *COLORS, *SHAPES, *" ".join(POSITIONS).split()]
    return [" ".join(words)] * 4 + [
        f"a {c} {s} {w} on a {b} background"
        for c in COLORS
        for s in SHAPES
        for w in POSITIONS
        for b in COLORS
    ]


def build_components(cfg: TinyConfig, folder: Path):
    """Fresh (untrained) tokenizer, text encoder, VAE, transformer and scheduler."""
    from diffusers import AuraFlowTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import LlamaTokenizerFast, UMT5Config, UMT5EncoderModel

    from .random_model import build_tokenizer

    torch.manual_seed(cfg.seed)
    build_tokenizer(folder / "tokenizer", vocab_size=cfg.vocab, corpus=corpus())
    tokenizer = LlamaTokenizerFast.from_pretrained(folder / "tokenizer")
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=cfg.text_dim,
            d_kv=16,
            d_ff=2 * cfg.text_dim,
            num_layers=cfg.text_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,  # a short run on a small world: every step counts
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,  # one group: per-channel groups would normalise the colour away
        sample_size=cfg.image,
        scaling_factor=1.0,  # set from the latents' spread once the VAE is trained
        force_upcast=True,
    )
    side = cfg.image // 8 // 2  # patches per side
    transformer = AuraFlowTransformer2DModel(
        sample_size=cfg.image // 8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=cfg.joint,
        num_single_dit_layers=cfg.single,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.text_dim,
        caption_projection_dim=cfg.heads * cfg.head_dim,
        out_channels=4,
        pos_embed_max_size=side * side,  # the model knows one size: refuse others
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    return tokenizer, text_encoder, vae, transformer, scheduler


class PaddedAttention:
    """diffusers' AuraFlowAttnProcessor2_0 plus an additive key bias (the collapsed pads)."""

    def __init__(self):
        self.bias = None  # (keys,) float, set before each forward

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        b = hidden_states.shape[0]
        heads = attn.heads

        def split(x):  # (B, tokens, heads, head_dim)
            return x.view(b, -1, heads, x.shape[-1] // heads)

        q, k, v = (
            split(attn.to_q(hidden_states)),
            split(attn.to_k(hidden_states)),
            split(attn.to_v(hidden_states)),
        )
        q, k = attn.norm_q(q), attn.norm_k(k)
        n_ctx = 0
        if encoder_hidden_states is not None:
            cq = attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states)))
            ck = attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states)))
            cv = split(attn.add_v_proj(encoder_hidden_states))
            n_ctx = cq.shape[1]
            q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, heads, tokens, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])
        if encoder_hidden_states is None:
            return attn.to_out[0](out)
        return attn.to_out[0](out[:, n_ctx:]), attn.to_add_out(out[:, :n_ctx])


def pad_bias(n_image_tokens: int, pad_at: int) -> torch.Tensor:
    """Key bias for [registers, TRAIN_TOKENS context, image]: the pad at window position ``pad_at``
    counts MAX_LENGTH - TRAIN_TOKENS + 1 times."""
    bias = torch.zeros(REGISTERS + TRAIN_TOKENS + n_image_tokens)
    bias[REGISTERS + pad_at] = math.log(MAX_LENGTH - TRAIN_TOKENS + 1)
    return bias[None, :]  # (1, keys): broadcast over batch, heads and queries


def tokenize(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ids and mask of the TRAIN_TOKENS of the pipeline's 256-token window that hold the prompt,
    and where in them the pad stands that represents all the others. The tokenizer pads on the
    left as LlamaTokenizer does (the prompt ends the window) or on the right."""
    t = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    left = tokenizer.padding_side == "left"
    window = slice(MAX_LENGTH - TRAIN_TOKENS, None) if left else slice(0, TRAIN_TOKENS)
    ids, mask = t.input_ids[:, window], t.attention_mask[:, window]
    pad_at = 0 if left else TRAIN_TOKENS - 1
    if mask[:, pad_at].any():
        raise ValueError(f"a prompt fills {TRAIN_TOKENS} tokens; raise TRAIN_TOKENS")
    return ids, mask, pad_at


def encode_text(text_encoder, ids, mask):
    """As AuraFlowPipeline.encode_prompt: encoder output with pad positions zeroed."""
    return text_encoder(input_ids=ids, attention_mask=mask)[0] * mask[..., None]


def render_data(cfg: TinyConfig):
    """Jittered scenes of the training triples: images (N, 3, H, W) in [-1, 1], object masks
    (N, 1, H, W) bool (any pixel not exactly background) and prompts."""
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    scenes = [random_scene(rng, "train") for _ in range(cfg.data)]
    imgs = np.stack([render(s, cfg.image) for s in scenes]).transpose(0, 3, 1, 2)
    bg = np.array([COLORS[s.background] for s in scenes], np.uint8)[:, :, None, None]
    masks = (imgs != bg).any(1, keepdims=True)
    return (
        torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1),
        torch.from_numpy(masks),
        [s.prompt for s in scenes],
    )


def _lr(step: int, total: int, peak: float, warmup: int = 20) -> float:
    warmup = min(warmup, total // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def designed_latents(images: torch.Tensor) -> torch.Tensor:
    """The latent the VAE is taught, (N, 4, H/8, W/8): each 8x8 block's mean color (3 channels) and
    where its light sits vertically (mean of luminance deviation x row offset; 4th channel).

    Why designed: in ~1000 CPU steps a jointly trained AutoencoderKL does not learn to pass even a
    solid color through its encoder (its latents start as a common offset plus a small color
    term, and every GroupNorm keeps only directions); its decoder, given informative latents,
    learns in tens of steps. So the decoder learns this latent -> image, and the encoder learns
    image -> this latent, side by side."""
    m = F.avg_pool2d(images, 8)  # (N, 3, H/8, W/8)
    lum = images.mean(1, keepdim=True)  # (N, 1, H, W)
    dev = lum - F.interpolate(F.avg_pool2d(lum, 8), scale_factor=8, mode="nearest")
    rows = (torch.arange(images.shape[-2]) % 8 - 3.5) / 3.5  # row offset inside its block, -1..1
    v = F.avg_pool2d(dev * rows[None, None, :, None], 8)  # (N, 1, H/8, W/8)
    return torch.cat([m, 4 * v], 1)


def _pixel_loss(rec: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 + L2, the object weighted: it is a tenth of the pixels but all of the prompt."""
    w = 1 + 9 * mask.float()
    err = rec - x
    return (w * (err.abs() + err**2)).mean() / w.mean()


def _fit(
    params, batch_loss, cfg: TinyConfig, steps: int, lr: float, g, n: int, log, label: str
) -> list[float]:
    """AdamW with warm-up and cosine over ``steps``; each step the loss of ``batch_loss(idx)`` for
    ``cfg.vae_batch`` indices drawn from ``n`` with ``g``. -> the losses."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        loss = batch_loss(torch.randint(n, (cfg.vae_batch,), generator=g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"{label} step {step}: loss {np.mean(losses[-50:]):.4f}")
    return losses


def train_vae(vae, images: torch.Tensor, masks: torch.Tensor, cfg: TinyConfig, log) -> list[float]:
    g = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():
        vae.quant_conv.bias[4:].fill_(-6.0)  # posterior std 0.05
        for m in vae.modules():  # every residual block starts as the identity: a 20-conv stack trains fast
            if hasattr(m, "conv_shortcut") and hasattr(m, "conv2"):
                m.conv2.weight.zero_()

    def batch_loss(idx):
        x = images[idx]
        target = designed_latents(x)
        enc = vae.encode(x).latent_dist.mean
        # the decoder sees the latent with a little noise: the transformer's latents are not exact
        rec = vae.decode(target + 0.05 * torch.randn(target.shape, generator=g)).sample
        return _pixel_loss(rec, x, masks[idx]) + F.mse_loss(enc, target)

    vae.train()
    params = list(vae.parameters())
    losses = _fit(params, batch_loss, cfg, cfg.vae_steps, cfg.vae_lr, g, len(images), log, "vae")
    vae.eval()
    return losses


def finetune_decoder(vae, images: torch.Tensor, masks: torch.Tensor, cfg: TinyConfig, log) -> list[float]:
    """The decoder alone (encoder frozen), taught on designed latents with noise of a random
    strength up to ``cfg.decoder_noise``. The transformer's latents are least exact at the object's
    corners; a decoder that has only seen near-exact latents draws such corners round, so squares
    came out as circles (generated shapes 81.5% right, squares 55%). Taught on noisier latents it
    draws one of the world's shapes from them (a 1000-step trial: 90% of 100 held-in prompts)."""
    g = torch.Generator().manual_seed(cfg.seed + 5)
    frozen = list(vae.encoder.parameters()) + list(vae.quant_conv.parameters())
    for p in frozen:
        p.requires_grad_(False)

    def batch_loss(idx):
        x = images[idx]
        target = designed_latents(x)
        sigma = cfg.decoder_noise * torch.rand(len(idx), 1, 1, 1, generator=g)
        rec = vae.decode(target + sigma * torch.randn(target.shape, generator=g)).sample
        return _pixel_loss(rec, x, masks[idx])

    vae.train()
    params = [p for p in vae.parameters() if p.requires_grad]
    losses = _fit(params, batch_loss, cfg, cfg.decoder_steps, cfg.decoder_lr, g, len(images), log, "decoder")
    for p in frozen:
        p.requires_grad_(True)
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat(
        [vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)]
    )


def train_transformer(transformer, text_encoder, tokenizer, latents, prompts, cfg: TinyConfig, log, stage=0):
    """Flow matching on scaled latents; leaves the EMA weights in both models, returns the losses.
    ``stage`` > 0: a continued run draws other batches and noise."""
    g = torch.Generator().manual_seed(cfg.seed + 2 + 1000 * stage)
    proc = PaddedAttention()
    transformer.set_attn_processor(proc)
    n_img = (latents.shape[-1] // 2) * (latents.shape[-2] // 2)
    ids, mask, pad_at = tokenize(tokenizer, prompts)
    uncond_ids, uncond_mask, _ = tokenize(tokenizer, [""])
    proc.bias = pad_bias(n_img, pad_at)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    losses = []
    transformer.train()
    text_encoder.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.steps, cfg.lr, warmup=100)
        idx = torch.randint(len(latents), (cfg.batch,), generator=g)
        x0 = latents[idx]
        drop = torch.rand(cfg.batch, generator=g) < cfg.drop_prompt
        b_ids = torch.where(drop[:, None], uncond_ids, ids[idx])
        b_mask = torch.where(drop[:, None], uncond_mask, mask[idx])
        ctx = encode_text(text_encoder, b_ids, b_mask)
        # SD3 / AuraFlow: logit-normal sigma, then the scheduler's shift
        s = torch.sigmoid(torch.randn(cfg.batch, generator=g))
        s = SHIFT * s / (1 + (SHIFT - 1) * s)
        noise = torch.randn(x0.shape, generator=g)
        xs = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
        v = transformer(hidden_states=xs, encoder_hidden_states=ctx, timestep=s, return_dict=False)[0]
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"transformer step {step}: loss {np.mean(losses[-50:]):.4f}")
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    transformer.eval()
    text_encoder.eval()
    from diffusers.models.attention_processor import AuraFlowAttnProcessor2_0

    transformer.set_attn_processor(AuraFlowAttnProcessor2_0())
    return losses


def _ends(losses: list[float]) -> dict:
    k = max(1, min(50, len(losses) // 5))
    return {"first": float(np.mean(losses[:k])), "last": float(np.mean(losses[-k:]))}


@torch.no_grad()
def vae_adherence(vae, cfg: TinyConfig, n: int = 100) -> dict:
    """The grader on VAE reconstructions of fresh scenes (all triples): the ceiling for generation."""
    from .grader import accuracy, grade
    from .world import scene_set

    scenes = scene_set(n, "all", cfg.seed + 3)
    x = torch.from_numpy(
        np.stack([render(s, cfg.image) for s in scenes]).transpose(0, 3, 1, 2).astype(np.float32)
    )
    rec = vae.decode(vae.encode(x / 127.5 - 1).latent_dist.mean).sample
    img = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return accuracy([grade(s, i) for s, i in zip(scenes, img)])


def _load(folder: Path, work: Path):
    """The components of a trained folder, to train the transformer further."""
    from diffusers import AuraFlowTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import LlamaTokenizerFast, UMT5EncoderModel

    shutil.copytree(folder / "tokenizer", work / "tokenizer")
    return (
        LlamaTokenizerFast.from_pretrained(work / "tokenizer"),
        UMT5EncoderModel.from_pretrained(folder / "text_encoder"),
        AutoencoderKL.from_pretrained(folder / "vae"),
        AuraFlowTransformer2DModel.from_pretrained(folder / "transformer"),
        FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
    )


def _vae_phase(cfg: TinyConfig, folder: str, log_path: str) -> None:
    """The VAE phase in its own process (one thread): ``folder``/init in, ``folder``/trained out.
    It needs nothing from the transformer phase (both learn the designed latents), so the two run
    side by side, one core each."""
    from diffusers import AutoencoderKL

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with open(log_path, "a") as f:

        def log(m):
            print(m, file=f, flush=True)

        images, masks, _ = render_data(cfg)
        vae = AutoencoderKL.from_pretrained(Path(folder) / "init")
        losses = train_vae(vae, images, masks, cfg, log)
        dec_losses = finetune_decoder(vae, images, masks, cfg, log)
        vae.save_pretrained(Path(folder) / "trained", safe_serialization=True)
        record = {
            "losses": _ends(losses),
            "decoder_losses": _ends(dec_losses) if dec_losses else None,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (Path(folder) / "trained" / "record.json").write_text(json.dumps(record))


def _start_vae_phase(vae, cfg: TinyConfig, work: Path, log):
    """Start the VAE phase in a spawned process; returns a function that waits for it and returns
    (trained VAE, its loss ends, seconds)."""
    import multiprocessing as mp

    from diffusers import AutoencoderKL

    vae.save_pretrained(work / "vae-phase" / "init", safe_serialization=True)
    log_path = work / "vae-phase" / "log.txt"
    log_path.write_text("")
    proc = mp.get_context("spawn").Process(
        target=_vae_phase, args=(cfg, str(work / "vae-phase"), str(log_path)), daemon=True
    )
    proc.start()

    def wait():
        seen = 0
        while True:
            proc.join(timeout=5)
            lines = log_path.read_text().splitlines()
            for line in lines[seen:]:
                log(line)
            seen = len(lines)
            if not proc.is_alive():
                break
        if proc.exitcode != 0:
            raise RuntimeError(f"the VAE phase failed (exit code {proc.exitcode}); see {log_path}")
        rec = json.loads((work / "vae-phase" / "trained" / "record.json").read_text())
        trained = AutoencoderKL.from_pretrained(work / "vae-phase" / "trained")
        return trained, rec["losses"], rec["decoder_losses"], rec["seconds"]

    return wait


def train(
    out: str | Path, cfg: TinyConfig = TinyConfig(), log=print, resume: str | Path | None = None
) -> dict:
    """Train everything and write the pipeline folder ``out``; returns the training record.
    ``resume``: a folder this wrote; its VAE is kept and its transformer and text encoder train
    ``cfg.steps`` more steps (a fresh warm-up and cosine).

    With two or more torch threads the VAE trains in a second process while the transformer and
    text encoder train here, one thread each (on 2 cores both phases run about as fast on one
    thread as on two, so this halves the wall time)."""
    from diffusers import AuraFlowPipeline

    from ..backends.torch_backend import quiet_libraries

    quiet_libraries()
    out = Path(out)
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    images, masks, prompts = render_data(cfg)
    log(f"rendered {len(images)} images in {time.perf_counter() - t0:.1f} s")
    latents = designed_latents(images)
    # the transformer learns the designed latents, scaled to unit spread: no VAE needed for it
    before, wait_vae, t_vae, vae_losses, dec_losses = {}, None, 0.0, [], []
    if resume is None:
        tokenizer, text_encoder, vae, transformer, scheduler = build_components(cfg, work)
        scale = float(1 / latents.std())
        if torch.get_num_threads() >= 2:
            wait_vae = _start_vae_phase(vae, cfg, work, log)
            torch.set_num_threads(1)
        else:
            vae_losses = train_vae(vae, images, masks, cfg, log)
            dec_losses = finetune_decoder(vae, images, masks, cfg, log)
            t_vae = time.perf_counter() - t0
    else:
        tokenizer, text_encoder, vae, transformer, scheduler = _load(Path(resume), work)
        before = json.loads((Path(resume) / "training.json").read_text())
        scale = float(vae.config.scaling_factor)
    stage = before.get("stage", -1) + 1
    tr_losses = train_transformer(
        transformer, text_encoder, tokenizer, latents * scale, prompts, cfg, log, stage=stage
    )
    t_transformer = time.perf_counter() - t0
    vae_ends = _ends(vae_losses) if vae_losses else None
    dec_ends = _ends(dec_losses) if dec_losses else None
    if wait_vae is not None:
        vae, vae_ends, dec_ends, t_vae = wait_vae()
    vae.register_to_config(scaling_factor=scale)
    encoder_rel_err = float((encode_latents(vae, images[:512]) - latents[:512]).norm() / latents[:512].norm())
    vae_acc = vae_adherence(vae, cfg)
    log(
        f"VAE: {t_vae:.0f} s; latent std {1 / scale:.3f}; encoder rel. error {encoder_rel_err:.3f}; "
        f"grader on reconstructions {vae_acc}"
    )
    t_all = time.perf_counter() - t0
    pipe = AuraFlowPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.save_pretrained(work / "pipe", safe_serialization=True)
    record = {
        "config": asdict(cfg),
        "seconds": {"vae": round(t_vae, 1), "transformer": round(t_transformer, 1), "total": round(t_all, 1)},
        "threads": 1 if wait_vae is not None else torch.get_num_threads(),
        "processes": 2 if wait_vae is not None else 1,
        "stage": stage,
        "vae_loss": vae_ends,
        "decoder_loss": dec_ends,
        "vae_reconstruction_accuracy": vae_acc,
        "vae_encoder_relative_error": encoder_rel_err,
        "flow_loss": _ends(tr_losses),
        "vae_scaling_factor": scale,
        "torch": torch.__version__,
        "before": before or None,
    }
    (work / "pipe" / "training.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    (work / "pipe").rename(out)
    shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {out} ({t_all:.0f} s)")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="pipeline folder to write")
    ap.add_argument("--pack", help="also write the shipped fp16 copy here (e.g. engine/tiny/weights)")
    ap.add_argument("--resume", help="a folder this wrote: keep its VAE, train its transformer --steps more")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    for f in ("seed", "steps", "batch", "vae_steps", "decoder_steps", "data"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=getattr(TinyConfig(), f))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TinyConfig(
        seed=args.seed,
        steps=args.steps,
        batch=args.batch,
        vae_steps=args.vae_steps,
        decoder_steps=args.decoder_steps,
        data=args.data,
    )
    train(args.out, cfg, log=lambda m: print(m, flush=True), resume=args.resume)
    if args.pack:
        from .weights import pack

        pack(
            args.out,
            args.pack,
            command="python -P -m auraflow_edge.engine.tiny.train " + " ".join(argv or []),
        )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
