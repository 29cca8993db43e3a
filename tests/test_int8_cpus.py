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


@pytest.fixture(scope="module")
def int8_nodes(engines, tmp_path_factory):
    """Every DynamicQuantizeMatMul of the int8 transformer: (activation, s8 weight, scale, ORT output),
    activations and outputs captured from one real run of the engine's graph."""
    m = Manifest.load(engines["int8"])
    model = onnx.load(str(m.path("transformer.onnx")))  # tiny: weights inline is fine
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert len(nodes) > 10
    names = [n.input[0] for n in nodes] + [n.output[0] for n in nodes]
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names))
    graph = tmp_path_factory.mktemp("int8_nodes") / "transformer.onnx"
    onnx.save(model, str(graph))
    # run as the runtime runs it here: the encoding MLAS multiplies exactly on this CPU
    sess = _session(graph, "cpu", None, int8_encoding())
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, _inputs(m))))
    out = []
    for n in nodes:
        a = got[n.input[0]]
        b = numpy_helper.to_array(inits[n.input[1]])
        s = numpy_helper.to_array(inits[n.input[2]])
        assert b.dtype == np.int8  # engines store s8: the fast encoding where it is exact
        out.append((n.name, a.reshape(-1, a.shape[-1]), b, s, got[n.output[0]].reshape(-1, b.shape[1])))
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
    for name, a, b, s, y in int8_nodes:
        for enc in ("s8", "u8"):
            qb, zp = encode_for(b, enc)
            got, clipped = emulate_matmul(a, qb, zp, s, saturating=False)
            assert clipped == 0
            np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4 * np.abs(y).max(), err_msg=name)


def _float64_reference(a, b, s):
    """The quantized product in float64: dequantized activations times dequantized weights, no
    integer kernel involved (exact for these sizes: every partial sum is an integer below 2**53)."""
    qa, sa, za = quantize_activations(a)
    return ((qa.astype(np.float64) - za) * sa) @ (b.astype(np.float64) * s.astype(np.float64)[None, :])


def test_every_cpu_class_computes_exactly_with_its_encoding(int8_nodes):
    for cls in CPU_CLASSES:
        enc = int8_encoding(cls.machine, set(cls.flags))
        for name, a, b, s, _ in int8_nodes:
            qb, zp = encode_for(b, enc)
            # u8 x s8 goes through the saturating int16 pair sums on these classes; u8 x u8 never does
            got, clipped = emulate_matmul(a, qb, zp, s, saturating=cls.saturating_u8s8 and enc == "s8")
            want = _float64_reference(a, b, s)
            assert clipped == 0, (cls.name, enc, name)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=cls.name)


def test_s8_weights_would_saturate_without_vnni(int8_nodes):
    """The emulation sees issue 14: the same weights and activations, kept s8 on an AVX2-only CPU."""
    clipped_total, worst = 0, 0.0
    for _, a, b, s, _ in int8_nodes:
        got, clipped = emulate_matmul(a, b.astype(np.int32), 0, s, saturating=True)
        exact = _float64_reference(a, b, s)
        clipped_total += clipped
        worst = max(worst, float(np.linalg.norm(got - exact) / np.linalg.norm(exact)))
    print(f"s8 on AVX2: {clipped_total} saturated pairs, worst layer rel L2 {worst:.3f}")
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
    for n in g.node:
        if n.op_type == "DynamicQuantizeMatMul":
            assert n.input[1].endswith("__u8") and n.input[3].endswith("__zp128")
    assert ort_int8.reencode_u8(Manifest.load(engines["fp32"]).path("transformer.onnx")) is None
