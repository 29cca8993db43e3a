"""Quantized torch backend: reference path vs fp32, and the Triton kernel path (interpreter) vs reference."""

import numpy as np
import pytest
import torch
from conftest import GEN

from auraflow_edge.engine.backends.torch_backend import load_transformer
from auraflow_edge.engine.backends.torch_quant import (
    QuantizedLinear,
    _install_kernels,
    load_quantized_transformer,
)
from auraflow_edge.engine.model.checkpoint import open_model
from auraflow_edge.engine.runtime.modulation import ModulationTable
from auraflow_edge.engine.runtime.pipeline import Pipeline


def _inputs(mf):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 20, 32, generator=g)
    mod = torch.from_numpy(
        ModulationTable(mf.transformer_cfg, read=mf.weights.read)(np.array([0.7], np.float32))
    )
    return x, c, mod


@pytest.mark.parametrize("fmt,max_rel", [("int8", 1.5e-2), ("fp8", 3e-2), ("int4", 3e-2)])
def test_quantized_reference_path_close_to_fp32(tiny_dir, fmt, max_rel):
    mf = open_model(tiny_dir)
    x, c, mod = _inputs(mf)
    ref = load_transformer(mf, torch.float32, torch.device("cpu"))
    q = load_quantized_transformer(mf, fmt, torch.device("cpu"), torch.float32, int4_block=16)
    assert any(isinstance(m, QuantizedLinear) for m in q.modules())
    assert all(
        not p.is_meta
        for n, p in q.named_parameters()
        if "norm1" not in n and "norm_out" not in n and "time_step" not in n
    )
    with torch.no_grad():
        a, b = q(x, c, modulation=mod), ref(x, c, modulation=mod)
    rel = ((a - b).norm() / b.norm()).item()
    assert 1e-5 < rel < max_rel, rel


INTERP_FP8 = pytest.mark.skip(
    reason="Triton's CPU interpreter rounds fp32->fp8 wrongly at binade edges (124.3 -> 64, measured); "
    "the fp8 kernel path runs on a GPU in bench/gpu_check.sh"
)


@pytest.mark.parametrize("fmt", ["int8", pytest.param("fp8", marks=INTERP_FP8), "int4"])
def test_kernel_path_matches_reference_path(tiny_dir, fmt):
    """The swapped-in Triton GEMMs, attention and norm-modulate (CPU interpreter) vs the reference ops."""
    mf = open_model(tiny_dir)
    x, c, mod = _inputs(mf)
    ref = load_quantized_transformer(mf, fmt, torch.device("cpu"), torch.float32, int4_block=16)
    ker = load_quantized_transformer(mf, fmt, torch.device("cpu"), torch.float32, int4_block=16)
    for m in ker.modules():
        if isinstance(m, QuantizedLinear):
            m.use_kernels = True
    _install_kernels(ker, qk_int8=False)
    with torch.no_grad():
        a, b = ker(x, c, modulation=mod), ref(x, c, modulation=mod)
    assert torch.isfinite(a).all()
    assert ((a - b).norm() / b.norm()).item() < 2e-3


def test_generate_with_quantized_torch_backend(tiny_dir, tiny_noise):
    ref = Pipeline.load(tiny_dir).generate(**GEN, noise=tiny_noise)
    res = Pipeline.load(tiny_dir, precision="int8").generate(**GEN, noise=tiny_noise)
    mse = np.mean((np.asarray(res.image, float) - np.asarray(ref.image, float)) ** 2)
    assert 0 < mse and 10 * np.log10(255**2 / mse) > 45
    assert res.parameters["precision"] == "int8"


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_torch_and_numpy_quantizers_agree(fmt):
    from auraflow_edge.engine.backends.torch_quant import quantize_weight
    from auraflow_edge.engine.model import quant as qz
    from auraflow_edge.kernels.gemm import dequant_weight

    w = np.random.default_rng(1).standard_normal((48, 128)).astype(np.float32) * np.exp(
        np.random.default_rng(2).standard_normal((48, 1))
    )
    tq, ts = quantize_weight(torch.from_numpy(w), fmt, 32)
    if fmt == "int4":
        nq, ns = qz.quantize_int4(w, 32)
        np.testing.assert_allclose(
            dequant_weight(tq, ts, 32).numpy(), qz.dequantize("int4", nq, ns, 32), rtol=1e-6
        )
    else:
        nq, ns = (qz.quantize_fp8 if fmt == "fp8" else qz.quantize_int8)(w)
        np.testing.assert_allclose(ts.numpy(), ns, rtol=1e-6)
        np.testing.assert_array_equal(tq.float().numpy(), nq.astype(np.float32))


def test_quantized_torch_on_the_cpu_points_to_the_onnx_runtime_engine(tiny_dir, monkeypatch):
    from auraflow_edge.engine.backends import cpu

    lines = []
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_vnni"})
    fp32 = Pipeline.load(tiny_dir, precision="fp32", device="cpu")
    assert "hint" not in fp32.info
    # where torch multiplies bf16 natively, fp32 users hear of bf16
    for flags in ({"avx512f", "amx_bf16", "amx_tile"}, {"avx512f", "avx512_bf16"}):
        monkeypatch.setattr(cpu, "cpu_flags", lambda flags=flags: flags)
        assert "--precision bf16" in Pipeline.load(tiny_dir, precision="fp32", device="cpu").info["hint"]
    assert not cpu.native_bf16({"avx2", "fma"}) and not cpu.native_bf16(set())
    pipe = Pipeline.load(tiny_dir, precision="int8", device="cpu")
    (res,) = pipe.generate_many(["a cat"], steps=1, height=64, width=64, announce=lines.append)
    assert any(line.startswith("hint: int8 on the torch backend is slow on the CPU") for line in lines)
    assert "auraflow-edge build MODEL -o ENGINE --precision int8" in pipe.info["hint"]
    assert "hint" not in res.parameters  # a line for the user, not a generation parameter
