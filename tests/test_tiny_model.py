"""The shipped trained tiny AuraFlow: intact, small, torch-free to write, ours == diffusers on it,
and it draws what the prompt says."""

import subprocess
import sys

import numpy as np
import pytest

from auraflow_edge.engine.runtime.noise import initial_noise
from auraflow_edge.engine.runtime.pipeline import Pipeline
from auraflow_edge.engine.tiny import grader, weights, world

PROMPT = "a yellow triangle on the left on a black background"  # a held-out triple
GEN = dict(steps=20, guidance=3.5, height=64, width=64)


def test_shipped_weights_are_intact_and_small():
    weights.verify()
    files = [f for f in weights.WEIGHTS.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 8 * 2**20
    assert max(f.stat().st_size for f in files) < 2**20  # every committed file under 1 MB
    assert "auraflow_edge.engine.tiny.train" in (weights.WEIGHTS / "training.json").read_text()


def test_damaged_weights_are_refused(tmp_path):
    import shutil

    copy = tmp_path / "w"
    shutil.copytree(weights.WEIGHTS, copy)
    shard = next(copy.glob("transformer/*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    with pytest.raises(weights.UserError, match="checksum"):
        weights.write_pipeline(tmp_path / "out", source=copy)


def test_pipeline_folder_is_written_without_torch(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from auraflow_edge.engine.tiny.weights import write_pipeline\n"
        f"write_pipeline({str(tmp_path / 'm')!r})"
    )
    subprocess.run([sys.executable, "-P", "-c", code], check=True)
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert (tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.fixture(scope="module")
def diffusers_image(world_dir):
    import torch
    from diffusers import AuraFlowPipeline

    pipe = AuraFlowPipeline.from_pretrained(world_dir)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.from_numpy(initial_noise(3, 64, 64))
    out = pipe(PROMPT, num_inference_steps=20, guidance_scale=3.5, height=64, width=64, latents=noise)
    return np.asarray(out.images[0]).astype(int)


def test_torch_matches_diffusers_on_trained_weights(world_dir, diffusers_image):
    ours = np.asarray(Pipeline.load(world_dir, backend="torch").generate(PROMPT, seed=3, **GEN).image)
    assert np.abs(ours.astype(int) - diffusers_image).max() <= 1
    assert grader.read_image(ours) == world.parse_prompt(PROMPT).attributes()  # and it is the asked picture


def test_onnxruntime_fp32_matches_diffusers_on_trained_weights(world_dir, diffusers_image, tmp_path):
    from auraflow_edge.export.build import build_engine

    engine = build_engine(str(world_dir), tmp_path / "e", precision="fp32", height=64, width=64, quiet=True)
    ours = np.asarray(Pipeline.load(engine).generate(PROMPT, seed=3, **GEN).image)
    assert np.abs(ours.astype(int) - diffusers_image).max() <= 1


def test_trained_model_draws_what_it_is_told(world_dir):
    """Six fixed prompts and seeds (4 held-in, 2 held-out): the grader reads back every attribute
    of at least four (the model gets about 80% right: bench/results/tiny_adherence.json)."""
    scenes = world.scene_set(4, "train", 0) + world.scene_set(2, "held_out", 1)
    res = Pipeline.load(world_dir).generate_many([s.prompt for s in scenes], seed=0, **GEN)
    right = [all(grader.grade(s, np.asarray(r.image)).values()) for s, r in zip(scenes, res)]
    assert sum(right) >= 4, right


def test_bench_reports_adherence(world_dir, tmp_path, capsys):
    import json

    from auraflow_edge.engine.cli.main import main

    out = tmp_path / "r.json"
    args = ["--quiet", "bench", str(world_dir), "--backend", "torch", "--precisions", "fp32,int8"]
    args += ["--steps", "2", "--height", "64", "--width", "64", "--no-baseline", "--adherence", "4"]
    assert main([*args, "--workdir", str(tmp_path / "w"), "--json", str(out)]) == 0
    adh = json.loads(out.read_text())["adherence"]
    assert list(adh["rows"]) == ["torch fp32", "torch int8"]
    assert adh["held_in_prompts"] == 4 and adh["held_out_prompts"] == 2
    fp32, int8 = adh["rows"]["torch fp32"], adh["rows"]["torch int8"]
    assert fp32["psnr_db"] == 99.0 and 20 < int8["psnr_db"] < 99
    assert set(fp32["held_in"]) == {"all", "color", "shape", "where", "background"}
    assert "torch int8" in capsys.readouterr().out
