"""Our TensorRT plugin through NVIDIA's real Python layer (tensorrt-cu13-bindings) on the CPU.

Everything runs in one fresh process (tests/trt_real.py) over stand-in C libraries for TensorRT's
native ones; what only a real build or a GPU can show (the C++ parser and builder, the kernel's
launch) is not claimed here: bench/plugin_launch.py launches the same PTX on a GPU. Skipped, with the
reason, where the bindings or a C compiler are missing.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trt_real  # tests/ is on sys.path (pytest puts a test file's folder there)

from auraflow_edge.export import tensorrt_plugin as tp

pytestmark = pytest.mark.skipif(trt_real.unavailable() is not None, reason=str(trt_real.unavailable()))


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    libs = trt_real.build_standins(tmp_path_factory.mktemp("trt_standins"))
    env = {
        k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"
    }  # compiled kernels, not the interpreter
    r = subprocess.run(
        [sys.executable, str(Path(trt_real.__file__)), str(libs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_tensorrt_name_we_use_exists(real):
    """Every trt.X / trtp.X chain in engine/, export/, kernels/, bench/ and the methods we call on
    TensorRT objects exist in the installed TensorRT (11.4 here)."""
    assert real["version"].startswith("11.")
    seen = set(real["names"]["seen"])
    assert {"trt.BuilderFlag.REFIT", "trtp.KernelLaunchParams", "trt.Refitter.set_named_weights"} <= seen
    assert real["names"]["missing"] == []


def test_registration_passes_nvidias_validation_and_repeats_harmlessly(real):
    """@trtp.register and @trtp.aot_impl accept our functions (the aot_impl return annotation is
    required); a second and third registration in the process only retarget the kernel."""
    assert real["registered"] == [tp.OP]
    assert real["target"] == [90, 87]


def test_attributes_reach_the_kernel_in_any_order_and_subset(real):
    """The node's attributes handed over in every order, with or without plugin_namespace / aot
    (the parser declares, forwards or drops them): the kernel is built from the same values."""
    assert len(real["orders"]) == 11 and len(real["order_values"]) == 11
    eps32 = float(__import__("numpy").float32(1e-6))
    assert all(v == [eps32, 0.0625, 1] for v in real["order_values"]), real["order_values"]
    assert real["order_launch_same"]
    assert "needs one float attribute 'params'" in real["no_params"]


@pytest.mark.parametrize("which", ["sm90 HALF", "sm90 BF16", "sm86 BF16"])
def test_aot_kernel_as_tensorrt_receives_it(real, which):
    """get_launch_params / get_kernel of NVIDIA's AOT plugin class over our aot_impl (head_dim 256):
    output type and shape, launch configuration and the three int32 scalars as expressions of the
    input shapes, within 48 KiB of shared memory, and a PTX entry of exactly TensorRT's 7 parameters
    (input pointers, int32 scalars, output pointer), its ISA capped to 8.7."""
    k = real["kernels"][which]
    arch, dtype = which.split()
    env = {"B": 2, "H": 3, "NQ": 333, "NK": 77}
    assert k["out_types"] == [dtype]
    assert [trt_real.evaluate(t, env) for t in k["out_shape"]] == [2, 3, 333, 256]
    launch = {n: trt_real.evaluate(t, env) for n, t in k["launch"].items()}
    assert launch["grid_x"] == math.ceil(333 / 64) and launch["grid_y"] == 6 and launch["grid_z"] == 1
    assert launch["block_x"] == 256 and launch["block_y"] == launch["block_z"] == 1
    assert 0 < launch["shared_mem"] <= 48 * 1024
    assert [trt_real.evaluate(t, env) for t in k["extra"]] == [3, 333, 77]
    assert k["extra_kinds"] == ["SymInt32"] * 3
    ptx = k["ptx"]
    entry = re.search(r"\.entry\s+_attn_trt\s*\((.*?)\)", ptx, flags=re.DOTALL).group(1)
    assert re.findall(r"\.param \.(\w+)", entry) == ["u64", "u64", "u64", "u32", "u32", "u32", "u64"]
    assert re.search(r"^\.version 8\.7$", ptx, flags=re.MULTILINE)
    assert re.search(rf"^\.target sm_{arch[2:]}a?$", ptx, flags=re.MULTILINE)
    assert bool(re.search(r"mma\S*bf16", ptx)) == (dtype == "BF16")
    assert k["name"] == "_attn_trt"
