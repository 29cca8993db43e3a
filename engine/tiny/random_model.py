"""Tiny random AuraFlow pipelines in the real diffusers layout, made locally (nothing downloaded).

Used by `auraflow-edge demo`, by the test suite (one shared tiny config) and by the CPU benchmark
(the mid-size config). Needs torch, diffusers and transformers.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

SIZES = {
    # hidden = heads * head_dim; joint_dim is the text encoder width
    "tiny": dict(heads=2, head_dim=16, joint=1, single=2, text_dim=32, text_layers=2, grid=16),
    "mid": dict(heads=3, head_dim=256, joint=2, single=6, text_dim=256, text_layers=2, grid=64),
}

_CORPUS = [
    "a photo of a cat sitting on a red sofa",
    "an astronaut riding a horse on the moon, detailed, 8k",
    "a watercolor painting of mountains at sunrise",
    "close-up portrait of an old fisherman with a grey beard",
    "the quick brown fox jumps over the lazy dog",
    "a bowl of ramen with chopsticks, studio lighting",
    "cyberpunk city street at night in the rain, neon signs",
]


def build_tokenizer(folder: Path, vocab_size: int = 300, corpus: list[str] | None = None) -> None:
    """A BPE tokenizer saved as LlamaTokenizerFast with AuraFlow's flags (no BOS, EOS added),
    trained on ``corpus`` (default: a few generic captions)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "</s>", "<s>"], show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4 if corpus is None else corpus, trainer)
    fast = LlamaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=False,
        add_eos_token=True,
        model_max_length=256,
    )
    fast.save_pretrained(folder)
    # Released AuraFlow folders state the flags explicitly; transformers 5 no longer writes them.
    cfg_path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(add_bos_token=False, add_eos_token=True)
    cfg_path.write_text(json.dumps(cfg, indent=2))


def make_tiny_pipeline(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random AuraFlow pipeline folder (diffusers save_pretrained layout) and return it."""
    import torch
    from diffusers import (
        AuraFlowPipeline,
        AuraFlowTransformer2DModel,
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import LlamaTokenizerFast, UMT5Config, UMT5EncoderModel

    from ..backends.torch_backend import quiet_libraries

    quiet_libraries()
    s = SIZES[size]
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    hidden = s["heads"] * s["head_dim"]
    transformer = AuraFlowTransformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=s["joint"],
        num_single_dit_layers=s["single"],
        attention_head_dim=s["head_dim"],
        num_attention_heads=s["heads"],
        joint_attention_dim=s["text_dim"],
        caption_projection_dim=hidden,
        out_channels=4,
        pos_embed_max_size=s["grid"] ** 2,
    )
    with torch.no_grad():
        # Make every part matter: random modulation big enough that gates, shifts and scales count.
        for name, p in transformer.named_parameters():
            if "norm" in name and "linear" in name:
                p.mul_(4.0)
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif p.ndim == 2 and "norm" not in name:
                # Uneven output channels, as trained weights have: a scale-layout bug cannot hide.
                p.mul_(torch.exp(0.5 * torch.randn(p.shape[0], 1)))
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=300,
            d_model=s["text_dim"],
            d_kv=8,
            d_ff=2 * s["text_dim"],
            num_layers=s["text_layers"],
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            pad_token_id=0,
            eos_token_id=2,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.73)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        build_tokenizer(tmp / "tok")
        tokenizer = LlamaTokenizerFast.from_pretrained(tmp / "tok")
        pipe = AuraFlowPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )
        pipe.save_pretrained(tmp / "pipe", safe_serialization=True)
        if folder.exists():
            shutil.rmtree(folder)
        (tmp / "pipe").rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def write_random_transformer(
    folder: str | Path, cfg, dtype: str = "bf16", seed: int = 0, shard_bytes: int = 5 << 30
):
    """A random AuraFlow transformer of any size in the diffusers layout (config + sharded
    safetensors + index), written one tensor at a time: the full 6.86 B model needs ~14 GB of disk
    but well under 1 GB of memory. Needs torch only to list the parameter shapes (on meta)."""
    import numpy as np
    import torch

    from ..model.safetensors_io import save_streamed
    from ..model.spec import NUMPY_DTYPES
    from ..model.transformer import AuraFlowTransformer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np_dtype = NUMPY_DTYPES[dtype]
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in AuraFlowTransformer(cfg).named_parameters()]
    shards, cur, size = [], [], 0
    item = np.dtype(np_dtype).itemsize
    for n, s in shapes:
        nb = int(np.prod(s)) * item
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((n, s, np_dtype))
        size += nb
    shards.append(cur)
    rng = np.random.Generator(np.random.PCG64(seed))

    def produce(name):
        shape = dict(shapes)[name]
        std = 0.02 if len(shape) > 1 else 0.1
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np_dtype)

    weight_map = {}
    for i, specs in enumerate(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_streamed(specs, produce, folder / fname)
        weight_map.update({n: fname for n, _, _ in specs})
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    conf = {"_class_name": "AuraFlowTransformer2DModel", **cfg.to_dict()}
    (folder / "config.json").write_text(json.dumps(conf, indent=2))
    return folder
