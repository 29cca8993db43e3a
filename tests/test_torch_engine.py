"""`build --backend torch`: a quantized engine folder the torch backend loads with no quantization
pass, giving exactly the images of quantize-at-load."""

import numpy as np
import pytest
from conftest import GEN

from auraflow_edge.engine.backends import torch_quant
from auraflow_edge.engine.cli.main import main
from auraflow_edge.engine.runtime.manifest import Manifest
from auraflow_edge.engine.runtime.pipeline import Pipeline
from auraflow_edge.export.build import build_engine


@pytest.mark.parametrize("precision", ["int8", "fp8", "int4"])
def test_torch_engine_equals_quantize_at_load(tiny_dir, tiny_noise, tmp_path, monkeypatch, precision):
    e = build_engine(str(tiny_dir), tmp_path / "e", backend="torch", precision=precision, quiet=True)
    m = Manifest.load(e, verify=True)
    assert m["backend"] == "torch" and m["precision"] == precision
    assert m.component("modulation")["format"] == "int8"
    want = Pipeline.load(tiny_dir, precision=precision).generate(**GEN, noise=tiny_noise)
    calls = []
    real = torch_quant.quantize_weight
    monkeypatch.setattr(torch_quant, "quantize_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipe = Pipeline.load(e)  # backend from the manifest: torch
    got = pipe.generate(**GEN, noise=tiny_noise)
    assert calls == []  # loaded as stored: no quantization pass
    assert pipe.info["backend"] == "torch" and pipe.info["precision"] == precision
    # the same quantized transformer, tensor for tensor ...
    import torch

    from auraflow_edge.engine.backends.torch_backend import _engine_model
    from auraflow_edge.engine.model.checkpoint import open_model

    cpu = torch.device("cpu")
    ref = torch_quant.QuantTorchTransformer(open_model(tiny_dir), precision, cpu, torch.float32, 64).model
    mine = torch_quant.QuantTorchTransformer(
        _engine_model(m), precision, cpu, torch.float32, 64, engine=m
    ).model
    sa, sb = ref.state_dict(), mine.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_meta or sb[k].is_meta:  # the folded modulation linears: never loaded by either
            assert sa[k].is_meta and sb[k].is_meta, k
            continue
        assert torch.equal(
            sa[k].view(torch.uint8) if sa[k].dtype == torch.float8_e4m3fn else sa[k],
            sb[k].view(torch.uint8) if sb[k].dtype == torch.float8_e4m3fn else sb[k],
        ), k
    # ... and only the folded modulation differs (int8 in the folder): images within a few levels
    a, b = np.asarray(got.image).astype(int), np.asarray(want.image).astype(int)
    assert np.abs(a - b).max() <= 4
    rel = np.linalg.norm(got.latents - want.latents) / np.linalg.norm(want.latents)
    assert rel < 2e-2, rel


def test_torch_engine_refusals(tiny_dir, tmp_path, capsys):
    rc = main(
        ["build", str(tiny_dir), "-o", str(tmp_path / "e"), "--backend", "torch", "--precision", "fp32"]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "quantized engines" in err and err.count("\n") == 1
    e = build_engine(str(tiny_dir), tmp_path / "e8", backend="torch", precision="int8", quiet=True)
    rc = main(["generate", str(e), "--prompt", "x", "--precision", "int4", "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc != 0 and "int8 engine" in err and not (tmp_path / "o.png").exists()
