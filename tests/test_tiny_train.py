"""The tiny-model trainer: its 16-token shortcut is exact, and a few steps of it learn."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AuraFlowAttnProcessor2_0

from auraflow_edge.engine.tiny import train as T

CFG = T.TinyConfig(
    single=1, joint=1, data=64, vae_steps=15, decoder_steps=10, vae_batch=8, steps=40, batch=16
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return T.build_components(CFG, tmp_path_factory.mktemp("tiny-train"))


def test_sixteen_tokens_with_collapsed_pads_equal_the_full_window(parts):
    """Text encoder on 16 tokens + transformer with the pad bias == diffusers on all 256 tokens."""
    tokenizer, text_encoder, _, transformer, _ = parts
    text_encoder.eval()
    torch.manual_seed(1)
    with torch.no_grad():  # untrained weights are too tame to show a wrong pad count
        for p in transformer.parameters():
            p.mul_(1.5)
    prompts = ["a red circle on the left on a blue background", ""]
    full = tokenizer(prompts, padding="max_length", max_length=256, return_tensors="pt")
    x = torch.randn(2, 4, 8, 8)
    s = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        ctx_full = T.encode_text(text_encoder, full.input_ids, full.attention_mask)
        transformer.set_attn_processor(AuraFlowAttnProcessor2_0())
        want = transformer(hidden_states=x, encoder_hidden_states=ctx_full, timestep=s).sample
        ids, mask, pad_at = T.tokenize(tokenizer, prompts)
        assert tokenizer.padding_side == "left" and pad_at == 0  # LlamaTokenizer: the prompt ends the window
        torch.testing.assert_close(ids, full.input_ids[:, -T.TRAIN_TOKENS :])
        ctx = T.encode_text(text_encoder, ids, mask)
        torch.testing.assert_close(ctx, ctx_full[:, -T.TRAIN_TOKENS :], rtol=1e-5, atol=1e-6)
        proc = T.PaddedAttention()
        proc.bias = T.pad_bias(16, pad_at)
        transformer.set_attn_processor(proc)
        got = transformer(hidden_states=x, encoder_hidden_states=ctx, timestep=s).sample
        proc.bias = None  # without the pad count it must differ
        wrong = transformer(hidden_states=x, encoder_hidden_states=ctx, timestep=s).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (wrong - want).abs().max() > 1e-2


def test_a_long_prompt_is_refused(parts):
    with pytest.raises(ValueError, match="TRAIN_TOKENS"):
        T.tokenize(parts[0], ["a red circle on the left on a blue background " * 3])


def test_a_few_steps_lower_both_losses_and_write_a_diffusers_folder(tmp_path):
    from diffusers import AuraFlowPipeline

    torch.set_num_threads(1)
    rec = T.train(tmp_path / "pipe", CFG, log=lambda m: None)
    assert rec["vae_loss"]["last"] < 0.9 * rec["vae_loss"]["first"], rec
    assert rec["flow_loss"]["last"] < 0.9 * rec["flow_loss"]["first"], rec
    pipe = AuraFlowPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.vae.config.scaling_factor == pytest.approx(rec["vae_scaling_factor"])
    assert pipe.transformer.config.sample_size == 8 and pipe.vae.config.latent_channels == 4
    img = pipe(
        "a red circle on the left on a blue background",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
    ).images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_two_processes_train_the_same_weights_as_one(tmp_path):
    """With two threads the VAE trains in a spawned process beside the transformer (one thread
    each): the weights are those of the one-process run, bit for bit."""
    from safetensors.numpy import load_file

    torch.set_num_threads(1)
    T.train(tmp_path / "one", CFG, log=lambda m: None)
    torch.set_num_threads(2)
    try:
        rec = T.train(tmp_path / "two", CFG, log=lambda m: None)
    finally:
        torch.set_num_threads(1)
    assert rec["processes"] == 2 and rec["vae_loss"]["last"] < rec["vae_loss"]["first"]
    for comp in ("vae", "transformer", "text_encoder"):
        (f1,) = (tmp_path / "one" / comp).glob("*.safetensors")
        a, b = load_file(f1), load_file(tmp_path / "two" / comp / f1.name)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{comp}/{k}")
