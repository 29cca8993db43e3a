"""TensorRT: everything that runs without TensorRT (profiles, keys, refusal, weight streaming,
the plugin node, the operator check). Tests that need TensorRT are skipped when it is absent."""

import importlib.util

import onnx
import pytest
import torch

from auraflow_edge.engine.errors import UserError
from auraflow_edge.engine.manifest import Manifest
from auraflow_edge.engine.model import AURAFLOW_V02, AURAFLOW_V03
from auraflow_edge.engine.tensorrt_backend import select_engine
from auraflow_edge.export import tensorrt_build as tb

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
GiB = 2**30


def test_parse_shapes():
    assert tb.parse_shapes(None, 1024, 768) == [(1024, 768)]
    assert tb.parse_shapes("1024x1024, 1344x768", 0, 0) == [(1024, 1024), (768, 1344)]
    with pytest.raises(UserError, match="multiples of 16"):
        tb.parse_shapes("1000x1000", 0, 0)
    with pytest.raises(UserError, match="WIDTHxHEIGHT"):
        tb.parse_shapes("big", 0, 0)


def test_static_profiles_one_per_shape_with_cfg_batch_2():
    profs = tb.transformer_profiles(AURAFLOW_V03, [(1024, 1024), (768, 1344)], dynamic=False)
    assert len(profs) == 2
    lat = profs[1].shapes["latents"]
    assert lat[1] == (2, 4, 96, 168) and lat[0][0] == 1 and lat[2][0] == 2
    assert profs[0].shapes["context"][1] == (2, 256, 2048)
    assert profs[0].shapes["modulation"][0] == (1, 242, 3072)


def test_dynamic_profile_spans_the_positional_grid():
    (p,) = tb.transformer_profiles(AURAFLOW_V02, [(1024, 1024)], dynamic=True)
    mn, opt, mx = p.shapes["latents"]
    assert mn[2:] == (32, 32) and opt == (2, 4, 128, 128) and mx[2:] == (128, 128)  # v0.2: 1024 px max
    (p,) = tb.transformer_profiles(AURAFLOW_V03, [(1024, 1024)], dynamic=True)
    assert p.shapes["latents"][2][2:] == (192, 192)  # v0.3: 1536 px max
    (v,) = tb.vae_profiles([(768, 1344)], True, 1536)
    assert v.shapes["latents"][1] == (1, 4, 96, 168)


def test_engine_key():
    assert (
        tb.engine_key("NVIDIA GeForce RTX 4060", (8, 9), "10.8.0") == "nvidia-geforce-rtx-4060-sm89-trt10.8.0"
    )
    assert tb.engine_key("NVIDIA H100", (9, 0), "10.8.0", "ampere+").endswith("-ampereplus")


def test_weight_streaming_arithmetic():
    fp16_weights = int(4.56e9 * 2)  # v0.3 without the folded modulation, fp16
    act = 1 * GiB
    p = tb.weight_streaming_plan(fp16_weights, act, 8 * GiB)
    assert p.enable and p.budget == 8 * GiB - act - 256 * 2**20
    assert p.budget + p.streamed == fp16_weights
    assert not tb.weight_streaming_plan(int(4.56e9), act, 8 * GiB).enable  # int8 fits
    assert not tb.weight_streaming_plan(fp16_weights, act, None).enable
    with pytest.raises(UserError, match="no room"):
        tb.weight_streaming_plan(fp16_weights, 8 * GiB, 8 * GiB)


def _manifest(tmp_path, engines, command="auraflow-edge build m -o e --backend tensorrt"):
    m = Manifest(tmp_path, {"engines": engines, "command": command})
    return m


def test_engine_selection_and_refusal(tmp_path):
    e = {
        "k1": {
            "gpu": "NVIDIA GeForce RTX 4060",
            "compute_capability": [8, 9],
            "tensorrt": "10.8.0",
            "hardware_compat": "none",
        }
    }
    m = _manifest(tmp_path, e)
    assert select_engine(m, "NVIDIA GeForce RTX 4060", (8, 9), "10.8.0")[0] == "k1"
    with pytest.raises(UserError, match="rebuild on this GPU") as err:
        select_engine(m, "NVIDIA GeForce RTX 3060", (8, 6), "10.8.0")
    assert "RTX 4060 sm_89 TensorRT 10.8.0" in str(err.value) and "--hardware-compat ampere+" in str(
        err.value
    )
    with pytest.raises(UserError, match="TensorRT 10.9"):
        select_engine(m, "NVIDIA GeForce RTX 4060", (8, 9), "10.9.0")
    hw = {
        "k2": {
            "gpu": "NVIDIA H100",
            "compute_capability": [9, 0],
            "tensorrt": "10.8.0",
            "hardware_compat": "ampere+",
        }
    }
    assert select_engine(_manifest(tmp_path, hw), "NVIDIA GeForce RTX 3060", (8, 6), "10.8.0")[0] == "k2"
    with pytest.raises(UserError):
        select_engine(_manifest(tmp_path, hw), "Tesla T4", (7, 5), "10.8.0")  # Turing is not ampere+
    with pytest.raises(UserError, match="no TensorRT engines"):
        select_engine(_manifest(tmp_path, {}), "x", (8, 9), "10.8.0")


@pytest.fixture(scope="module")
def trt_exports(tiny_dir, tmp_path_factory):
    """The ONNX the TensorRT builder would parse, per precision (and with the attention plugin)."""
    from auraflow_edge.export.build import export_onnx_folder

    out = {}
    for name, prec, plugin in [
        ("fp16", "fp16", False),
        ("bf16", "bf16", False),
        ("int8", "int8", False),
        ("int4", "int4", False),
        ("fp8", "fp8", False),
        ("plugin", "fp16", True),
    ]:
        d = tmp_path_factory.mktemp(name)
        out[name] = (
            d,
            export_onnx_folder(
                str(tiny_dir), d, "tensorrt", prec, 64, 96, 16, quiet=True, attention_plugin=plugin
            ),
        )
    return out


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8", "int4", "fp8", "plugin"])
def test_exported_graphs_use_only_tensorrt_ops(trt_exports, name):
    d, data = trt_exports[name]
    for comp in ("transformer", "text_encoder", "vae_decoder"):
        assert tb.unsupported_ops(d / data["components"][comp]["file"]) == []
    g = onnx.load(str(d / "transformer.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in g.node}
    if name in ("int8", "int4", "fp8"):
        assert "DequantizeLinear" in ops and "MatMulNBits" not in ops  # standard Q/DQ weights for TensorRT
    if name == "int4":
        blocked = [
            n
            for n in g.node
            if n.op_type == "DequantizeLinear" and any(a.name == "block_size" for a in n.attribute)
        ]
        assert blocked
    dt = {i.name: i.type.tensor_type.elem_type for i in g.input}
    want = {"bf16": onnx.TensorProto.BFLOAT16}.get(name, onnx.TensorProto.FLOAT16)
    assert dt["latents"] == want


def test_operator_check_catches_unsupported(tiny_dir, tmp_path):
    from auraflow_edge.export.build import build_engine

    e = build_engine(str(tiny_dir), tmp_path / "ort", precision="int8", height=64, width=96, quiet=True)
    assert tb.unsupported_ops(e / "transformer.onnx") == ["com.microsoft::DynamicQuantizeMatMul"]


def test_plugin_node_and_attributes(trt_exports, tiny_dir):
    from auraflow_edge.engine.checkpoint import open_model

    d, data = trt_exports["plugin"]
    cfg = open_model(tiny_dir).transformer_cfg
    m = onnx.load(str(d / "transformer.onnx"), load_external_data=False)
    nodes = [n for n in m.graph.node if n.domain == "auraflow_edge"]
    assert len(nodes) == cfg.num_mmdit_layers + cfg.num_single_dit_layers
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert (
        attrs["q_norm"] == 1
        and abs(attrs["scale"] - cfg.attention_head_dim**-0.5) < 1e-7
        and abs(attrs["eps"] - 1e-5) < 1e-9
    )
    assert nodes[0].op_type == "AuraFlowAttention" and len(nodes[0].input) == 3
    assert ("auraflow_edge", 1) in [(o.domain, o.version) for o in m.opset_import]
    assert "LayerNormalization" in {n.op_type for n in m.graph.node}  # K normalised by a standard op
    onnx.checker.check_model(str(d / "transformer.onnx"))  # schema registered


def test_plugin_attention_equals_reference(tiny_dir):
    from auraflow_edge.engine.checkpoint import open_model
    from auraflow_edge.engine.torch_backend import load_transformer
    from auraflow_edge.export import tensorrt_plugin

    mf = open_model(tiny_dir)
    ref = load_transformer(mf, torch.float32, torch.device("cpu"))
    plug = load_transformer(mf, torch.float32, torch.device("cpu"))
    tensorrt_plugin.install(plug)
    x, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 32), torch.tensor([0.3, 0.3])
    with torch.no_grad():
        torch.testing.assert_close(plug(x, c, timestep=t), ref(x, c, timestep=t), rtol=1e-5, atol=1e-5)


def test_build_without_tensorrt_is_a_clear_error(tiny_dir, tmp_path, capsys):
    if HAS_TRT:
        pytest.skip("TensorRT is installed here")
    from auraflow_edge.engine.cli import main

    rc = main(
        ["build", str(tiny_dir), "-o", str(tmp_path / "t"), "--backend", "tensorrt", "--precision", "fp16"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "TensorRT is not installed" in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT not installed (it cannot run on this project's machines)")
def test_tensorrt_build_and_generate(tiny_dir, tmp_path):  # pragma: no cover
    from auraflow_edge.engine.pipeline import Pipeline
    from auraflow_edge.export.build import build_engine

    e = build_engine(
        str(tiny_dir), tmp_path / "trt", backend="tensorrt", precision="fp16", height=64, width=96, quiet=True
    )
    img = Pipeline.load(e, backend="tensorrt")("a cat", steps=2, height=64, width=96)
    assert img.size == (96, 64)


def test_generate_on_tensorrt_without_tensorrt_is_a_clear_error(tiny_dir, tmp_path, capsys):
    if HAS_TRT:
        pytest.skip("TensorRT is installed here")
    from auraflow_edge.engine.cli import main
    from auraflow_edge.export.build import build_engine

    e = build_engine(str(tiny_dir), tmp_path / "e", precision="fp16", height=64, width=96, quiet=True)
    rc = main(
        [
            "generate",
            str(e),
            "--backend",
            "tensorrt",
            "--prompt",
            "x",
            "--height",
            "64",
            "--width",
            "96",
            "-o",
            str(tmp_path / "o.png"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "needs TensorRT" in err and not (tmp_path / "o.png").exists()
