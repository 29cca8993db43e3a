"""End to end on the torch backend against diffusers' AuraFlowPipeline (same noise)."""

import numpy as np
import pytest
from conftest import GEN
from conftest import png_parameters as read_parameters
from PIL import Image

from auraflow_edge.engine.runtime.image import save_png
from auraflow_edge.engine.runtime.pipeline import Pipeline


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


def test_many_images_per_load(tiny_dir, tmp_path, capsys):
    """--prompts x --num-images: each stage loaded once, images equal to one-by-one runs with seeds
    seed, seed+1, ..., files out-0001.png ... each with its own parameters."""
    from auraflow_edge.engine.cli.main import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\nan astronaut riding a horse\n")
    pipe = Pipeline.load(tiny_dir)
    opened = []
    real_open = pipe.stages._open
    pipe.stages._open = lambda name, **k: opened.append(name) or real_open(name, **k)
    gen = dict(steps=2, height=64, width=64, negative_prompt="blurry")
    many = pipe.generate_many(
        ["a photo of a cat", "an astronaut riding a horse"], num_images=2, seed=5, **gen
    )
    assert opened == ["text_encoder", "transformer", "vae"]
    assert [r.parameters["seed"] for r in many] == [5, 6, 7, 8]
    assert [r.parameters["prompt"][:5] for r in many] == ["a pho", "a pho", "an as", "an as"]
    one = Pipeline.load(tiny_dir).generate("an astronaut riding a horse", seed=7, **gen)
    np.testing.assert_array_equal(np.asarray(many[2].image), np.asarray(one.image))
    assert not np.array_equal(np.asarray(many[2].image), np.asarray(many[3].image))

    out = tmp_path / "out.png"
    args = ["generate", str(tiny_dir), "--prompts", str(prompts), "--num-images", "2", "--seed", "5"]
    args += ["--steps", "2", "--height", "64", "--width", "64", "--negative-prompt", "blurry"]
    assert main([*args, "-o", str(out), "--quiet"]) == 0
    files = sorted(tmp_path.glob("out-*.png"))
    assert [f.name for f in files] == [f"out-{i:04d}.png" for i in range(1, 5)] and not out.exists()
    for f, r in zip(files, many):
        assert read_parameters(f)["seed"] == r.parameters["seed"]
        assert read_parameters(f)["prompt"] == r.parameters["prompt"]
        np.testing.assert_array_equal(np.asarray(Image.open(f)), np.asarray(r.image))


def test_auto_device_and_precision(tiny_dir, monkeypatch):
    from dataclasses import replace

    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU choice; this machine has a CUDA device")
    from auraflow_edge.engine.model.checkpoint import open_model
    from auraflow_edge.engine.runtime import planner

    pipe = Pipeline.load(tiny_dir)  # device auto, precision auto: this machine has no CUDA
    assert (pipe.info["device"], pipe.info["precision"]) == ("cpu", "fp32")
    mf = open_model(tiny_dir)
    real = planner.sizes_from_model
    # the tiny transformer is smaller than the stage overheads: scale it so precision decides the fit
    big = lambda *a: replace(real(*a), transformer_weights=real(*a).transformer_weights * 10**4)  # noqa: E731
    monkeypatch.setattr(planner, "sizes_from_model", big)
    peak = {p: planner.make_plan(big(mf, p, "cuda"), 256, 256, 1 << 50).peak for p in ("bf16", "fp8")}
    assert peak["fp8"] < peak["bf16"]
    assert planner.auto_precision(mf, "cuda", peak["bf16"], 256, 256, (8, 9))[0] == "bf16"
    squeezed = (peak["fp8"] + peak["bf16"]) // 2
    assert planner.auto_precision(mf, "cuda", squeezed, 256, 256, (8, 9))[0] == "fp8"  # Ada / Hopper
    assert planner.auto_precision(mf, "cuda", squeezed, 256, 256, (8, 6))[0] == "int8"  # Ampere
    assert planner.auto_precision(mf, "cpu", None, 256, 256, None)[0] == "fp32"
