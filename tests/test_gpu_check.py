"""The GPU check on the CPU: everything before its first CUDA call, and the bench scripts' own logic.

A lent GPU is scarce; these catch on the CPU what would otherwise waste it: a check that dies
before measuring anything, a wrong tolerance, an untied or fp32-first model, a stage failure that
loses the numbers measured before it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from auraflow_edge.bench import gpu_fullsize, gpu_kernels

ROOT = Path(__file__).parent.parent


def _installed_from_this_tree() -> bool:
    import auraflow_edge.engine as e

    return Path(e.__file__).resolve().parent == (ROOT / "engine").resolve()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script would run the whole check")
@pytest.mark.skipif(not _installed_from_this_tree(), reason="the script would reinstall the project")
def test_gpu_check_stops_after_preflight_without_cuda(tmp_path):
    """Installs nothing here (this tree and any carried wheel are installed already), imports all
    it will use, prints `preflight: ok`, then stops with one line: there is no CUDA device."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "NVIDIA H200, 580.159.04, 143771 MiB, 0 MiB"\n')
    (fake / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PIP_NO_INDEX="1")
    env["PATH"] = os.pathsep.join([str(fake), str(Path(sys.executable).parent), env["PATH"]])
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "out"
    r = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = r.stdout.strip().splitlines()
    assert r.returncode != 0, r.stdout + r.stderr
    assert lines.count("preflight: ok") == 1, r.stdout + r.stderr
    assert lines[-2] == "preflight: ok" and lines[-1].startswith("no CUDA device"), r.stdout + r.stderr
    assert "NVIDIA H200, 580.159.04" in r.stdout
    assert (out / "gpu_check.log").read_text() == r.stdout


def test_norm_modulate_check_is_relative_to_output_rounding():
    """Issue 13, item 5: at |y| ~ 30 one bf16 step is 0.25, so a correctly rounded output is off by
    more than an absolute 5e-2; the check passes it and fails an output two steps off."""
    g = torch.Generator().manual_seed(0)
    ref = (torch.randn(4, 3072, generator=g, dtype=torch.float64) * 12).clamp(-40, 40)
    good = ref.to(torch.bfloat16)
    assert (good.double() - ref).abs().max().item() > 5e-2
    assert gpu_kernels.rounding_check(good, ref)["ok"]
    eps = torch.finfo(torch.bfloat16).eps
    bad = (ref * (1 + 2 * eps)).to(torch.bfloat16)  # two units in the last place off
    assert not gpu_kernels.rounding_check(bad, ref)["ok"]


def test_kernel_targets_verdicts():
    attn = [
        {"tokens": n, "impl": i, "ms": ms}
        for n in gpu_kernels.ATTN_TOKENS
        for i, ms in (("ours bf16", 1.0), ("ours int8 qk", 0.6), ("sdpa flash + qk-norm", 0.9))
    ] + [{"tokens": 4360, "impl": "sdpa cudnn + qk-norm", "error": "RuntimeError: no kernel"}]
    gemm = [
        {"shape": [8720, 3072, 3072], "impl": "bf16 matmul", "ms": 3.0},
        {"shape": [8720, 3072, 3072], "impl": "w8a8 int8", "ms": 1.5},
        {"shape": [8720, 3072, 3072], "impl": "w8a8 fp8", "error": "CompilationError"},
    ]
    t = {r["what"]: r for r in gpu_kernels.targets(attn, gemm)}
    bf16 = t["attention bf16 vs best SDPA + qk-norm, N=4360"]
    assert bf16["speedup"] == pytest.approx(0.9) and bf16["met"] is False
    assert t["attention int8 Q/K vs best SDPA + qk-norm, N=2568"]["speedup"] == pytest.approx(1.5)
    assert t["w8a8 int8 vs bf16 matmul, M x K x N = 8720x3072x3072"]["met"] is True
    assert t["w8a8 fp8 vs bf16 matmul, M x K x N = 8720x3072x3072"]["met"] is None


def test_materialize_casts_first_and_keeps_ties(monkeypatch):
    """Issue 13, item 6: to_empty sees bf16 parameters (no fp32 copy), UMT5's embedding stays tied."""
    from transformers import UMT5Config, UMT5EncoderModel

    seen = []
    real = torch.nn.Module.to_empty

    def to_empty(self, *a, **k):
        seen.append({p.dtype for p in self.parameters()})
        return real(self, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "to_empty", to_empty)
    cfg = UMT5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    with torch.device("meta"):
        m = UMT5EncoderModel(cfg)
    m = gpu_fullsize.materialize(m, "cpu", torch.bfloat16)
    assert seen == [{torch.bfloat16}]
    assert m.shared.weight is m.encoder.embed_tokens.weight
    assert m.shared.weight.dtype == torch.bfloat16 and not m.shared.weight.is_meta
    expect = gpu_fullsize.make_weight("shared.weight", (50, 16), torch.bfloat16, "cpu")
    assert torch.equal(m.shared.weight, expect)
    assert torch.equal(m.encoder.final_layer_norm.weight, torch.ones(16, dtype=torch.bfloat16))


@pytest.mark.slow
def test_fullsize_small_on_cpu_keeps_what_was_measured(tmp_path, monkeypatch):
    """The full-size script's whole flow on a tiny model: ours and diffusers get identical weights
    (so their latents agree), and a failing stage leaves the others' numbers in the JSON."""
    real_open = gpu_fullsize.open_transformer

    def open_transformer(run, cfg, device):
        if run == "ours fp8":
            raise RuntimeError("planted failure")
        return real_open(run, cfg, device)

    monkeypatch.setattr(gpu_fullsize, "open_transformer", open_transformer)
    out = tmp_path / "fs.json"
    argv = ["--size", "small", "--device", "cpu", "--height", "64", "--width", "64", "--json", str(out)]
    assert gpu_fullsize.main(argv) == 1
    r = json.loads(out.read_text())
    st = r["stages"]
    assert st["ours fp8"]["error"] == "RuntimeError: planted failure"
    for run in ("ours bf16", "diffusers bf16", "ours int8"):
        assert len(st[run]["step_s"]) == 2 and "error" not in st[run]
    assert "error" not in st["vae_decode fp32 1x1 tiles"] and "error" not in st["text_encoder bf16"]
    fid = r["fidelity_vs_ours_bf16"]
    assert fid["diffusers bf16"]["latent_rel_l2"] < 1e-2
    assert 1e-4 < fid["ours int8"]["latent_rel_l2"] < 0.1
    assert np.isfinite(fid["ours int8"]["image_psnr_db"])
    assert [t["run"] for t in r["targets"]] == ["ours int8", "ours fp8"]
    assert r["targets"][0]["memory_met"] is None  # no device memory figures on the CPU


def test_plugin_launch_evaluates_the_contract_aot_impl_returns():
    """bench/plugin_launch.py (run by the GPU check) compiled for real in a fresh process without
    the Triton interpreter: aot_impl's launch description evaluated at concrete odd shapes, the PTX
    it would load cut to 7 parameters, the uncut one with Triton's scratch parameters, and the 7
    arguments in TensorRT's order with their C types."""
    script = (
        "import json, ctypes\nfrom auraflow_edge.bench import plugin_launch as P\n"
        "c = P.contract(90, 'bf16', 2, 3, 333, 77, 256, 87)\n"
        "vals, cts = P.kernel_args(11, 12, 13, c['scalars'], 14)\n"
        "print(json.dumps(dict(grid=c['grid'], block=c['block'], shared=c['shared'], scalars=c['scalars'],"
        " ptx=c['ptx_version'], cut=P.entry_params(c['ptx'], c['name']),"
        " uncut=P.entry_params(c['uncut_ptx'], c['name']), vals=vals,"
        " cts=[t.__name__ for t in cts])))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["grid"] == [6, 6, 1] and got["block"] == [256, 1, 1]  # ceil(333 / 64), B * H; 8 warps
    assert 0 < got["shared"] <= 48 * 1024 and got["scalars"] == [3, 333, 77] and got["ptx"] == 87
    assert got["cut"] == 7 and got["uncut"] > 7
    assert got["vals"] == [11, 12, 13, 3, 333, 77, 14]
    assert got["cts"] == ["c_void_p"] * 3 + ["c_int"] * 3 + ["c_void_p"]
