"""int8 ONNX Runtime engines on every CPU: MLAS's integer arithmetic emulated per CPU class over the
tiny model's real exported weights and activations (issue 14: s8 weights saturate vpmaddubsw's
int16 pair sums on x86-64 without VNNI)."""

import numpy as np
import onnx
import pytest
from conftest import GEN
from onnx import numpy_helper

from auraflow_edge.bench.mlas_emulator import CPU_CLASSES, emulate_matmul, encode_for, quantize_activations
from auraflow_edge.engine.backends import ort_int8
from auraflow_edge.engine.backends.ort_backend import _session
from auraflow_edge.engine.backends.ort_int8 import int8_encoding
from auraflow_edge.engine.model.config import AuraFlowConfig
from auraflow_edge.engine.runtime.manifest import Manifest
from auraflow_edge.engine.runtime.modulation import ModulationTable
from auraflow_edge.engine.runtime.pipeline import Pipeline
from auraflow_edge.engine.runtime.positions import PositionTable


def _inputs(m: Manifest):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 12), dtype=np.float32)
    c = rng.standard_normal((2, 256, 32), dtype=np.float32)
    c[:, 100:] = 0
    cfg = AuraFlowConfig(**m["transformer_config"])
    mod = ModulationTable(cfg, m.path("modulation.safetensors"))(np.array([0.8], np.float32))
    pos = PositionTable(cfg, m.path("positions.safetensors"))(8, 12)
    return {"latents": x, "context": c, "modulation": mod, "pos": pos}


def _blocks(m: Manifest) -> int:
    cfg = AuraFlowConfig(**m["transformer_config"])
    return cfg.num_mmdit_layers + cfg.num_single_dit_layers


@pytest.fixture(scope="module")
def int8_nodes(engines, tmp_path_factory):
    """Every integer product of the int8 transformer's DynamicQuantizeMatMuls, as (name, activation
    (M, K), int8 B (K, N), B scale (N,), ORT output (M, N), activation range): the linears (stored
    s8 weights) and the attention logits (Q against the K quantized in the graph, one product per
    batch and head, the activation range that of the whole Q). Activations, K and outputs are
    captured from one real run of the engine's graph."""
    m = Manifest.load(engines["int8"])
    model = onnx.load(str(m.path("transformer.onnx")))  # tiny: weights inline is fine
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    attn = [n for n in nodes if n.input[1] not in inits]
    assert len(nodes) - len(attn) > 10 and len(attn) == _blocks(m)  # one per attention
    names = [n.input[0] for n in nodes] + [n.output[0] for n in nodes]
    names += [x for n in attn for x in n.input[1:3]]
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names))
    graph = tmp_path_factory.mktemp("int8_nodes") / "transformer.onnx"
    onnx.save(model, str(graph))
    # run as the runtime runs it here: the encoding MLAS multiplies exactly on this CPU
    enc = int8_encoding()
    sess = _session(graph, "cpu", None, enc)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, _inputs(m))))
    out = []
    for n in nodes:
        a, y = got[n.input[0]], got[n.output[0]]
        act_range = (float(a.min()), float(a.max()))
        if n in attn:
            b, s = got[n.input[1]], got[n.input[2]]
            b = b.astype(np.int32) - (128 if enc == "u8" else 0)  # back to the int8 values
            assert s.size == 1 and np.abs(b).max() == 127  # symmetric, one scale for the tensor
            for i in np.ndindex(*a.shape[:-2]):  # (batch, head)
                bi = b[i].astype(np.int8)
                out.append((f"{n.name}{i}", a[i], bi, np.full(bi.shape[1], s, np.float32), y[i], act_range))
            continue
        b = numpy_helper.to_array(inits[n.input[1]])
        s = numpy_helper.to_array(inits[n.input[2]])
        assert b.dtype == np.int8  # engines store s8: the fast encoding where it is exact
        out.append((n.name, a.reshape(-1, a.shape[-1]), b, s, y.reshape(-1, b.shape[1]), act_range))
    return out


def test_encoding_choice_per_cpu():
    for cls in CPU_CLASSES:
        want = "u8" if cls.saturating_u8s8 else "s8"
        assert int8_encoding(cls.machine, set(cls.flags)) == want, cls.name
    assert int8_encoding("x86_64", set()) == "u8"  # flags unreadable: the encoding exact everywhere
    assert int8_encoding("arm64", set()) == "s8"


def test_emulator_reproduces_onnx_runtime_here(int8_nodes):
    """This machine's MLAS result (run with the encoding exact here) equals the emulated integer
    path: the emulator quantizes activations and corrects zero points as ONNX Runtime does."""
    for name, a, b, s, y, act_range in int8_nodes:
        for enc in ("s8", "u8"):
            qb, zp = encode_for(b, enc)
            got, clipped = emulate_matmul(a, qb, zp, s, saturating=False, act_range=act_range)
            assert clipped == 0
            np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4 * np.abs(y).max(), err_msg=name)


def _float64_reference(a, b, s, act_range):
    """The quantized product in float64: dequantized activations times dequantized weights, no
    integer kernel involved (exact for these sizes: every partial sum is an integer below 2**53)."""
    qa, sa, za = quantize_activations(a, act_range)
    return ((qa.astype(np.float64) - za) * sa) @ (b.astype(np.float64) * s.astype(np.float64)[None, :])


def test_every_cpu_class_computes_exactly_with_its_encoding(int8_nodes):
    for cls in CPU_CLASSES:
        enc = int8_encoding(cls.machine, set(cls.flags))
        for name, a, b, s, _, act_range in int8_nodes:
            qb, zp = encode_for(b, enc)
            # u8 x s8 goes through the saturating int16 pair sums on these classes; u8 x u8 never does
            sat = cls.saturating_u8s8 and enc == "s8"
            got, clipped = emulate_matmul(a, qb, zp, s, saturating=sat, act_range=act_range)
            want = _float64_reference(a, b, s, act_range)
            assert clipped == 0, (cls.name, enc, name)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=cls.name)


def test_s8_weights_would_saturate_without_vnni(int8_nodes):
    """The emulation sees issue 14: the same weights and activations, kept s8 on an AVX2-only CPU."""
    clipped_total, worst, attn_clipped = 0, 0.0, 0
    for name, a, b, s, _, act_range in int8_nodes:
        got, clipped = emulate_matmul(a, b.astype(np.int32), 0, s, saturating=True, act_range=act_range)
        exact = _float64_reference(a, b, s, act_range)
        clipped_total += clipped
        attn_clipped += clipped if "(" in name else 0
        worst = max(worst, float(np.linalg.norm(got - exact) / np.linalg.norm(exact)))
    print(
        f"s8 on AVX2: {clipped_total} saturated pairs ({attn_clipped} in attention), worst rel L2 {worst:.3f}"
    )
    assert clipped_total > 0 and worst > 0.01


def test_u8_reencoding_at_load_gives_the_same_engine_output(engines, tiny_noise):
    """Forcing the AVX2 encoding on this machine runs MLAS's u8 x u8 kernel: same result."""
    m = Manifest.load(engines["int8"])
    outs = {}
    for enc in ("s8", "u8"):
        sess = _session(m.path("transformer.onnx"), "cpu", None, enc)
        types = {i.name: i.type for i in sess.get_inputs()}
        assert set(types) == {"latents", "context", "modulation", "pos"}
        outs[enc] = sess.run(None, _inputs(m))[0]
    np.testing.assert_allclose(outs["u8"], outs["s8"], rtol=1e-5, atol=1e-5 * np.abs(outs["s8"]).max())
    imgs = {
        enc: np.asarray(
            Pipeline.load(engines["int8"], int8_weights=enc).generate(**GEN, noise=tiny_noise).image
        )
        for enc in ("s8", "u8")
    }
    assert np.abs(imgs["u8"].astype(int) - imgs["s8"].astype(int)).max() <= 1


def test_reencoding_touches_only_int8_dynamic_weights(engines):
    m = Manifest.load(engines["int8"])
    graph, arrays = ort_int8.reencode_u8(m.path("transformer.onnx"))
    assert arrays and all(a.dtype == np.uint8 for a in arrays.values())
    g = onnx.load_from_string(graph).graph
    inits = {t.name: t for t in g.initializer}
    attn = 0
    for n in g.node:
        if n.op_type == "DynamicQuantizeMatMul" and n.input[1] in inits:
            assert n.input[1].endswith("__u8") and n.input[3].endswith("__zp128")
        elif n.op_type == "DynamicQuantizeMatMul":  # attention logits: K quantized in the graph
            zp = numpy_helper.to_array(inits[n.input[3]])
            assert zp.dtype == np.uint8 and zp == 128
            attn += 1
    assert attn == _blocks(m)
    assert ort_int8.reencode_u8(Manifest.load(engines["fp32"]).path("transformer.onnx")) is None


def test_int8_attention_logits_against_float64(tmp_path):
    """The export's rewrite of Softmax(MatMul(Q, K^T)): ONNX Runtime's result equals the quantized
    logits computed in float64 (Q uint8 per tensor as DynamicQuantizeMatMul does it, K int8 with
    one symmetric scale), for both encodings; a MatMul not feeding a Softmax stays float."""
    from onnx import TensorProto, helper

    from auraflow_edge.export.onnx_export import int8_attention_logits

    shape = [2, 3, 40, 32]
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["o"]),
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in "qkv"]
    g = helper.make_graph(
        nodes, "attn", io, [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "po"]
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    assert int8_attention_logits(model.graph) == 1
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert [n.op_type for n in model.graph.node].count("MatMul") == 1  # P V stays float
    path = tmp_path / "attn.onnx"
    onnx.save(model, str(path))

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    k[..., 3] *= 5  # an outlier channel sets K's scale
    q, k = q * 32**-0.25, k * 32**-0.25  # the softmax scale sits in Q and K, as the export has it
    qa, sa, za = quantize_activations(q)
    sk = np.float32(np.abs(k).max()) / np.float32(127)
    qk = np.clip(np.rint(k / sk), -127, 127)
    logits = ((qa.astype(np.float64) - za) * sa) @ np.swapaxes(qk * np.float64(sk), -1, -2)
    want = np.exp(logits - logits.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    exact = np.exp(q.astype(np.float64) @ np.swapaxes(k, -1, -2))
    exact /= exact.sum(-1, keepdims=True)
    for enc in ("s8", "u8"):
        p, o = _session(path, "cpu", None, enc).run(None, {"q": q, "k": k, "v": v})
        np.testing.assert_allclose(p, want, rtol=1e-4, atol=1e-6, err_msg=enc)
        np.testing.assert_allclose(o, p @ v, rtol=1e-4, atol=1e-5)
        assert np.abs(p - exact).max() < 0.05, np.abs(p - exact).max()  # quantization error only
