"""Loading: original single-file checkpoints, hub ids, damaged files, pickles."""

import json
import shutil

import numpy as np
import pytest
import torch

from auraflow_edge.engine.backends.torch_backend import load_transformer
from auraflow_edge.engine.errors import UserError
from auraflow_edge.engine.model.checkpoint import open_model, original_names
from auraflow_edge.engine.model.safetensors_io import SafetensorsFile, save_file


def _write_original(tiny_dir, path, prefix):
    mf = open_model(tiny_dir)
    cfg = mf.transformer_cfg
    names = original_names(cfg.num_mmdit_layers, cfg.num_single_dit_layers)
    out = {}
    for dname, oname in names.items():
        a = mf.weights.read(dname)
        if dname == "norm_out.linear.weight":  # original order is (shift, scale)
            h = a.shape[0] // 2
            a = np.concatenate([a[h:], a[:h]])
        out[prefix + oname] = a
    save_file(out, path)
    return mf


@pytest.mark.parametrize("prefix", ["", "model."])
def test_single_file_loads_to_same_outputs(tiny_dir, tmp_path, prefix):
    f = tmp_path / "auraflow.safetensors"
    mf = _write_original(tiny_dir, f, prefix)
    ref = load_transformer(mf, torch.float32, torch.device("cpu"))
    one = open_model(f, components=tiny_dir, head_dim=mf.transformer_cfg.attention_head_dim)
    # a single file has no config: its sample size (default image size) comes from its grid
    assert one.transformer_cfg.sample_size == 64
    assert one.transformer_cfg.with_(sample_size=mf.transformer_cfg.sample_size) == mf.transformer_cfg
    ours = load_transformer(one, torch.float32, torch.device("cpu"))
    x, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 32), torch.tensor([0.4, 0.9])
    with torch.no_grad():
        assert torch.equal(ours(x, c, timestep=t), ref(x, c, timestep=t))


def test_sharded_folder_with_index(tiny_dir, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(tiny_dir / "transformer", d)
    src = SafetensorsFile(d / "diffusion_pytorch_model.safetensors")
    keys = src.keys()
    half = len(keys) // 2
    wm = {}
    for i, part in enumerate([keys[:half], keys[half:]]):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: src.read(k) for k in part}, d / name)
        wm |= {k: name for k in part}
    (d / "diffusion_pytorch_model.safetensors").unlink()
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    mf = open_model(d)
    assert sorted(mf.weights.names()) == sorted(keys)
    a = load_transformer(mf, torch.float32, torch.device("cpu"))
    b = load_transformer(open_model(tiny_dir), torch.float32, torch.device("cpu"))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_uncached_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    # huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE at import: patch what it read
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="not in the local Hugging Face cache.*auraflow-edge download"):
        open_model("fal/AuraFlow-v0.3")


def test_cached_hub_id_resolves(tiny_dir, monkeypatch, tmp_path):
    # The cache layout huggingface_hub reads: models--org--name/{refs/main, snapshots/<rev>/...}
    repo = tmp_path / "models--fal--AuraFlow-tiny"
    snap = repo / "snapshots" / "abc123"
    shutil.copytree(tiny_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    mf = open_model("fal/AuraFlow-tiny")
    assert mf.transformer_cfg == open_model(tiny_dir).transformer_cfg


def test_truncated_file_is_refused(tiny_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(tiny_dir, d)
    f = d / "transformer" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        open_model(d)


def test_pickle_checkpoints_are_never_loaded(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"\x80\x04not really")
    with pytest.raises(UserError, match="safetensors"):
        open_model(f)
    d = tmp_path / "folder"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="never loaded"):
        open_model(d)


def test_unknown_model_type(tiny_dir, tmp_path):
    d = tmp_path / "u"
    shutil.copytree(tiny_dir, d)
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UserError, match="unknown model type"):
        open_model(d)


def test_variant_copies_are_not_mixed_in(tiny_dir, tmp_path):
    """A hub folder can hold diffusion_pytorch_model.fp16.safetensors beside the full-precision file."""
    d = tmp_path / "v"
    shutil.copytree(tiny_dir, d)
    src = SafetensorsFile(d / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file(
        {k: np.zeros_like(src.read(k)).astype(np.float16) for k in src.keys()},
        d / "transformer" / "diffusion_pytorch_model.fp16.safetensors",
    )
    mf = open_model(d)
    w = mf.weights.read("proj_out.weight")
    assert w.dtype == np.float32 and np.abs(w).max() > 0  # the plain file, not the zeroed variant
