"""LoRA: diffusers parity, every file layout, every precision, switching, engine builds, refit, bad files."""

import copy
import json
import sys
import types
from dataclasses import asdict

import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import GEN
from PIL import Image

from auraflow_edge.engine.backends.torch_backend import TorchStages, TorchTransformer
from auraflow_edge.engine.cli.main import main
from auraflow_edge.engine.errors import UserError
from auraflow_edge.engine.model.checkpoint import open_model, original_names
from auraflow_edge.engine.model.lora import load_loras, parse_lora_arg, with_loras
from auraflow_edge.engine.model.safetensors_io import SafetensorsFile, save_file
from auraflow_edge.engine.runtime.pipeline import Pipeline
from auraflow_edge.engine.runtime.schedule import flow_match_schedule


def _peft_lora(tiny_dir, folder, seed, **config):
    """A LoRA trained by nobody: PEFT adapter with random factors, saved by diffusers with its metadata."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    tr = AuraFlowTransformer2DModel.from_pretrained(tiny_dir / "transformer")
    cfg = LoraConfig(init_lora_weights=False, **config)
    torch.manual_seed(seed)
    tr.add_adapter(cfg)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.12)
    AuraFlowPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(tr),
        transformer_lora_adapter_metadata=cfg.to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def loras(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    # a: attention, feed-forward (both linear_1: the FF's and the timestep MLP's), the adaLN
    # modulation linears (folded on quantized runs) and the final projections
    a = _peft_lora(
        tiny_dir,
        d / "a",
        1,
        r=4,
        lora_alpha=6,
        target_modules=[
            "to_q",
            "add_q_proj",
            "to_out.0",
            "linear_1",
            "norm1.linear",
            "norm_out.linear",
            "proj_out",
        ],
    )
    # b: other linears, rsLoRA scaling, per-module rank and alpha patterns
    b = _peft_lora(
        tiny_dir,
        d / "b",
        2,
        r=2,
        lora_alpha=3,
        use_rslora=True,
        rank_pattern={"context_embedder": 3},
        alpha_pattern={"out_projection": 5},
        target_modules=["to_k", "add_v_proj", "context_embedder", "out_projection", "norm1_context.linear"],
    )
    return {"a": a, "b": b, "dir": d}


CASES = [[("a", 1.0)], [("a", 0.5)], [("a", 1.0), ("b", 0.7)]]


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_dir, loras):
    from diffusers import AuraFlowPipeline

    pipe = AuraFlowPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(loras["a"], adapter_name="a")
    pipe.load_lora_weights(loras["b"], adapter_name="b")
    return pipe


def _ours(loras, case):
    return [(loras[n], s) for n, s in case]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 8, 12, generator=g),
        torch.randn(2, 7, 32, generator=g),
        torch.tensor([0.83, 0.3]),
    )


@pytest.mark.parametrize("case", CASES, ids=["a", "a@0.5", "a+b@0.7"])
def test_transformer_matches_diffusers(tiny_dir, loras, diffusers_pipe, case):
    """Both of our paths: merged as the float weights load, and side branches on a resident model
    switched from another LoRA (they hold the difference to what was merged)."""
    from auraflow_edge.engine.model.lora import attach

    x, c, t = _inputs()
    diffusers_pipe.set_adapters([n for n, _ in case], [s for _, s in case])
    merged = TorchStages(tiny_dir, loras=_ours(loras, case))._open("transformer")
    st = TorchStages(tiny_dir, loras=[(loras["b"], 0.3)])
    switched = st._open("transformer")
    attach(switched, load_loras(_ours(loras, case), st.mf), st.mf.weights.read)
    plain = TorchStages(tiny_dir)._open("transformer")
    with torch.no_grad():
        want = diffusers_pipe.transformer(x, encoder_hidden_states=c, timestep=t).sample
        for tr in (merged, switched):
            assert (tr.model(x, c, timestep=t) - want).abs().max().item() < 1e-5
        base = plain.model(x, c, timestep=t)
    assert (base - want).abs().max().item() > 0.1  # the adapters really change the output
    assert not any(hasattr(m, "lora_branch") for m in merged.model.modules())  # merged: no branches
    assert any(hasattr(m, "lora_branch") for m in switched.model.modules())


def test_images_match_diffusers_while_switching(tiny_dir, loras, diffusers_pipe, tiny_noise):
    pipe = Pipeline.load(tiny_dir, keep_resident=True)
    base = pipe.generate(**GEN, noise=tiny_noise).latents
    for case in CASES:
        diffusers_pipe.set_adapters([n for n, _ in case], [s for _, s in case])
        want = diffusers_pipe(
            GEN["prompt"],
            negative_prompt=GEN["negative_prompt"],
            num_inference_steps=GEN["steps"],
            guidance_scale=GEN["guidance"],
            height=GEN["height"],
            width=GEN["width"],
            latents=torch.from_numpy(tiny_noise.copy()),
        ).images[0]
        pipe.set_loras(_ours(loras, case))
        res = pipe.generate(**GEN, noise=tiny_noise)
        assert np.abs(np.asarray(res.image, int) - np.asarray(want, int)).max() <= 1
        assert np.linalg.norm(res.latents - base) > 0.1 * np.linalg.norm(base)  # the LoRA changes the result
        assert [r["scale"] for r in res.parameters["loras"]] == [s for _, s in case]


def test_generate_cli_with_loras(tiny_dir, loras, tmp_path, tiny_noise):
    from conftest import png_parameters as read_parameters

    np.save(tmp_path / "noise.npy", tiny_noise)
    out = tmp_path / "o.png"
    args = [
        "--quiet",
        "generate",
        str(tiny_dir),
        "--prompt",
        GEN["prompt"],
        "--negative-prompt",
        GEN["negative_prompt"],
    ]
    args += ["--steps", "4", "--height", "64", "--width", "96", "--noise", str(tmp_path / "noise.npy")]
    assert main(args + ["--lora", f"{loras['a']}:0.5", "--lora", str(loras["b"]), "-o", str(out)]) == 0
    want = Pipeline.load(tiny_dir, loras=[(loras["a"], 0.5), (loras["b"], 1.0)]).generate(
        **GEN, noise=tiny_noise
    )
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want.image))
    assert [(r["file"], r["scale"]) for r in read_parameters(out)["loras"]] == [
        ("pytorch_lora_weights.safetensors", 0.5),
        ("pytorch_lora_weights.safetensors", 1.0),
    ]


def _convert(src, dst, layout):
    """Rewrite a diffusers/PEFT LoRA file in another tool's layout (alpha as a tensor, rank from B)."""
    sf = SafetensorsFile(src)
    alpha = json.loads(sf.metadata["lora_adapter_metadata"])["transformer.lora_alpha"]
    names = {d[: -len(".weight")]: o[: -len(".weight")] for d, o in original_names(1, 2).items()}
    out = {}
    for k in sf.keys():
        mod, kind = k[len("transformer.") :].rsplit(".lora_", 1)
        a_or_b = kind.split(".")[0]
        t = sf.read(k)
        if layout in ("kohya-original", "comfy", "bare-original"):
            if mod == "norm_out.linear" and a_or_b == "B":  # the original final modulation is (shift, scale)
                t = np.concatenate([t[t.shape[0] // 2 :], t[: t.shape[0] // 2]])
            mod = names[mod]
        down_up = {"A": "lora_down", "B": "lora_up"}[a_or_b]
        key = {
            "kohya": f"lora_unet_{mod.replace('.', '_')}.{down_up}.weight",
            "onetrainer": f"lora_transformer_{mod.replace('.', '_')}.{down_up}.weight",
            "kohya-original": f"lora_unet_{mod.replace('.', '_')}.{down_up}.weight",
            "comfy": f"diffusion_model.{mod}.lora_{a_or_b}.weight",
            "bare-original": f"{mod}.lora_{a_or_b}.weight",
        }[layout]
        out[key] = t
        out[key.rsplit(".", 2)[0] + ".alpha"] = np.array(alpha, np.float32)  # 0-d, as kohya writes it
    safetensors.numpy.save_file(out, str(dst))
    return dst


@pytest.mark.parametrize("layout", ["kohya", "onetrainer", "kohya-original", "comfy", "bare-original"])
def test_other_layouts_give_the_same_outputs(tiny_dir, loras, tmp_path, layout):
    f = _convert(loras["a"], tmp_path / f"{layout}.safetensors", layout)
    x, c, t = _inputs()
    outs = []
    for path in (loras["a"], f):
        model = TorchStages(tiny_dir, loras=[(path, 0.8)])._open("transformer").model
        with torch.no_grad():
            outs.append(model(x, c, timestep=t))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)


# the quantized reference paths' bounds without LoRA (tests/test_torch_quant.py)
QUANT_BOUNDS = {"int8": 1.5e-2, "fp8": 3e-2, "int4": 3e-2}


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_quantized_with_lora_close_to_fp32_merged(tiny_dir, loras, fmt):
    from auraflow_edge.engine.backends.torch_quant import QuantTorchTransformer
    from auraflow_edge.engine.model.lora import attach

    mf = open_model(tiny_dir)
    specs = _ours(loras, CASES[2])
    sched = flow_match_schedule(4)
    g = np.random.default_rng(0)
    x, c = g.standard_normal((2, 4, 8, 12), np.float32), g.standard_normal((2, 20, 32), np.float32)
    ref = TorchTransformer(with_loras(mf, specs))  # fp32, adapters merged into the weights
    base = TorchTransformer(mf)
    q = QuantTorchTransformer(mf, fmt, torch.device("cpu"), torch.float32, int4_block=16)
    attach(q, load_loras(specs, mf), mf.weights.read)
    for tr in (ref, base, q):
        tr.prepare(sched)
    want, plain, got = ref(x, c, 1), base(x, c, 1), q(x, c, 1)

    def rel(a, b):
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    assert rel(got, want) < QUANT_BOUNDS[fmt], rel(got, want)
    assert rel(plain, want) > 5 * QUANT_BOUNDS[fmt]  # the adapters matter far beyond the bound


def test_kernel_path_does_not_fuse_over_a_lora(tiny_dir, loras):
    """With a branch on the FF's linear_1 the fused SwiGLU epilogue must not run (Triton interpreter)."""
    from auraflow_edge.engine.backends.torch_quant import (
        QuantizedLinear,
        QuantTorchTransformer,
        _install_kernels,
    )
    from auraflow_edge.engine.model.lora import attach

    mf = open_model(tiny_dir)
    ls = load_loras([loras["a"]], mf)
    outs = []
    for kernels in (False, True):
        q = QuantTorchTransformer(mf, "int8", torch.device("cpu"), torch.float32, int4_block=16)
        if kernels:
            for m in q.model.modules():
                if isinstance(m, QuantizedLinear):
                    m.use_kernels = True
            _install_kernels(q.model, qk_int8=False)
        attach(q, ls, mf.weights.read)
        q.prepare(flow_match_schedule(2))
        outs.append(q(np.ones((1, 4, 4, 4), np.float32), np.ones((1, 5, 32), np.float32), 0))
    assert np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0]) < 2e-3


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_switching_reads_and_quantizes_nothing(tiny_dir, loras, tiny_noise, monkeypatch, precision):
    """A resident transformer switches LoRAs with no base weight read and no quantization: int8
    (side branches, folded modulation recomputed from disk) and fp32 (loaded merged, switched by
    branches holding the difference)."""
    from auraflow_edge.engine.backends import torch_quant
    from auraflow_edge.engine.model.lora import folded_names

    reads, quantized = [], []
    real_read, real_q = SafetensorsFile.read, torch_quant.quantize_weight
    base_file = tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors"

    def read(self, k):
        if self.path == base_file:  # base weights only (LoRA files are read on every switch)
            reads.append(k)
        return real_read(self, k)

    monkeypatch.setattr(SafetensorsFile, "read", read)
    monkeypatch.setattr(
        torch_quant, "quantize_weight", lambda *a, **k: quantized.append(1) or real_q(*a, **k)
    )
    gen = {**GEN, "steps": 2}

    def same(a, b):  # int8: bit-identical; fp32: a branch vs a merge differ by float rounding
        a, b = np.asarray(a, int), np.asarray(b, int)
        return np.array_equal(a, b) if precision == "int8" else np.abs(a - b).max() <= 1

    pipe = Pipeline.load(tiny_dir, precision=precision, keep_resident=True, loras=[loras["a"]])
    first = pipe.generate(**gen, noise=tiny_noise).image
    assert any(k.endswith("to_q.weight") for k in reads) and bool(quantized) == (precision == "int8")
    reads.clear(), quantized.clear()
    pipe.set_loras([loras["b"]])
    second = pipe.generate(**gen, noise=tiny_noise).image
    assert not quantized
    if precision == "int8":  # only the folded modulation weights are read again (its table changed)
        folded = folded_names(open_model(tiny_dir).transformer_cfg)
        assert reads and set(reads) <= folded, set(reads) - folded
    else:
        assert not reads
    fresh = Pipeline.load(tiny_dir, precision=precision, loras=[loras["b"]]).generate(**gen, noise=tiny_noise)
    assert same(second, fresh.image)
    assert not same(first, second)
    pipe.set_loras([])  # unloading restores the base model
    assert "loras" not in pipe.info
    base = Pipeline.load(tiny_dir, precision=precision).generate(**gen, noise=tiny_noise).image
    assert same(pipe.generate(**gen, noise=tiny_noise).image, base)


def test_onnx_runtime_build_merges_before_quantization(tiny_dir, loras, tmp_path, tiny_noise, capsys):
    from auraflow_edge.engine.runtime.manifest import Manifest, sha256_file
    from auraflow_edge.export.build import build_engine

    specs = [(str(loras["a"]), 0.5), (str(loras["b"]), 1.0)]
    e = build_engine(
        str(tiny_dir), tmp_path / "e", precision="int8", height=64, width=96, quiet=True, loras=specs
    )
    m = Manifest.load(e, verify=True)
    assert [(r["sha256"], r["scale"]) for r in m["loras"]] == [(sha256_file(p), s) for p, s in specs]
    assert "joint_transformer_blocks.0.norm1.linear.weight" in m["lora_targets"]
    img = Pipeline.load(e).generate(**GEN, noise=tiny_noise).image
    ref = Pipeline.load(tiny_dir, loras=specs).generate(**GEN, noise=tiny_noise).image
    plain = Pipeline.load(tiny_dir).generate(**GEN, noise=tiny_noise).image

    def psnr(a, b):
        return 10 * np.log10(255**2 / np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2))

    assert psnr(img, ref) > 44 > psnr(plain, ref) + 10  # int8 error only; the LoRA is in
    # same LoRAs: reused; other LoRAs or another scale: not mistaken for a reuse
    assert build_engine(str(tiny_dir), e, precision="int8", height=64, width=96, quiet=True, loras=specs) == e
    for other in ([specs[0]], [(specs[0][0], 0.6), specs[1]], None):
        with pytest.raises(UserError, match="--force"):
            build_engine(str(tiny_dir), e, precision="int8", height=64, width=96, quiet=True, loras=other)
    with pytest.raises(UserError, match="merged at build time"):
        Pipeline.load(e, loras=specs)
    assert main(["refit", str(e), "--lora", str(loras["a"])]) != 0
    err = capsys.readouterr().err
    assert "not a TensorRT engine folder" in err and err.count("\n") == 1


def _fake_tensorrt(all_names, missing):
    """Just enough of TensorRT's Python API for the refit: records what the Refitter is given."""
    calls = {"set": {}, "refits": 0}

    class Weights:
        def __init__(self, dtype, ptr, count):
            import ctypes

            itemsize = {"INT4": 0.5, "FP8": 1, "INT8": 1, "HALF": 2, "BF16": 2, "FLOAT": 4}[dtype]
            self.raw = ctypes.string_at(ptr, int(count * itemsize + 0.5))

    class Engine:
        def serialize(self):
            return b"refitted plan %d" % calls["refits"]

    class Refitter:
        def __init__(self, engine, logger):
            self.pending = set()

        def get_all_weights(self):
            return list(all_names)

        def set_named_weights(self, name, w):
            calls["set"][name] = w.raw
            self.pending.add(name)
            return True

        def get_missing_weights(self):
            return [n for n in missing if n not in self.pending]

        def refit_cuda_engine(self):
            calls["refits"] += 1
            return True

    trt = types.SimpleNamespace(
        __version__="10.99",
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda b: Engine()),
        Refitter=Refitter,
        Weights=Weights,
        DataType=types.SimpleNamespace(
            FLOAT="FLOAT", HALF="HALF", BF16="BF16", INT8="INT8", FP8="FP8", INT4="INT4"
        ),
    )
    return trt, calls


def test_tensorrt_refit_writes_what_a_build_writes(tiny_dir, loras, tmp_path, monkeypatch):
    """Refit from LoRA a to LoRA b and back: the folder ends byte-identical to an export with b, then
    with a, and the Refitter gets exactly the changed initializers (int4: packed weights, block
    scales). TensorRT itself is faked: the calls into it are UNVERIFIED."""
    from auraflow_edge.engine.model.lora import folded_names
    from auraflow_edge.engine.runtime.manifest import Manifest
    from auraflow_edge.export import components, tensorrt_build
    from auraflow_edge.export.engine_folder import build_key, finish_folder, source_fingerprint
    from auraflow_edge.export.onnx_folder import export_transformer, policies
    from auraflow_edge.export.tensorrt_refit import data_locations, refit_engine

    traced = {}
    real_trace = components.trace_transformer

    def trace_once(*args, **kw):  # both exports trace the same graph: trace it once (time)
        if "g" not in traced:
            traced["g"] = real_trace(*args, **kw)
        proto, rename = traced["g"]
        return copy.deepcopy(proto), rename

    monkeypatch.setattr(components, "trace_transformer", trace_once)
    mf = open_model(tiny_dir)
    pol = policies("int4", "tensorrt", 16)
    a, b = [(str(loras["a"]), 1.0)], [(str(loras["b"]), 0.5)]
    for name, specs in (("e", a), ("ref", b)):
        tmp = tmp_path / f"{name}.tmp"
        tmp.mkdir()
        mfl = with_loras(mf, specs)
        comps = export_transformer(mfl, tmp, pol["transformer"], 64, 96)
        (tmp / "transformer.plan").write_bytes(b"plan built with a")
        data = {  # what build_tensorrt records (the fields the refit reads)
            "backend": "tensorrt",
            "precision": "int4",
            "quantization": {k: asdict(v) for k, v in pol.items()},
            "source": {"model": str(tiny_dir), "fingerprint": source_fingerprint(mf)},
            "transformer_config": mf.transformer_cfg.to_dict(),
            "calibration": None,
            "components": comps,
            "loras": mfl.weights.loras.records(),
            "lora_targets": sorted(mfl.weights.loras.targets),
            "engines": {"gpu-sm90-trt10.99": {"gpu": "GPU", "compute_capability": [9, 0], "tensorrt": "10.99",
                        "refittable": True, "shapes": [[64, 96]],
                        "components": {"transformer": {"file": "transformer.plan"}}}},
        }  # fmt: skip
        finish_folder(tmp, tmp_path / name, data)
    e, ref = tmp_path / "e", tmp_path / "ref"
    built_with_a = {f: (e / f).read_bytes() for f in ("transformer.onnx.data", "modulation.safetensors")}
    where = data_locations(e / "transformer.onnx")
    missing = sorted(n for n in where if n.startswith("m.single_transformer_blocks.1.attn.to_v"))
    trt, calls = _fake_tensorrt(where, missing)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_build, "gpu_identity", lambda: ("GPU", (9, 0)))
    targets_a = set(Manifest.load(e)["lora_targets"])
    refit_engine(e, b, quiet=True)

    for f in built_with_a:
        assert (e / f).read_bytes() == (ref / f).read_bytes(), f
    m = Manifest.load(e, verify=True)
    assert (
        m["loras"] == Manifest.load(ref)["loras"] and m["lora_targets"] == Manifest.load(ref)["lora_targets"]
    )
    assert m["build_key"] == build_key(with_loras(mf, b), "tensorrt", "int4", pol, 64, 96)
    assert (e / "transformer.plan").read_bytes() == b"refitted plan 1"
    # the Refitter got every initializer of every linear either LoRA touches (folded ones excepted),
    # plus what it reported missing, each with the bytes of the export with LoRA b
    touched = (targets_a | set(m["lora_targets"])) - folded_names(mf.transformer_cfg)
    want = {n for n in where if any(n.startswith("m." + t + "_") for t in touched)}
    assert want and set(calls["set"]) == want | set(missing)
    ref_where = data_locations(ref / "transformer.onnx")
    for n, raw in calls["set"].items():
        _, _, path, off, length = ref_where[n]
        assert raw == path.read_bytes()[off : off + length], n
    refit_engine(e, a, quiet=True)  # and back: b's targets return to the base, a's are merged again
    for f, raw in built_with_a.items():
        assert (e / f).read_bytes() == raw, f
    assert Manifest.load(e, verify=True)["loras"][0]["scale"] == 1.0


def test_tensorrt_rebuild_with_other_loras_is_not_a_reuse(tiny_dir, loras, tmp_path, fake_trt_build):
    """Other LoRAs, or none, or other scales are a refusal naming them; the same LoRAs a reuse."""
    from auraflow_edge.export import tensorrt_build

    e = tmp_path / "t"
    tensorrt_build.build_tensorrt(
        str(tiny_dir), e, loras=[(loras["a"], 0.5)], height=64, width=96, quiet=True
    )
    assert fake_trt_build["builds"] == 3
    assert (
        tensorrt_build.build_tensorrt(
            str(tiny_dir), e, loras=[(loras["a"], 0.5)], height=64, width=96, quiet=True
        )
        == e
    )
    assert fake_trt_build["builds"] == 3
    for other in ([(loras["a"], 1.0)], [(loras["b"], 0.5)], None):
        with pytest.raises(UserError, match="other LoRAs"):
            tensorrt_build.build_tensorrt(str(tiny_dir), e, loras=other, height=64, width=96, quiet=True)
    with pytest.raises(UserError, match="--refittable"):
        tensorrt_build.build_tensorrt(
            str(tiny_dir), e, loras=[(loras["a"], 0.5)], refittable=True, height=64, width=96, quiet=True
        )
    assert fake_trt_build["builds"] == 3


def test_tensorrt_refit_takes_the_build_lock(tiny_dir, loras, tmp_path, fake_trt_build):
    """A refit edits the folder in place: while a build holds the folder's lock it is refused,
    and the folder is left as it was."""
    from auraflow_edge.export import tensorrt_build
    from auraflow_edge.export.engine_folder import build_lock
    from auraflow_edge.export.tensorrt_refit import refit_engine

    e = tmp_path / "t"
    tensorrt_build.build_tensorrt(str(tiny_dir), e, refittable=True, height=64, width=96, quiet=True)
    before = {p.name: p.read_bytes() for p in e.iterdir()}
    with build_lock(e), pytest.raises(UserError, match="another build is writing"):
        refit_engine(e, [(loras["a"], 1.0)], quiet=True)
    assert {p.name: p.read_bytes() for p in e.iterdir()} == before


def _bad_lora(tiny_dir, loras, tmp_path, what):
    f = tmp_path / f"{what}.safetensors"
    good = SafetensorsFile(loras["a"])
    t = {k: good.read(k) for k in good.keys()}
    k_a = next(k for k in t if k.endswith("to_q.lora_A.weight"))
    if what == "rank":
        t[k_a] = t[k_a][:3]
    elif what == "unknown":
        t["transformer.joint_transformer_blocks.0.attn.to_qq.lora_A.weight"] = t[k_a]
    elif what == "dora":
        t[k_a.replace("lora_A.weight", "lora_magnitude_vector")] = np.ones(32, np.float32)
    elif what == "text_encoder":
        t["lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = t[k_a]
    elif what == "half":
        del t[k_a]
    if what in ("truncated", "pickle", "missing"):
        save_file(t, f)
        if what == "truncated":
            f.write_bytes(f.read_bytes()[:-100])
        elif what == "pickle":
            torch.save({k: torch.from_numpy(v.copy()) for k, v in t.items()}, f)
        else:
            f.unlink()
    else:
        save_file(t, f)
    return f


BAD = [
    ("rank", "do not fit this model"),
    ("unknown", "match no linear"),
    ("truncated", "truncated"),
    ("pickle", "not a safetensors file"),
    ("missing", "not found"),
    ("dora", "DoRA"),
    ("text_encoder", "text-encoder"),
    ("half", "has no down/A tensor"),
]


@pytest.mark.parametrize("what,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_lora_files_are_one_line_errors(tiny_dir, loras, tmp_path, capsys, what, msg):
    f = _bad_lora(tiny_dir, loras, tmp_path, what)
    out = tmp_path / "o.png"
    gen = ["generate", str(tiny_dir), "--prompt", "x", "--steps", "1", "--height", "64", "--width", "64"]
    for argv in (
        gen + ["--lora", f"{loras['b']}:0.5", "--lora", f"{f}:0.7", "-o", str(out)],
        ["build", str(tiny_dir), "-o", str(tmp_path / "e"), "--lora", str(f)],
    ):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc != 0 and msg in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert str(f) in err
    assert not out.exists() and not (tmp_path / "e").exists()


def test_lora_argument_and_metadata_checks(tiny_dir, loras, tmp_path):
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("dir/a.safetensors:0.75") == ("dir/a.safetensors", 0.75)
    assert parse_lora_arg("C:/x/a.safetensors:-1") == ("C:/x/a.safetensors", -1.0)
    assert parse_lora_arg("odd:name.safetensors") == ("odd:name.safetensors", 1.0)
    with pytest.raises(UserError, match="finite"):
        parse_lora_arg("a.safetensors:nan")
    # a header whose rank disagrees with the tensors is refused, not silently rescaled
    sf = SafetensorsFile(loras["a"])
    meta = json.loads(sf.metadata["lora_adapter_metadata"])
    save_file({k: sf.read(k) for k in sf.keys()}, tmp_path / "r.safetensors",
              {"lora_adapter_metadata": json.dumps({**meta, "transformer.r": 8})})  # fmt: skip
    with pytest.raises(UserError, match="says rank 8"):
        load_loras([tmp_path / "r.safetensors"], open_model(tiny_dir))
    # the folder diffusers' save_lora_weights writes is accepted as is
    assert load_loras([loras["dir"] / "a"], open_model(tiny_dir)).targets
