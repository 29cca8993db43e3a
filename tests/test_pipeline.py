"""End to end on the torch backend against diffusers' AuraFlowPipeline (same noise)."""

import numpy as np
from conftest import GEN

from auraflow_edge.engine.image import read_parameters, save_png
from auraflow_edge.engine.pipeline import Pipeline, initial_noise


def test_image_matches_reference_pipeline(tiny_dir, tiny_noise, reference_image, tmp_path):
    ref_img, ref_lat = reference_image
    res = Pipeline.load(tiny_dir).generate(**GEN, noise=tiny_noise)
    img = np.asarray(res.image)
    assert img.shape == ref_img.shape == (64, 96, 3)
    assert np.abs(img.astype(int) - ref_img.astype(int)).max() <= 1
    np.testing.assert_allclose(res.latents, ref_lat, rtol=1e-5, atol=1e-5)
    assert img.std() > 5  # a real image, not a constant
    p = save_png(res.image, tmp_path / "x.png", res.parameters)
    meta = read_parameters(p)
    assert meta["prompt"] == GEN["prompt"] and meta["steps"] == 4 and meta["backend"] == "torch"


def test_seed_generator_is_documented_pcg64():
    a = initial_noise(7, 64, 96)
    b = np.random.Generator(np.random.PCG64(7)).standard_normal((1, 4, 8, 12), dtype=np.float32)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, initial_noise(8, 64, 96))


def test_guidance_one_runs_without_uncond(tiny_dir, tiny_noise):
    import torch
    from diffusers import AuraFlowPipeline

    pipe = AuraFlowPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        "a cat",
        num_inference_steps=2,
        guidance_scale=1.0,
        height=64,
        width=96,
        latents=torch.from_numpy(tiny_noise.copy()),
        output_type="latent",
    ).images.numpy()
    ours = Pipeline.load(tiny_dir).generate(
        "a cat", steps=2, guidance=1.0, height=64, width=96, noise=tiny_noise
    )
    np.testing.assert_allclose(ours.latents, ref, rtol=1e-5, atol=1e-5)
