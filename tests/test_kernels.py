"""Triton kernels against float64 references (small, odd shapes).

In the suite they run in Triton's CPU interpreter on CPU tensors: fp32, fp16, int8 and fp8 (the
interpreter's bf16 dot is broken, so bf16 attention is skipped there). With TRITON_INTERPRET=0 on a
CUDA machine (bench/gpu_check.sh) the same tests run the compiled kernels on the GPU, bf16 included.
Outputs are allocated by the launchers with torch.empty; the tests additionally poison the
allocator's memory so unwritten elements would show as NaN/garbage.
"""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton compiles anything (conftest does too)

from auraflow_edge.kernels import attention as att  # noqa: E402
from auraflow_edge.kernels import gemm, norm_modulate  # noqa: E402

ON_GPU = os.environ["TRITON_INTERPRET"] != "1"
DEV = "cuda" if ON_GPU else "cpu"
if ON_GPU and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and torch sees no CUDA device", allow_module_level=True)
GPU_ONLY = pytest.mark.skipif(not ON_GPU, reason="the interpreter's bf16 dot is wrong; runs on a GPU")
SM89 = pytest.mark.skipif(
    ON_GPU and torch.cuda.get_device_capability() < (8, 9), reason="fp8 needs an sm_89+ GPU"
)
pytestmark = pytest.mark.skipif(att.triton is None, reason="triton not installed")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """torch.empty -> NaN-filled (or -128 for ints), so any element a kernel fails to write is visible."""
    real = torch.empty

    def empty(*a, **k):
        t = real(*a, **k)
        if t.dtype.is_floating_point and t.dtype not in (torch.float8_e4m3fn,):
            t.fill_(float("nan"))
        elif t.dtype in (torch.int8, torch.int32):
            t.fill_(-128 if t.dtype == torch.int8 else -(2**30))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(
        torch,
        "empty_like",
        lambda x, **k: empty(x.shape, dtype=k.get("dtype", x.dtype), device=k.get("device", x.device)),
    )


def _qkv(b, h, nq, nk, d, dtype, gen):
    q = (torch.randn(b, h, nq, d, generator=gen) * 2 + 0.7).to(dtype)
    k = (torch.randn(b, h, nk, d, generator=gen) * 3 - 0.4).to(dtype)
    k = k + (torch.randn(1, 1, 1, d, generator=gen) * 4).to(dtype)  # a large per-channel bias in K
    v = torch.randn(b, h, nk, d, generator=gen).to(dtype)
    return q.to(DEV), k.to(DEV), v.to(DEV)


@pytest.mark.parametrize(
    "dtype,tol",
    [(torch.float32, 1e-5), (torch.float16, 2e-3), pytest.param(torch.bfloat16, 2e-2, marks=GPU_ONLY)],
)
@pytest.mark.parametrize(
    "shape", [(1, 2, 37, 37, 64), (2, 1, 70, 45, 128), (1, 2, 69, 69, 256), (1, 1, 5, 9, 96)]
)
def test_attention_matches_float64(dtype, tol, shape):
    b, h, nq, nk, d = shape
    q, k, v = _qkv(b, h, nq, nk, d, dtype, torch.Generator().manual_seed(d + nq))
    o = att.attention(q, k, v)
    ref = att.attention_reference(q.double(), k.double(), v.double())
    assert o.shape == q.shape and o.dtype == dtype
    assert torch.isfinite(o).all()
    assert (o.double() - ref).abs().max().item() < tol


def test_attention_without_qk_norm():
    q, k, v = _qkv(1, 2, 33, 40, 64, torch.float32, torch.Generator().manual_seed(3))
    o = att.attention(q * 0.1, k * 0.1, v, qk_norm=False)
    ref = att.attention_reference(q.double() * 0.1, k.double() * 0.1, v.double(), qk_norm=False)
    assert (o.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("d", [64, 128, 256])
def test_int8_qk_attention(d):
    q, k, v = _qkv(1, 2, 77, 77, d, torch.float16, torch.Generator().manual_seed(d))
    o = att.attention(q, k, v, qk_int8=True)
    ref = att.attention_reference(q.double(), k.double(), v.double())
    assert torch.isfinite(o).all()
    cos = torch.nn.functional.cosine_similarity(o.double().flatten(), ref.flatten(), dim=0).item()
    rel_l1 = ((o.double() - ref).abs().sum() / ref.abs().sum()).item()
    assert cos > 0.999 and rel_l1 < 3e-2, (cos, rel_l1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_norm_modulate(dtype, residual):
    g = torch.Generator().manual_seed(1)
    b, n, d = 2, 13, 96

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEV)

    x = rnd(b, n, d)
    res = rnd(b, n, d) if residual else None
    gate = rnd(b, d) if residual else None
    scale, shift = rnd(b, d) * 3, rnd(b, d)
    y = norm_modulate.norm_modulate(x, scale, shift, res=res, gate=gate)
    ref = norm_modulate.norm_modulate_reference(
        x.double(),
        scale.double(),
        shift.double(),
        res=None if res is None else res.double(),
        gate=None if gate is None else gate.double(),
    )
    # fp16/bf16: within one unit in the last place of the output (an absolute bound cannot be)
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps * ref.abs() + 1e-4
    assert y.dtype == dtype and ((y.double() - ref).abs() <= tol).all()


def test_norm_modulate_int8_output():
    g = torch.Generator().manual_seed(2)
    x, res = torch.randn(1, 21, 80, generator=g).to(DEV), torch.randn(1, 21, 80, generator=g).to(DEV)
    gate, scale, shift = (torch.randn(1, 80, generator=g).to(DEV) for _ in range(3))
    q, s = norm_modulate.norm_modulate(x, scale, shift, res=res, gate=gate, quant="int8")
    y = norm_modulate.norm_modulate_reference(
        x.double(), scale.double(), shift.double(), res=res.double(), gate=gate.double()
    )
    assert q.dtype == torch.int8 and s.shape == (1, 21)
    assert ((q.double() * s.double()[..., None]) - y).abs().max().item() <= s.max().item() * 0.5 + 1e-6
    rq, rs = norm_modulate.quantize_rows_reference(y, "int8")
    assert torch.allclose(s.double(), rs.double(), rtol=1e-5) and (q.int() - rq.int()).abs().max().item() <= 1


@pytest.mark.parametrize("swiglu", [False, True])
def test_w8a8_int8_gemm(swiglu):
    g = torch.Generator().manual_seed(4)
    m, k, n = 37, 96, 72
    a_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEV)
    w_q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEV)
    a_s, w_s = (torch.rand(m, generator=g) * 0.01).to(DEV), (torch.rand(n, generator=g) * 0.01).to(DEV)
    kw = {}
    if swiglu:
        kw = dict(
            w2_q=torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEV),
            w2_s=(torch.rand(n, generator=g) * 0.01).to(DEV),
        )
    c = gemm.scaled_mm(
        a_q, a_s, w_q, w_s, out_dtype=torch.float32, blocks=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32), **kw
    )
    ref = gemm.scaled_mm_reference(a_q, a_s, w_q, w_s, out_dtype=torch.float64, **kw)
    assert (c.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


@SM89
def test_w8a8_fp8_gemm():
    g = torch.Generator().manual_seed(5)
    m, k, n = 19, 64, 40
    a_q = (torch.randn(m, k, generator=g) * 50).to(torch.float8_e4m3fn).to(DEV)
    w_q = (torch.randn(n, k, generator=g) * 50).to(torch.float8_e4m3fn).to(DEV)
    a_s, w_s = torch.rand(m, generator=g).to(DEV), torch.rand(n, generator=g).to(DEV)
    c = gemm.scaled_mm(
        a_q, a_s, w_q, w_s, out_dtype=torch.float32, blocks=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    )
    ref = gemm.scaled_mm_reference(a_q, a_s, w_q, w_s, out_dtype=torch.float64)
    assert (c.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("int4", [False, True])
def test_weight_only_gemm(int4):
    g = torch.Generator().manual_seed(6)
    m, k, n, blk = 23, 128, 48, 32
    a = torch.randn(m, k, generator=g).half().to(DEV)
    if int4:
        q = torch.randint(-7, 8, (n, k), generator=g)
        w_q, w_s = gemm.pack_int4_rows(q), torch.rand(n, k // blk, generator=g) * 0.05
        assert torch.equal(gemm.dequant_weight(w_q, w_s, blk), q.float() * w_s.repeat_interleave(blk, 1))
        w_q, w_s = w_q.to(DEV), w_s.to(DEV)
    else:
        w_q, w_s = (
            torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEV),
            (torch.rand(n, generator=g) * 0.01).to(DEV),
        )
    c = gemm.weight_only_mm(
        a, w_q, w_s, blk if int4 else None, blocks=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)
    )
    ref = gemm.weight_only_mm_reference(a.double(), w_q, w_s, blk if int4 else None)
    assert (c.double() - ref.double()).abs().max().item() < 2e-3 * max(1.0, ref.abs().max().item())
