"""The ONNX graphs TensorRT would parse (``--backend tensorrt``), exported once per precision and run
by ONNX Runtime on the CPU: TensorRT-only operators, the plugin node, and every graph's output
against fp32 references (our torch transformer, transformers' UMT5, diffusers' VAE) and, for the
quantized forms, against the same references with their weights quantized and dequantized in numpy.

ONNX Runtime has no CPU bf16 MatMul: the bf16 form runs with bf16 emulated (every bf16 tensor of
the graph computed in fp32 and rounded to bf16 by a Cast pair), and is compared to the fp16 form's
structure. TensorRT's own kernels (fused attention, its fp8/int4 GEMMs) are not what runs here.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from auraflow_edge.engine.backends.torch_backend import load_transformer
from auraflow_edge.engine.model import quant as qz
from auraflow_edge.engine.model.checkpoint import open_model
from auraflow_edge.engine.runtime.modulation import ModulationTable
from auraflow_edge.export import tensorrt_build as tb

FORMS = ["fp16", "bf16", "int8", "fp8", "int4"]
INT4_BLOCK = 16  # the tiny model's widths (32, 64) need a block below the default 64
# rel L2 against fp32 (transformer, text encoder), about twice what was measured on this model
# (2-core x86_64, onnxruntime 1.32, weight-only: activations stay fp16 / fp32):
# transformer fp16 5.0e-4, bf16 (emulated) 6.2e-3, int8 1.6e-3, fp8 4.7e-3, int4 2.1e-2;
# text encoder fp16 8.0e-4, bf16 7.9e-3, int8 9.6e-3, fp8 4.6e-2, int4 0.16 (its widths are 32 and
# 64: few terms per dot product to average the rounding away). Against the same model with
# dequantized weights the quantized graphs are within 5.4e-4 (transformer) and 2.7e-7 (text encoder).
BOUNDS = {
    "fp16": (1e-3, 1.6e-3),
    "bf16": (1.2e-2, 1.6e-2),
    "int8": (3.2e-3, 2e-2),
    "fp8": (1e-2, 9e-2),
    "int4": (4e-2, 0.3),
}
_QTYPES = {TensorProto.INT8: "int8", TensorProto.FLOAT8E4M3FN: "fp8", TensorProto.INT4: "int4"}


@pytest.fixture(scope="module")
def trt_exports(tiny_dir, tmp_path_factory):
    """The three TensorRT-form graphs per precision, and the fp16 transformer with the plugin node."""
    from auraflow_edge.export.onnx_folder import export_onnx_folder, export_transformer, policies

    out = {}
    for prec in FORMS:
        d = tmp_path_factory.mktemp(prec)
        out[prec] = (
            d,
            export_onnx_folder(str(tiny_dir), d, "tensorrt", prec, 64, 96, INT4_BLOCK, quiet=True),
        )
    d = tmp_path_factory.mktemp("plugin")
    pol = policies("fp16", "tensorrt", INT4_BLOCK)["transformer"]
    out["plugin"] = (
        d,
        {"components": export_transformer(open_model(tiny_dir), d, pol, 64, 96, attention_plugin=True)},
    )
    return out


@pytest.fixture(scope="module")
def inputs(tiny_dir, trt_exports):
    rng = np.random.default_rng(0)
    mf = open_model(tiny_dir)
    x = rng.standard_normal((2, 4, 8, 12), dtype=np.float32)
    c = rng.standard_normal((2, 256, 32), dtype=np.float32)
    c[:, 100:] = 0  # padded text positions arrive zeroed
    table = ModulationTable(mf.transformer_cfg, trt_exports["fp16"][0] / "modulation.safetensors")
    ids = np.zeros((1, 256), np.int64)
    ids[0, :20] = rng.integers(3, 100, 20)
    mask = (ids > 0).astype(np.int64)
    z = rng.standard_normal((1, 4, 8, 12), dtype=np.float32)
    out = {"x": x, "c": c, "mod": table(np.array([0.8], np.float32)), "ids": ids, "mask": mask, "z": z}
    positions = trt_exports["fp16"][0] / "positions.safetensors"
    if positions.exists():  # the positional crop as a graph input (engine/runtime/positions.py)
        from auraflow_edge.engine.runtime.positions import PositionTable

        out["pos"] = PositionTable(mf.transformer_cfg, positions)(8, 12)
    return out


def _session(model):
    """The graph as written. At ONNX Runtime's default level DequantizeLinear -> MatMul becomes
    MatMulNBits with int8-quantized activations (about 1% more error on int8 and int4 weights),
    which is ONNX Runtime's CPU kernel, not what the graph (or TensorRT's weight-only path) computes."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def bf16_emulated(path) -> onnx.ModelProto:
    """The graph with every bf16 tensor held in fp32: weights and constants widened exactly, Casts
    to bf16 made Casts to fp32, and each bf16 node output rounded to bf16 (round to nearest even)
    by a Cast pair, so the arithmetic is fp32 and every stored value is a bf16 value."""
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = m.graph
    bf16 = TensorProto.BFLOAT16
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}

    def widen(t):
        if t.data_type == bf16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    for t in g.initializer:
        widen(t)
    nodes = []
    for n in g.node:
        for a in n.attribute:
            if a.name == "to" and a.i == bf16:
                a.i = TensorProto.FLOAT
            if a.type == onnx.AttributeProto.TENSOR:
                widen(a.t)
        nodes.append(n)
        for j, o in enumerate(n.output):
            if types.get(o) == bf16:
                n.output[j] = o + "_fp32"
                nodes.append(helper.make_node("Cast", [o + "_fp32"], [o + "_bf16"], to=bf16))
                nodes.append(helper.make_node("Cast", [o + "_bf16"], [o], to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    for v in (*g.input, *g.output):
        if v.type.tensor_type.elem_type == bf16:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    return m


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _quantized(onnx_path) -> dict[str, tuple[str, np.dtype]]:
    """Parameter (torch name) -> (weight format, dtype the graph stores its scales in), read from
    the graph's quantized initializers."""
    g = onnx.load(str(onnx_path), load_external_data=False).graph
    types = {t.name: t.data_type for t in g.initializer}
    out = {}
    for name, dt in types.items():
        if name.endswith("_q") and dt in _QTYPES:
            base = name[: -len("_q")]
            scale = onnx.helper.tensor_dtype_to_np_dtype(types[base + "_scale"])
            out[base.removeprefix("m.")] = (_QTYPES[dt], scale)
    return out


def _dequantized(module, formats: dict) -> None:
    """Replace each listed weight by its numpy quantize -> dequantize round trip, with the scales
    rounded to the dtype the graph stores them in."""
    params = dict(module.named_parameters())
    assert formats and set(formats) <= set(params)
    quant = {
        "int8": qz.quantize_int8,
        "fp8": qz.quantize_fp8,
        "int4": lambda w: qz.quantize_int4(w, INT4_BLOCK),
    }
    for name, (fmt, scale_dtype) in formats.items():
        q, s = quant[fmt](params[name].detach().numpy())
        w = qz.dequantize(fmt, q, s.astype(scale_dtype).astype(np.float32), INT4_BLOCK)
        params[name].data = torch.from_numpy(w)


_T_FEED = {"latents": "x", "context": "c", "modulation": "mod", "pos": "pos"}


def _run_transformer(path, form, inp):
    import ml_dtypes

    s = _session(bf16_emulated(path) if form == "bf16" else path)
    # the emulated bf16 graph takes fp32 inputs holding bf16 values
    dt = (ml_dtypes.bfloat16, np.float32) if form == "bf16" else (np.float16,)
    feed = {}
    for i in s.get_inputs():
        feed[i.name] = inp[_T_FEED[i.name]]
        for t in dt:
            feed[i.name] = feed[i.name].astype(t)
    return s.run(None, feed)[0]


def _torch_transformer(tiny_dir, inp, formats=None):
    model = load_transformer(open_model(tiny_dir), torch.float32, torch.device("cpu"))
    if formats:
        _dequantized(model, formats)
    with torch.no_grad():
        x, c, mod = (torch.from_numpy(inp[k]) for k in ("x", "c", "mod"))
        return model(x, c, modulation=mod).numpy()


def _torch_text_encoder(tiny_dir, inp, formats=None):
    from transformers import UMT5EncoderModel

    te = UMT5EncoderModel.from_pretrained(tiny_dir / "text_encoder").eval()
    if formats:
        _dequantized(te, formats)
    ids, mask = torch.from_numpy(inp["ids"]), torch.from_numpy(inp["mask"])
    with torch.no_grad():
        return (te(input_ids=ids, attention_mask=mask)[0] * mask[..., None]).numpy()


@pytest.fixture(scope="module")
def fp32_outputs(tiny_dir, inputs):
    return {
        "transformer": _torch_transformer(tiny_dir, inputs),
        "text_encoder": _torch_text_encoder(tiny_dir, inputs),
    }


@pytest.mark.parametrize("name", [*FORMS, "plugin"])
def test_exported_graphs_use_only_tensorrt_ops(trt_exports, name):
    d, data = trt_exports[name]
    for comp in data["components"].values():
        if comp.get("file", "").endswith(".onnx"):
            assert tb.unsupported_ops(d / comp["file"]) == []
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
    want = {"bf16": TensorProto.BFLOAT16}.get(name, TensorProto.FLOAT16)
    assert dt["latents"] == want


def test_plugin_node_and_attributes(trt_exports, tiny_dir):
    d, _ = trt_exports["plugin"]
    cfg = open_model(tiny_dir).transformer_cfg
    m = onnx.load(str(d / "transformer.onnx"), load_external_data=False)
    nodes = [n for n in m.graph.node if n.domain == "auraflow_edge"]
    assert len(nodes) == cfg.num_mmdit_layers + cfg.num_single_dit_layers
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    # one float array: TensorRT hands an AOT implementation its attributes by position
    assert set(attrs) == {"params", "plugin_namespace", "aot"}
    eps, scale, q_norm = attrs["params"]
    assert q_norm == 1 and abs(scale - cfg.attention_head_dim**-0.5) < 1e-7 and abs(eps - 1e-5) < 1e-9
    # TensorRT's ONNX parser: op type = plugin name, plugin_namespace names its namespace, aot=1
    # selects the ahead-of-time implementation
    assert attrs["plugin_namespace"] == b"auraflow_edge" and attrs["aot"] == 1
    assert nodes[0].op_type == "AuraFlowAttention" and len(nodes[0].input) == 3
    assert ("auraflow_edge", 1) in [(o.domain, o.version) for o in m.opset_import]
    assert "LayerNormalization" in {n.op_type for n in m.graph.node}  # K normalised by a standard op
    onnx.checker.check_model(str(d / "transformer.onnx"))  # schema registered, attributes included


@pytest.mark.parametrize("form", FORMS)
def test_transformer_graph_against_fp32(form, trt_exports, inputs, fp32_outputs):
    got = _run_transformer(trt_exports[form][0] / "transformer.onnx", form, inputs)
    rel = _rel(got, fp32_outputs["transformer"])
    print(f"{form} transformer rel L2 {rel:.2e}")
    assert np.isfinite(got).all() and 1e-5 < rel < BOUNDS[form][0], rel


@pytest.mark.parametrize("form", FORMS)
def test_text_encoder_graph_against_fp32(form, trt_exports, inputs, fp32_outputs):
    path = trt_exports[form][0] / "text_encoder.onnx"
    s = _session(bf16_emulated(path) if form == "bf16" else path)
    got = s.run(None, {"input_ids": inputs["ids"], "attention_mask": inputs["mask"]})[0]
    rel = _rel(got, fp32_outputs["text_encoder"])
    print(f"{form} text encoder rel L2 {rel:.2e}")
    assert 1e-5 < rel < BOUNDS[form][1], rel
    assert not got[0, inputs["mask"][0] == 0].any()  # pad positions exactly zero


@pytest.mark.parametrize("form", ["int8", "fp8", "int4"])
def test_quantized_graphs_compute_the_dequantized_model(form, trt_exports, tiny_dir, inputs):
    """The Q/DQ graphs equal the fp32 model with the same weights quantized and dequantized in
    numpy: what remains is the transformer's fp16 activations, and fp32 rounding in the text
    encoder. A scale on the wrong axis or a wrong int4 packing is far outside these bounds."""
    d = trt_exports[form][0]
    tq = _quantized(d / "transformer.onnx")
    assert {f for f, _ in tq.values()} == {form}
    assert not any(k in n for n in tq for k in ("pos_embed.proj", "proj_out"))  # kept in float
    got = _run_transformer(d / "transformer.onnx", form, inputs)
    rel_t = _rel(got, _torch_transformer(tiny_dir, inputs, tq))
    feed = {"input_ids": inputs["ids"], "attention_mask": inputs["mask"]}
    got = _session(d / "text_encoder.onnx").run(None, feed)[0]
    rel_e = _rel(got, _torch_text_encoder(tiny_dir, inputs, _quantized(d / "text_encoder.onnx")))
    print(f"{form}: transformer {rel_t:.2e}, text encoder {rel_e:.2e} from the dequantized model")
    assert rel_t < 1e-3 and rel_e < 1e-5, (rel_t, rel_e)


def test_vae_graph_is_fp32_in_every_form(trt_exports, tiny_dir, inputs):
    from diffusers import AutoencoderKL

    files = {form: (trt_exports[form][0] / "vae_decoder.onnx").read_bytes() for form in FORMS}
    assert len(set(files.values())) == 1  # the SDXL VAE overflows in fp16: fp32 whatever the precision
    vae = AutoencoderKL.from_pretrained(tiny_dir / "vae").eval()
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(inputs["z"])).sample.numpy()
    got = _session(trt_exports["fp16"][0] / "vae_decoder.onnx").run(None, {"latents": inputs["z"]})[0]
    assert _rel(got, want) < 1e-5


def test_bf16_graph_is_the_fp16_graph_in_bf16(trt_exports):
    """Same operators in the same order, same weights; every fp16 tensor type is bf16 instead."""
    graphs = {
        f: onnx.load(str(trt_exports[f][0] / "transformer.onnx"), load_external_data=False).graph
        for f in ("fp16", "bf16")
    }
    assert [n.op_type for n in graphs["fp16"].node] == [n.op_type for n in graphs["bf16"].node]
    inits = {f: {t.name: (t.data_type, tuple(t.dims)) for t in g.initializer} for f, g in graphs.items()}
    assert inits["fp16"].keys() == inits["bf16"].keys()
    for name, (dt, dims) in inits["fp16"].items():
        want = TensorProto.BFLOAT16 if dt == TensorProto.FLOAT16 else dt
        assert inits["bf16"][name] == (want, dims), name
    casts = {
        f: [a.i for n in g.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
        for f, g in graphs.items()
    }
    assert [TensorProto.BFLOAT16 if t == TensorProto.FLOAT16 else t for t in casts["fp16"]] == casts["bf16"]
    assert TensorProto.FLOAT16 not in casts["bf16"]
