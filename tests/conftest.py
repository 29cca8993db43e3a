"""One tiny random AuraFlow pipeline (diffusers layout) shared by the whole suite."""

from __future__ import annotations

import os

# No GPU in CI: every Triton kernel the suite touches runs in the CPU interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from auraflow_edge.engine.tiny.random_model import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_noise():
    """Initial latents for 64x96 px (latent 8x12), shared by the end-to-end tests."""
    return np.random.default_rng(123).standard_normal((1, 4, 8, 12), dtype=np.float32)


@pytest.fixture(scope="session")
def reference_image(tiny_dir, tiny_noise):
    """diffusers AuraFlowPipeline on the tiny folder: uint8 image and final latents."""
    import torch
    from diffusers import AuraFlowPipeline

    pipe = AuraFlowPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a photo of a cat",
        negative_prompt="blurry",
        num_inference_steps=4,
        guidance_scale=3.5,
        height=64,
        width=96,
        latents=torch.from_numpy(tiny_noise.copy()),
        output_type="pil",
    )
    lat = pipe(
        "a photo of a cat",
        negative_prompt="blurry",
        num_inference_steps=4,
        guidance_scale=3.5,
        height=64,
        width=96,
        latents=torch.from_numpy(tiny_noise.copy()),
        output_type="latent",
    )
    return np.asarray(out.images[0]), lat.images.numpy()


# every ONNX Runtime engine precision (int8-nbits: --ort-int8 nbits)
PRECISIONS = ["fp32", "fp16", "int8", "int8-nbits", "fp8", "int4"]


@pytest.fixture(scope="session")
def engines(tiny_dir, tmp_path_factory):
    """One ONNX Runtime engine folder per precision of the tiny model, at 64x96."""
    from auraflow_edge.export.build import build_engine

    root = tmp_path_factory.mktemp("engines")
    out = {}
    for p in PRECISIONS:
        prec, _, kernel = p.partition("-")
        out[p] = build_engine(
            str(tiny_dir),
            root / p,
            precision=prec,
            height=64,
            width=96,
            int4_block=16,
            quiet=True,
            ort_int8=kernel or "dynamic",
        )
    return out


GEN = dict(prompt="a photo of a cat", negative_prompt="blurry", steps=4, guidance=3.5, height=64, width=96)


def png_parameters(path) -> dict:
    """The generation parameters a PNG carries, read with PIL alone (not our writer's code)."""
    import json

    from PIL import Image

    with Image.open(path) as im:
        return json.loads(im.text["parameters"])


@pytest.fixture
def fake_trt_build(monkeypatch):
    """``build_tensorrt`` with the steps that need TensorRT or a GPU replaced (the GPU, the driver,
    the ONNX export, the engine build): everything that decides reuse, refusal and the manifest
    runs. ``state`` changes the machine; ``state["builds"]`` counts engines built."""
    import sys
    import types

    from auraflow_edge.export import onnx_folder, tensorrt_build

    trt = types.SimpleNamespace(__version__="10.99")
    state = {"gpu": ("GPU A", (9, 0)), "driver": 12080, "builds": 0, "trt": trt}
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_build, "gpu_identity", lambda: state["gpu"])
    monkeypatch.setattr(tensorrt_build, "driver_version", lambda: state["driver"], raising=False)
    monkeypatch.setattr(tensorrt_build, "unsupported_ops", lambda path: [])

    def export(model, tmp, backend, precision, height, width, components=None, **kw):
        import onnx
        from onnx import helper

        from auraflow_edge.engine.model.checkpoint import open_model

        comps = {}
        for name in ("transformer", "text_encoder", "vae_decoder"):
            onnx.save(helper.make_model(helper.make_graph([], name, [], [])), str(tmp / f"{name}.onnx"))
            comps[name] = {"file": f"{name}.onnx", "weight_bytes": 1 << 20}
        cfg = open_model(model, components).transformer_cfg.to_dict()
        return {"backend": backend, "precision": precision, "transformer_config": cfg, "components": comps}

    def build_one(trt, onnx_path, plan_path, profiles, **kw):
        state["builds"] += 1
        plan_path.write_bytes(b"plan %d" % state["builds"])
        return {"file": plan_path.name}

    monkeypatch.setattr(onnx_folder, "export_onnx_folder", export)
    monkeypatch.setattr(tensorrt_build, "build_one", build_one)
    return state


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """The shipped trained tiny AuraFlow (shapes world) as an fp32 diffusers pipeline folder."""
    from auraflow_edge.engine.tiny.weights import write_pipeline

    return write_pipeline(tmp_path_factory.mktemp("models") / "tiny-world")
