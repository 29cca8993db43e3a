"""Export and the ONNX Runtime backend: fidelity per precision, checker, damaged folders, no torch at run time."""

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import GEN, PRECISIONS

from auraflow_edge.engine.backends.ort_backend import _session
from auraflow_edge.engine.backends.ort_int8 import int8_encoding
from auraflow_edge.engine.backends.torch_backend import load_transformer
from auraflow_edge.engine.errors import UserError
from auraflow_edge.engine.model.checkpoint import open_model
from auraflow_edge.engine.runtime.manifest import Manifest
from auraflow_edge.engine.runtime.modulation import ModulationTable
from auraflow_edge.engine.runtime.pipeline import Pipeline
from auraflow_edge.engine.runtime.positions import PositionTable
from auraflow_edge.engine.runtime.schedule import flow_match_schedule
from auraflow_edge.export.build import build_engine


def test_modulation_table_matches_torch(tiny_dir, engines):
    m = Manifest.load(engines["fp32"])
    mf = open_model(tiny_dir)
    table = ModulationTable(mf.transformer_cfg, m.path("modulation.safetensors"))
    sched = flow_match_schedule(7)
    got = table(sched.timesteps)
    model = load_transformer(mf, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        want = model.compute_modulation(torch.from_numpy(sched.timesteps)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)  # float32 sin/cos of args up to 1000 rad
    assert table(sched.timesteps) is got  # cached per schedule


@pytest.mark.parametrize("precision", ["int8", "fp8", "int4"])
def test_quantized_engines_store_the_modulation_in_int8(tiny_dir, engines, precision):
    """Folded modulation weights at the engine's size: int8 per channel, about 1/4 of fp32."""
    m, fp32 = Manifest.load(engines[precision]), Manifest.load(engines["fp32"])
    assert m.component("modulation")["format"] == "int8"
    assert m.component("modulation")["weight_bytes"] < 0.5 * fp32.component("modulation")["weight_bytes"]
    mf = open_model(tiny_dir)
    t = flow_match_schedule(7).timesteps
    got = ModulationTable(mf.transformer_cfg, m.path("modulation.safetensors"))(t)
    want = ModulationTable(mf.transformer_cfg, read=mf.weights.read)(t)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-5 < rel < 1e-2, rel


def test_fp32_engine_matches_torch_and_diffusers(engines, tiny_dir, tiny_noise, reference_image):
    ort_res = Pipeline.load(engines["fp32"]).generate(**GEN, noise=tiny_noise)
    torch_res = Pipeline.load(tiny_dir, backend="torch").generate(**GEN, noise=tiny_noise)
    a = np.asarray(ort_res.image).astype(int)
    assert np.abs(a - np.asarray(torch_res.image).astype(int)).max() <= 1
    assert np.abs(a - reference_image[0].astype(int)).max() <= 1
    np.testing.assert_allclose(ort_res.latents, reference_image[1], rtol=1e-4, atol=1e-4)


def _transformer_outputs(engine, tiny_dir):
    """One transformer call of the engine and of the fp32 torch reference, same inputs."""

    m = Manifest.load(engine)
    mf = open_model(tiny_dir)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 12), dtype=np.float32)
    c = rng.standard_normal((2, 256, 32), dtype=np.float32)
    c[:, 100:] = 0
    table = ModulationTable(mf.transformer_cfg, m.path("modulation.safetensors"))
    mod = table(np.array([0.8], np.float32))
    dt = np.float16 if m["components"]["transformer"]["dtype"] == "fp16" else np.float32
    s = _session(m.path("transformer.onnx"), "cpu", None, int8_encoding())  # as the runtime runs it
    pos = PositionTable(mf.transformer_cfg, m.path("positions.safetensors"))(8, 12)
    feed = {"latents": x, "context": c, "modulation": mod, "pos": pos}
    got = s.run(None, {k: v.astype(dt) for k, v in feed.items()})[0]
    model = load_transformer(mf, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        want = model(torch.from_numpy(x), torch.from_numpy(c), modulation=torch.from_numpy(mod)).numpy()
    return got.astype(np.float64), want.astype(np.float64)


def _errors(got, want):
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    cos = float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want)))
    return rel, cos


def psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


# relative L2 / cosine / image PSNR bounds per precision, about twice the error measured
# measured on this model: fp16 5.0e-4 / 65 dB, int8 (dynamic) 8.9e-3 / 53 dB, int8-nbits 2.7e-3 / 57 dB,
# fp8 4.7e-3 / 57 dB, int4 2.0e-2 / 54 dB
BOUNDS = {
    "fp32": (1e-5, 0.99999, 60),
    "fp16": (1e-3, 0.99999, 55),
    "int8": (1.8e-2, 0.9999, 48),
    "int8-nbits": (6e-3, 0.99998, 50),
    "fp8": (1e-2, 0.99995, 50),
    "int4": (4e-2, 0.999, 46),
}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_error_against_fp32(precision, engines, tiny_dir, tiny_noise):
    got, want = _transformer_outputs(engines[precision], tiny_dir)
    rel, cos = _errors(got, want)
    max_rel, min_cos, min_psnr = BOUNDS[precision]
    assert rel < max_rel and cos > min_cos, (rel, cos)
    if precision != "fp32":
        assert rel > 1e-6  # it really is quantized
    img = Pipeline.load(engines[precision]).generate(**GEN, noise=tiny_noise).image
    ref = Pipeline.load(engines["fp32"]).generate(**GEN, noise=tiny_noise).image
    assert psnr(img, ref) > min_psnr


def test_a_transposed_scale_layout_fails_the_bounds(tiny_dir, tmp_path, monkeypatch):
    """The bounds above catch a broken layout: scales applied to the wrong axis."""
    from auraflow_edge.engine.model import quant as qz

    real = qz.quantize_int8

    def wrong(w):
        q, s = real(w)
        return q, s[::-1].copy()  # scale of channel i applied to channel N-1-i

    monkeypatch.setattr(qz, "quantize_int8", wrong)
    e = build_engine(str(tiny_dir), tmp_path / "bad", precision="int8", height=64, width=96, quiet=True)
    rel, cos = _errors(*_transformer_outputs(e, tiny_dir))
    print(f"reversed scales: rel {rel:.2e}, cos {cos:.6f}")
    assert rel > BOUNDS["int8"][0] or cos < BOUNDS["int8"][1]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_checker_passes_on_every_file(engines, precision):
    for f in sorted(engines[precision].glob("*.onnx")):
        onnx.checker.check_model(str(f), full_check=True)


def test_quantized_weights_are_smaller(engines):
    sizes = {p: Manifest.load(e)["components"]["transformer"]["weight_bytes"] for p, e in engines.items()}
    assert (
        sizes["int8"] < 0.4 * sizes["fp32"]
        and sizes["int4"] < sizes["int8"]
        and sizes["fp16"] < 0.55 * sizes["fp32"]
    )


def test_rebuild_reuses_and_refuses(engines, tiny_dir):
    e = engines["int8"]
    mtime = (e / "manifest.json").stat().st_mtime
    assert (
        build_engine(str(tiny_dir), e, precision="int8", height=64, width=96, int4_block=16, quiet=True) == e
    )
    assert (e / "manifest.json").stat().st_mtime == mtime
    with pytest.raises(UserError, match="--force"):
        build_engine(str(tiny_dir), e, precision="int4", height=64, width=96, quiet=True)


def test_damaged_engines_are_refused(engines, tmp_path):
    e = tmp_path / "e"
    shutil.copytree(engines["int8"], e)
    data = e / "transformer.onnx.data"
    b = bytearray(data.read_bytes())
    b[100] ^= 0xFF  # same size, different bytes: only the checksum sees it
    data.write_bytes(bytes(b))
    Manifest.load(e)
    with pytest.raises(UserError, match="sha256"):
        Manifest.load(e, verify=True)
    data.write_bytes(bytes(b[:-10]))
    with pytest.raises(UserError, match="damaged"):
        Pipeline.load(e)
    m = json.loads((e / "manifest.json").read_text())
    m["files"] = {"../outside.bin": {"size": 1, "sha256": "0"}}
    (e / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="outside"):
        Manifest.load(e)


def test_external_data_outside_the_folder_is_refused(engines, tmp_path):
    e = tmp_path / "e"
    shutil.copytree(engines["fp32"], e)
    g = onnx.load(str(e / "vae_decoder.onnx"), load_external_data=False)
    for t in g.graph.initializer:
        for kv in t.external_data:
            if kv.key == "location":
                kv.value = "../../etc/passwd"
    (e / "vae_decoder.onnx").write_bytes(g.SerializeToString())
    m = json.loads((e / "manifest.json").read_text())
    m["files"]["vae_decoder.onnx"]["size"] = (e / "vae_decoder.onnx").stat().st_size
    (e / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="outside the engine folder"):
        Pipeline.load(e)


def test_one_engine_serves_every_size(engines, tiny_dir):
    """No size is baked into an ONNX Runtime engine: each size the grid covers matches diffusers."""
    import torch
    from diffusers import AuraFlowPipeline

    ref = AuraFlowPipeline.from_pretrained(tiny_dir)
    ref.set_progress_bar_config(disable=True)
    pipe = Pipeline.load(engines["fp32"])
    assert pipe.default_size() == (256, 256)  # sample_size 32 x VAE scale factor 8
    for h, w in [(64, 64), (96, 64), (48, 160), (256, 256)]:
        noise = np.random.default_rng(h * w).standard_normal((1, 4, h // 8, w // 8), dtype=np.float32)
        gen = {**GEN, "height": h, "width": w}
        got = np.asarray(pipe.generate(**gen, noise=noise).image).astype(int)
        want = ref(
            gen["prompt"],
            negative_prompt=gen["negative_prompt"],
            num_inference_steps=gen["steps"],
            guidance_scale=gen["guidance"],
            height=h,
            width=w,
            latents=torch.from_numpy(noise.copy()),
        ).images[0]
        assert got.shape == (h, w, 3)
        assert np.abs(got - np.asarray(want).astype(int)).max() <= 1, (h, w)
    with pytest.raises(UserError, match="exceeds the positional grid"):
        pipe.generate("x", steps=1, height=272, width=64)
    assert Pipeline.load(engines["int8"]).generate("x", steps=1).image.size == (256, 256)


def test_generate_imports_no_torch(engines, tmp_path):
    out = tmp_path / "o.png"
    code = (
        "import sys\nfrom auraflow_edge.engine.cli.main import main\n"
        f"rc = main(['--quiet', 'generate', {str(engines['int8'])!r}, '--prompt', 'a cat', '--steps', '2', "
        f"'--height', '64', '--width', '96', '-o', {str(out)!r}])\n"
        "assert rc == 0\nassert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert out.exists()


def test_build_and_inspect_cli(engines, capsys):
    from auraflow_edge.engine.cli.main import main

    assert main(["inspect", str(engines["int4"]), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "int4" in out and "transformer.onnx.data" in out and "all checksums verified" in out


def test_engine_folder_has_ordinary_permissions(engines):
    """Assembled in a mkdtemp folder (0700), the engine still ends readable as any folder would be."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert engines["int8"].stat().st_mode & 0o777 == 0o777 & ~umask
