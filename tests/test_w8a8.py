"""W8A8 (activation quantization from calibration, SmoothQuant smoothing) as Q/DQ pairs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from auraflow_edge.engine.backends.torch_backend import load_transformer
from auraflow_edge.engine.model.checkpoint import open_model
from auraflow_edge.engine.model.spec import KEEP_FLOAT
from auraflow_edge.engine.runtime.modulation import ModulationTable
from auraflow_edge.engine.runtime.positions import POS_NAME, crop
from auraflow_edge.export.calibrate import CALIBRATION_PROMPTS, calibrate, smoothing
from auraflow_edge.export.components import trace_transformer
from auraflow_edge.export.onnx_export import WeightPolicy, save_model, stream_weights
from auraflow_edge.export.onnx_folder import export_onnx_folder
from auraflow_edge.export.tensorrt_build import unsupported_ops


@pytest.fixture(scope="module")
def calib(tiny_dir):
    mf = open_model(tiny_dir)
    return mf, calibrate(mf, CALIBRATION_PROMPTS[:3], steps=2, height=64, width=96)


def test_smoothing_balances_activation_and_weight_ranges():
    amax_x = np.array([100.0, 1.0, 0.01], np.float32)
    w = np.ones((4, 3), np.float32)
    s = smoothing(amax_x, w, 0.5)
    np.testing.assert_allclose(s, np.sqrt(amax_x), rtol=1e-5)
    # after smoothing: activation range / s == weight range * s
    np.testing.assert_allclose(amax_x / s, np.abs(w * s).max(axis=0), rtol=1e-5)


def test_calibration_covers_every_quantized_linear(calib):
    mf, stats = calib
    cfg = mf.transformer_cfg
    assert (
        len(stats) == 14 * cfg.num_mmdit_layers + 7 * cfg.num_single_dit_layers + 3
    )  # + context, patch, proj_out
    assert all(v.shape == (mf.weights.shape(k)[1],) and (v > 0).all() for k, v in stats.items())


def _w8a8_error(mf, stats, fmt, alpha, tmp_path):
    cfg = mf.transformer_cfg
    ref = load_transformer(mf, torch.float32, torch.device("cpu"))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 12), dtype=np.float32)
    c = rng.standard_normal((2, 256, cfg.joint_attention_dim), dtype=np.float32)
    mod = ModulationTable(cfg, read=mf.weights.read)(np.array([0.6], np.float32))
    proto, rn = trace_transformer(cfg, 64, 96, "fp32")
    out = tmp_path / f"w8a8_{fmt}_{alpha}.onnx"
    pol = WeightPolicy(fmt, "fp32", keep=KEEP_FLOAT, act_quant=fmt, smooth_alpha=alpha)
    stream_weights(
        proto,
        lambda n: mf.weights.read(rn(n)),
        pol,
        out.with_suffix(".onnx.data"),
        act_stats={"m." + k: v for k, v in stats.items()},
    )
    save_model(proto, out)
    onnx.checker.check_model(str(out))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    pos = crop(mf.weights.read(POS_NAME), cfg, 8, 12)
    feed = {"latents": x, "context": c, "modulation": mod, "pos": pos}
    got = ort.InferenceSession(str(out), so).run(None, feed)[0]
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(c), modulation=torch.from_numpy(mod)).numpy()
    n_q = sum(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want)), n_q


@pytest.mark.parametrize("fmt,bound", [("int8", 3e-2), ("fp8", 3e-2)])
def test_w8a8_graph_runs_and_is_close(calib, tmp_path, fmt, bound):
    mf, stats = calib
    rel, n_q = _w8a8_error(mf, stats, fmt, 0.5, tmp_path)
    assert n_q > 0 and 1e-4 < rel < bound, rel


def test_smoothing_reduces_int8_error(calib, tmp_path):
    mf, stats = calib
    smoothed, _ = _w8a8_error(mf, stats, "int8", 0.5, tmp_path)
    plain, _ = _w8a8_error(mf, stats, "int8", 0.0, tmp_path)
    assert smoothed < plain, (smoothed, plain)


def test_tensorrt_form_export_with_act_quant(tiny_dir, tmp_path):
    data = export_onnx_folder(
        str(tiny_dir),
        tmp_path,
        "tensorrt",
        "int8",
        64,
        96,
        quiet=True,
        act_quant="int8",
        calibration_prompts=2,
    )
    assert data["calibration"]["act_quant"] == "int8" and (tmp_path / "calibration.safetensors").exists()
    g = onnx.load(str(tmp_path / "transformer.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("QuantizeLinear") > 0 and "DynamicQuantizeMatMul" not in ops
    assert unsupported_ops(tmp_path / "transformer.onnx") == []
