"""Ahead-of-time kernels: one variant compiled for sm_86 with no GPU, its C entry point built with gcc."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CUDA_H = next((p for p in (Path("/usr/local/cuda/include"),) if (p / "cuda.h").exists()), None)


@pytest.mark.skipif(
    CUDA_H is None or shutil.which("gcc") is None, reason="needs cuda.h (CUDA toolkit) and gcc"
)
def test_generated_c_library_builds(tmp_path):
    # a fresh process without TRITON_INTERPRET: the suite's interpreter mode patches triton.language
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "auraflow_edge.kernels.aot",
            "--out",
            str(tmp_path),
            "--arch",
            "86",
            "--only",
            "attention fp16 d256",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    entries = json.loads((tmp_path / "kernels.json").read_text())
    assert {e["function"] for e in entries} == {
        "afe_attention_fp16_d256_sm86",
        "afe_attention_fp16_d256_int8qk_sm86",
    }
    assert all(e["shared_bytes"] <= 99 * 1024 for e in entries)
    lib = tmp_path / "libk.so"
    r = subprocess.run(
        [
            "gcc",
            "-shared",
            "-fPIC",
            "-Wall",
            "-Werror",
            f"-I{CUDA_H}",
            *map(str, tmp_path.glob("*.c")),
            "-o",
            str(lib),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    syms = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    assert "afe_attention_fp16_d256_sm86" in syms and "afe_attention_fp16_d256_int8qk_sm86" in syms
    header = (tmp_path / "auraflow_edge_kernels.h").read_text()
    assert "CUresult afe_attention_fp16_d256_sm86(CUstream stream, unsigned gx" in header
