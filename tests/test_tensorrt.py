"""TensorRT: everything that runs without TensorRT (profiles, keys, refusal, weight streaming,
the operator check, the plugin's kernel and AOT argument packing against a fake ``tensorrt.plugin``,
the engine's numpy dtypes against a fake ``tensorrt``). Tests that need TensorRT are skipped when
it is absent; the exported graphs are in test_trt_graphs.py."""

import enum
import importlib.util
import json
import os
import subprocess
import sys
import types

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from auraflow_edge.engine.backends.tensorrt_backend import numpy_dtype, select_engine
from auraflow_edge.engine.errors import UserError
from auraflow_edge.engine.model.config import AURAFLOW_V02, AURAFLOW_V03
from auraflow_edge.engine.runtime.manifest import Manifest
from auraflow_edge.export import tensorrt_build as tb
from auraflow_edge.export import tensorrt_plugin as tp

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
    (v,) = tb.vae_profiles(AURAFLOW_V03, [(768, 1344)], True)
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


def test_operator_check_catches_unsupported(tiny_dir, tmp_path):
    from auraflow_edge.export.build import build_engine

    e = build_engine(str(tiny_dir), tmp_path / "ort", precision="int8", height=64, width=96, quiet=True)
    assert tb.unsupported_ops(e / "transformer.onnx") == ["com.microsoft::DynamicQuantizeMatMul"]


def test_plugin_attention_equals_reference(tiny_dir):
    from diffusers import AuraFlowTransformer2DModel

    from auraflow_edge.engine.backends.torch_backend import load_transformer
    from auraflow_edge.engine.model.checkpoint import open_model
    from auraflow_edge.export import tensorrt_plugin

    mf = open_model(tiny_dir)
    plug = load_transformer(mf, torch.float32, torch.device("cpu"))
    tensorrt_plugin.install(plug)
    ref = AuraFlowTransformer2DModel.from_pretrained(tiny_dir / "transformer").eval()  # independent
    x, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 32), torch.tensor([0.3, 0.3])
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=c, timestep=t).sample
        torch.testing.assert_close(plug(x, c, timestep=t), want, rtol=1e-5, atol=1e-5)


def test_build_without_tensorrt_is_a_clear_error(tiny_dir, tmp_path, capsys):
    if HAS_TRT:
        pytest.skip("TensorRT is installed here")
    from auraflow_edge.engine.cli.main import main

    rc = main(
        ["build", str(tiny_dir), "-o", str(tmp_path / "t"), "--backend", "tensorrt", "--precision", "fp16"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "TensorRT is not installed" in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


@pytest.mark.skipif(not HAS_TRT, reason="TensorRT not installed (it cannot run on this project's machines)")
def test_tensorrt_build_and_generate(tiny_dir, tmp_path):  # pragma: no cover
    from auraflow_edge.engine.runtime.pipeline import Pipeline
    from auraflow_edge.export.build import build_engine

    e = build_engine(
        str(tiny_dir), tmp_path / "trt", backend="tensorrt", precision="fp16", height=64, width=96, quiet=True
    )
    img = Pipeline.load(e, backend="tensorrt")("a cat", steps=2, height=64, width=96)
    assert img.size == (96, 64)


def test_generate_on_tensorrt_without_tensorrt_is_a_clear_error(tiny_dir, tmp_path, capsys):
    if HAS_TRT:
        pytest.skip("TensorRT is installed here")
    from auraflow_edge.engine.cli.main import main
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


class _DataType(enum.Enum):  # the members of tensorrt.DataType the code looks up
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BF16 = 7
    INT64 = 8
    FP8 = 9


def _nptype(dt):  # tensorrt.nptype: numpy has no bf16 / fp8, and TensorRT says so with a TypeError
    table = {_DataType.FLOAT: np.float32, _DataType.HALF: np.float16, _DataType.INT8: np.int8}
    table |= {_DataType.INT32: np.int32, _DataType.INT64: np.int64}
    if dt not in table:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return table[dt]


FAKE_TRT = types.SimpleNamespace(DataType=_DataType, nptype=_nptype)


def test_engine_output_dtypes_follow_the_engine():
    assert numpy_dtype(FAKE_TRT, _DataType.BF16) == np.dtype(ml_dtypes.bfloat16)
    assert numpy_dtype(FAKE_TRT, _DataType.HALF) == np.float16
    assert numpy_dtype(FAKE_TRT, _DataType.FLOAT) == np.float32
    assert numpy_dtype(FAKE_TRT, _DataType.INT64) == np.int64
    with pytest.raises(UserError, match="no numpy equivalent"):
        numpy_dtype(FAKE_TRT, _DataType.FP8)
    # a bf16 engine's bytes read back as bf16 are the values, read as float32 they are not
    out = np.array([1.5, -2.25, 3.0, 0.125], ml_dtypes.bfloat16)
    back = np.frombuffer(out.tobytes(), numpy_dtype(FAKE_TRT, _DataType.BF16))
    np.testing.assert_array_equal(back.astype(np.float32), [1.5, -2.25, 3.0, 0.125])


def test_plugin_kernel_follows_the_tensor_dtype():
    assert tp.kernel_dtype(FAKE_TRT, _DataType.HALF) == "fp16"
    assert tp.kernel_dtype(FAKE_TRT, _DataType.BF16) == "bf16"
    assert tp.kernel_dtype(FAKE_TRT, _DataType.FLOAT) == "fp32"
    with pytest.raises(UserError, match="fp16, bf16 and fp32"):
        tp.kernel_dtype(FAKE_TRT, _DataType.INT8)


def test_plugin_kernel_signature_is_tensorrts_calling_convention():
    """Input pointers, then int32 scalars, then the output pointer; scale and eps compiled in."""
    from auraflow_edge.kernels.attention import LOG2E

    sig, const, warps, stages, bm = tp.plugin_kernel(256, "bf16", 1e-5, 1 / 16, 0)
    assert list(sig.items()) == [
        ("Q", "*bf16"), ("K", "*bf16"), ("V", "*bf16"), ("H", "i32"), ("N_Q", "i32"), ("N_K", "i32"), ("Out", "*bf16"),
    ]  # fmt: skip
    assert list(sig) == [a for a in tp._attn_trt.arg_names if a in sig]  # the kernel's own order
    assert set(const) | set(sig) == set(tp._attn_trt.arg_names)
    assert const["QK_SCALE"] == pytest.approx(LOG2E / 16) and const["EPS"] == 1e-5
    assert const["Q_NORM"] is False and const["BLOCK_D"] == 256 and const["IEEE"] is False
    assert bm == const["BLOCK_M"] and warps * 32 <= 1024
    assert tp.plugin_kernel(64, "fp32", 1e-6, 0.125, 1)[1]["IEEE"] is True
    with pytest.raises(UserError, match="power-of-two head_dim"):
        tp.plugin_kernel(96, "fp16", 1e-5, 0.1, 1)


@pytest.mark.parametrize("q_norm, nq, nk", [(1, 40, 24), (0, 33, 33)])
def test_plugin_wrapper_kernel_equals_the_attention_reference(q_norm, nq, nk):
    """``_attn_trt`` in the Triton interpreter (fp16: the interpreter's bf16 dot is wrong) against
    the plugin's reference: softmax(LN?(q) k^T scale) v with K already normalised."""
    import triton

    from auraflow_edge.kernels.attention import attention_reference

    g = torch.Generator().manual_seed(q_norm)
    b, h, d, eps, scale = 2, 3, 64, 1e-5, 0.3
    q = (torch.randn(b, h, nq, d, generator=g) * 2 + 0.5).half()
    k = F.layer_norm(torch.randn(b, h, nk, d, generator=g), (d,)).half()
    v = torch.randn(b, h, nk, d, generator=g).half()
    _, const, warps, stages, bm = tp.plugin_kernel(d, "fp16", eps, scale, q_norm)
    out = torch.full_like(q, float("nan"))  # poisoned: an unwritten element fails
    tp._attn_trt[(triton.cdiv(nq, bm), b * h)](q, k, v, h, nq, nk, out, **const, num_warps=warps)
    qn = F.layer_norm(q.double(), (d,), eps=eps) if q_norm else q.double()
    want = attention_reference(qn, k.double(), v.double(), qk_norm=False, scale=scale)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=4e-3)


_AOT_SCRIPT = r"""
import enum, json, re, sys, types
from auraflow_edge.export import tensorrt_plugin as tp

class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    BF16 = 7

class Expr:  # a ShapeExpr: symbolic unless constant, constant_value() only when constant
    def __init__(self, v, const=False):
        self.v, self.is_constant = v, const
    def constant_value(self):
        if not self.is_constant:
            raise RuntimeError("not a build-time constant")
        return self.v
    def __mul__(self, o):
        return Expr(["mul", self.v, o.v])

class Launch:
    pass

trtp = types.SimpleNamespace(
    KernelLaunchParams=Launch,
    cdiv=lambda a, b: ["cdiv", a.v, b],
    SymInt32=lambda e: ["i32", e.v],
    SymIntExprs=types.SimpleNamespace(from_tuple=list),
)
trt = types.SimpleNamespace(DataType=DataType)
out = {}
for name in ("HALF", "BF16"):
    q = types.SimpleNamespace(dtype=DataType[name], shape_expr=[Expr("B"), Expr("H"), Expr("NQ"), Expr(64, True)])
    k = types.SimpleNamespace(dtype=DataType[name], shape_expr=[Expr("B"), Expr("H"), Expr("NK"), Expr(64, True)])
    kname, ptx, launch, extra = tp.aot_impl(trt, trtp, 86, q, k, 1e-5, 0.125, 1)
    ptx = ptx.decode()
    entry = ptx[ptx.index(".entry"):]
    entry = entry[: entry.index(")")]
    out[name] = dict(
        name=kname.decode(), params=re.findall(r"\.param \.(\w+)", entry),
        grid_x=launch.grid_x, grid_y=launch.grid_y.v, block_x=launch.block_x, shared=launch.shared_mem,
        extra=extra, cp_async="cp.async" in ptx, bf16_mma=bool(re.search(r"mma\.sync\S*bf16", ptx)),
        f16_mma=bool(re.search(r"mma\.sync\S*f16\.f16", ptx)),
    )
q.shape_expr[3] = Expr("D")
try:
    tp.aot_impl(trt, trtp, 86, q, k, 1e-5, 0.125, 1)
except Exception as e:
    out["dynamic_d"] = str(e)
print(json.dumps(out))
"""


def test_plugin_aot_impl_packs_tensorrt_arguments():
    """aot_impl against a fake ``tensorrt.plugin``: a real compile for sm_86 (a fresh process
    without TRITON_INTERPRET), checked in its PTX: parameters in TensorRT's order, cp.async
    pipelining (aligned pointers), the kernel of the tensor's dtype; launch and extra arguments as
    symbolic expressions of the input shapes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    _, const, warps, _, bm = tp.plugin_kernel(64, "fp16", 1e-5, 0.125, 1)
    for name in ("HALF", "BF16"):
        got = res[name]
        assert got["name"] == "_attn_trt"
        # exactly Q, K, V, then H, N_Q, N_K, then Out: Triton's scratch pointers are cut off
        assert got["params"] == ["u64", "u64", "u64", "u32", "u32", "u32", "u64"]
        assert got["grid_x"] == ["cdiv", "NQ", bm] and got["grid_y"] == ["mul", "B", "H"]
        assert got["block_x"] == warps * 32 and 0 < got["shared"] <= tp.SHARED_LIMIT
        assert got["extra"] == [["i32", "H"], ["i32", "NQ"], ["i32", "NK"]]
        assert got["cp_async"]
    assert res["HALF"]["f16_mma"] and not res["HALF"]["bf16_mma"]
    assert res["BF16"]["bf16_mma"] and not res["BF16"]["f16_mma"]
    assert "static head_dim" in res["dynamic_d"]


def test_ampere_plus_with_the_attention_plugin_is_refused(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="48 KiB"):
        tb.build_tensorrt(
            str(tiny_dir), tmp_path / "t", "fp16", 64, 96, hardware_compat="ampere+", attention_plugin=True
        )
    assert not (tmp_path / "t").exists()


def test_tensorrt_folder_of_another_precision_is_not_reused(tiny_dir, tmp_path, monkeypatch):
    """A folder with engines at one precision is refused for a build at another (not reused)."""
    import sys
    import types

    from auraflow_edge.engine.errors import UserError
    from auraflow_edge.export import tensorrt_build
    from auraflow_edge.export.engine_folder import finish_folder

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.99"))
    monkeypatch.setattr(tensorrt_build, "gpu_identity", lambda: ("GPU", (9, 0)))
    (tmp_path / "t.tmp").mkdir()
    key = tensorrt_build.engine_key("GPU", (9, 0), "10.99", "none")
    finish_folder(
        tmp_path / "t.tmp", tmp_path / "t", {"backend": "tensorrt", "precision": "fp8", "engines": {key: {}}}
    )
    with pytest.raises(UserError, match="holds a tensorrt fp8 engine; pass --force"):
        tensorrt_build.build_tensorrt(str(tiny_dir), tmp_path / "t", precision="int8", quiet=True)


_PTX = """.version 8.7
.target sm_90a
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3
)
.reqntid 128
{
\tld.param.b64 \t%rd1, [k_param_0];
\tld.param.b32 \t%r1, [k_param_1];
\tld.param.b64 \t%rd2, [k_param_2];
}
"""


def test_ptx_entry_is_cut_to_the_launch_signature_and_nothing_else():
    """Triton's trailing scratch pointers go; a kernel asking for scratch memory, or reading a
    parameter that would be cut, is refused rather than launched misaligned."""
    none = types.SimpleNamespace(global_scratch_size=0, profile_scratch_size=0)
    cut = tp.cut_entry_params(_PTX, "k", 3, none)
    entry = cut[cut.index(".entry") : cut.index(")")]
    assert entry.count(".param") == 3 and "k_param_3" not in cut and "k_param_2" in entry
    assert cut[cut.index(")") :] == _PTX[_PTX.index(")") :]  # the body is untouched
    whole = tp.cut_entry_params(_PTX, "k", 4, none)
    assert whole[whole.index(".entry") : whole.index(")")].count(".param") == 4
    with pytest.raises(UserError, match="scratch memory"):
        tp.cut_entry_params(
            _PTX, "k", 3, types.SimpleNamespace(global_scratch_size=128, profile_scratch_size=0)
        )
    with pytest.raises(UserError, match="reads its extra parameter k_param_2"):
        tp.cut_entry_params(_PTX, "k", 2, none)
    with pytest.raises(UserError, match="fewer than"):
        tp.cut_entry_params(_PTX, "k", 5, none)


def test_ptx_isa_follows_the_driver():
    """cuDriverGetVersion -> newest PTX ISA it loads (PTX ISA release notes)."""
    assert [tp.driver_ptx_isa(v) for v in (12000, 12040, 12060, 12080, 12090, 13000, 13010)] == [
        80, 84, 85, 87, 88, 90, 91,
    ]  # fmt: skip
    assert tp.ptx_isa(_PTX) == 87
    with pytest.raises(UserError, match="CUDA 12"):
        tp.driver_ptx_isa(11080)


def test_node_params_are_found_by_type_not_position():
    import itertools

    params = np.array([1e-6, 0.25, 1.0], np.float32)
    for order in itertools.permutations([params, "auraflow_edge", 1]):
        assert tp.node_params(list(order)) == (pytest.approx(1e-6), 0.25, 1)
    with pytest.raises(UserError, match="'params'"):
        tp.node_params(["auraflow_edge", 1])


_CHANGES = {  # option -> (build arguments that change it, the flag the refusal names)
    "shapes": ({"shapes": "96x64,128x128"}, "--shapes"),
    "size": ({"height": 128}, "--shapes / --height / --width"),
    "dynamic_shapes": ({"dynamic_shapes": True}, "--dynamic-shapes"),
    "attention_plugin": ({"attention_plugin": True}, "--attention-plugin"),
    "act_quant": ({"act_quant": "int8"}, "--act-quant"),  # on an int8 build (--act-quant needs one)
    "refittable": ({"refittable": True}, "--refittable"),
    "hardware_compat": ({"hardware_compat": "same-cc"}, "--hardware-compat"),
    "vram_budget": ({"vram_budget": "6GiB"}, "--vram-budget"),
    "components": ({"components": "transformer"}, "--components"),
}


@pytest.mark.parametrize("option", _CHANGES)
def test_tensorrt_folder_is_reused_only_with_every_option_equal(option, tiny_dir, tmp_path, fake_trt_build):
    """Issue 17, item 6: the same build reuses the folder; any option that changes the engines is
    a refusal naming it (nothing touched), and with --force a rebuild, which is then reused."""
    base = dict(precision="int8" if option == "act_quant" else "fp16", height=64, width=96, quiet=True)
    out = tmp_path / "t"
    tb.build_tensorrt(str(tiny_dir), out, **base)
    built = fake_trt_build["builds"]
    assert built == 3 and tb.build_tensorrt(str(tiny_dir), out, **base) == out
    assert fake_trt_build["builds"] == built  # reused
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    change, flag = _CHANGES[option]
    args = {**base, **change}
    with pytest.raises(UserError, match="pass --force") as err:
        tb.build_tensorrt(str(tiny_dir), out, **args)
    assert flag in str(err.value)
    assert fake_trt_build["builds"] == built and {p.name: p.read_bytes() for p in out.iterdir()} == before
    tb.build_tensorrt(str(tiny_dir), out, **args, force=True)
    assert fake_trt_build["builds"] == built + 3
    tb.build_tensorrt(str(tiny_dir), out, **args)  # the new build is reused
    assert fake_trt_build["builds"] == built + 3
    m = Manifest.load(out)
    assert m["tensorrt_build"]["options"]["precision"] == args["precision"]


@pytest.mark.parametrize("machine", ["gpu", "tensorrt", "driver", "tools"])
def test_tensorrt_folder_of_another_machine_is_not_reused(
    machine, tiny_dir, tmp_path, fake_trt_build, monkeypatch
):
    """One folder holds one GPU's engines: a build on another GPU (or TensorRT, or tool versions;
    with the plugin, a driver that reads another PTX ISA) is refused with the first GPU's engines
    left intact, and replaces them with --force."""
    from auraflow_edge.export import engine_folder

    base = dict(precision="fp16", height=64, width=96, quiet=True, attention_plugin=True)
    out = tmp_path / "t"
    tb.build_tensorrt(str(tiny_dir), out, **base)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    if machine == "gpu":
        fake_trt_build["gpu"] = ("GPU B", (8, 9))
    elif machine == "tensorrt":
        fake_trt_build["trt"].__version__ = "10.100"
    elif machine == "driver":
        fake_trt_build["driver"] = 12060
    else:
        real = engine_folder.tool_versions
        monkeypatch.setattr(engine_folder, "tool_versions", lambda: {**real(), "onnx": "0.0.1"})
    with pytest.raises(UserError, match="pass --force to replace them, or build into another folder"):
        tb.build_tensorrt(str(tiny_dir), out, **base)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    tb.build_tensorrt(str(tiny_dir), out, **base, force=True)
    m = Manifest.load(out)
    assert len(m["engines"]) == 1 and fake_trt_build["builds"] == 6
    (entry,) = m["engines"].values()
    assert entry["attention_plugin"]["max_ptx_version"] == tp.driver_ptx_isa(fake_trt_build["driver"])
