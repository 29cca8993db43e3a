"""Ahead-of-time kernels: the launch-time specialization, one variant compiled for sm_86 with no GPU,
its C entry point built with gcc."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from auraflow_edge.kernels.aot import specialization, variants

CUDA_H = next((p for p in (Path("/usr/local/cuda/include"),) if (p / "cuda.h").exists()), None)


def _fresh_env():
    # a fresh process without TRITON_INTERPRET: the suite's interpreter mode patches triton.language
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {
        "TRITON_DEFAULT_FP_FUSION": "1"
    }


def test_specialization_is_the_jits():
    """What Triton's JIT derives at launch from aligned tensors with unit inner strides and
    16-divisible outer strides: pointers and those integers tt.divisibility=16, unit strides the
    constant 1; token counts and heads unspecialised."""
    (v,) = [v for v in variants() if v.label == "attention fp16 d256"]
    sig, const, attrs = specialization(v.kernel, v.sig, v.const, v.unit, v.aligned)
    names = v.kernel.arg_names
    marked = {names[i] for (i,), a in attrs.items() if a == [["tt.divisibility", 16]]}
    assert marked == {"Q", "K", "V", "Out", "QS", "KS", "D"} | {f"s{t}{a}" for t in "qkvo" for a in "bhn"}
    assert {f"s{t}d" for t in "qkvo"} <= {k for k, c in const.items() if c == 1}
    assert all(sig[f"s{t}d"] == "constexpr" for t in "qkvo") and sig["N_Q"] == "i32"
    assert list(sig) == [a for a in names if a in sig]  # the kernel's argument order
    # every variant names only int32 arguments it has, and every looped kernel has a contract
    for v in variants():
        specialization(v.kernel, v.sig, v.const, v.unit, v.aligned)
        if "attention" in v.label or "mm" in v.label:
            assert v.unit and v.aligned, v.label
    with pytest.raises(ValueError, match="distinct i32"):
        specialization(v.kernel, v.sig, v.const, ("N",), ("N",))


_COMPILE = r"""
import json
from auraflow_edge.kernels.aot import compile_variant, variants
(v,) = [v for v in variants() if v.label == "attention fp16 d64"]
out = {}
for spec in (False, True):
    k = compile_variant(v.kernel, v.sig, v.const, 86, v.warps, v.stages, *((v.unit, v.aligned) if spec else ((), ())))
    out[str(spec)] = {"shared": k.metadata.shared, "cp_async": "cp.async" in k.asm["ptx"]}
print(json.dumps(out))
"""


def test_specialized_compile_pipelines_loads():
    """Compiled for sm_86 with no GPU: with the specialization the loads pipeline through
    cp.async and the kernel holds its pipeline stages in shared memory; without it they do not."""
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=_fresh_env(), timeout=600
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["True"]["cp_async"] and not res["False"]["cp_async"]
    assert res["True"]["shared"] > res["False"]["shared"]


@pytest.mark.skipif(
    CUDA_H is None or shutil.which("gcc") is None, reason="needs cuda.h (CUDA toolkit) and gcc"
)
def test_generated_c_library_builds(tmp_path):
    env = _fresh_env()
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
    assert all(e["unit_args"] == ["sqd", "skd", "svd", "sod"] for e in entries)
    src = (tmp_path / "afe_attention_fp16_d256_sm86.c").read_text()
    assert "sqd != 1" in src and "(Q & 15)" in src and "sqb % 16" in src and "N_Q % 16" not in src
    assert "&sqd" not in src and "&sqb" in src  # a unit stride is in the prototype, not a kernel parameter
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
