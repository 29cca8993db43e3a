"""The attention plugin's launch contract on a GPU, without TensorRT (needs CUDA and cuda-bindings).

    python3 bench/plugin_launch.py --json OUT/plugin_launch.json

TensorRT launches an AOT plugin kernel itself: it loads the PTX ``aot_impl`` returns and calls it
with the grid, block and dynamic shared memory ``aot_impl`` gives, and exactly 7 arguments (Q, K, V
pointers, the int32 scalars H, N_Q, N_K, the output pointer), with no cuFuncSetAttribute. This does
the same through the CUDA driver API: ``aot_impl`` is called as a build on this GPU would call it
(target sm_XY, PTX ISA capped to this driver), its launch description is evaluated at concrete
shapes, and the kernel's output is compared with the float64 reference attention (fp16 and bf16,
head_dim 256, odd sequence lengths, output poisoned with NaN first). Then, in a child process under
a timeout, the same launch of the UNCUT PTX (Triton's trailing scratch parameters left in) is tried
and its outcome recorded: what TensorRT would have met without ``cut_entry_params``. The driver's
version is logged. The JSON is rewritten after every case.
"""

from __future__ import annotations

import argparse
import ctypes
import enum
import json
import math
import re
import subprocess
import sys
import types

import torch
import torch.nn.functional as F

from auraflow_edge.bench.gpu_report import Report, error_text, machine_info
from auraflow_edge.export import tensorrt_plugin as tp
from auraflow_edge.kernels.attention import attention_reference

CASES = [  # (dtype, B, H, N_Q, N_K, head_dim)
    ("fp16", 1, 2, 333, 333, 256),
    ("bf16", 1, 2, 333, 333, 256),
    ("fp16", 2, 3, 77, 129, 256),
    ("bf16", 2, 3, 77, 129, 256),
]
MAX_ABS = {"bf16": 2e-2, "fp16": 4e-3}  # as bench/gpu_kernels.py, against float64
EPS, SCALE = 1e-5, 1 / 16
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class _DataType(enum.Enum):  # the tensorrt.DataType members aot_impl looks up
    FLOAT = 0
    HALF = 1
    BF16 = 7


class _Dim(int):
    """A shape expression at a concrete value: what TensorRT's expressions evaluate to at launch."""

    is_constant = True

    def constant_value(self) -> int:
        return int(self)

    def __mul__(self, other):
        return _Dim(int(self) * int(other))


class _Launch:
    grid_x = grid_y = grid_z = block_x = block_y = block_z = 1
    shared_mem = 0


TRT = types.SimpleNamespace(DataType=_DataType)
TRTP = types.SimpleNamespace(
    KernelLaunchParams=_Launch,
    cdiv=lambda a, b: _Dim(math.ceil(int(a) / int(b))),
    SymInt32=int,
    SymIntExprs=types.SimpleNamespace(from_tuple=list),
)
TRT_NAMES = {"fp16": "HALF", "bf16": "BF16"}


def contract(arch: int, dtype: str, b: int, h: int, nq: int, nk: int, d: int, max_ptx: int | None) -> dict:
    """What aot_impl hands TensorRT for these shapes, evaluated: kernel name, cut PTX, launch
    configuration, the 3 int32 scalars; and Triton's uncut PTX of the same kernel."""
    dt = _DataType[TRT_NAMES[dtype]]
    q = types.SimpleNamespace(dtype=dt, shape_expr=[_Dim(b), _Dim(h), _Dim(nq), _Dim(d)])
    k = types.SimpleNamespace(dtype=dt, shape_expr=[_Dim(b), _Dim(h), _Dim(nk), _Dim(d)])
    name, ptx, launch, extra = tp.aot_impl(TRT, TRTP, arch, q, k, EPS, SCALE, 0, max_ptx=max_ptx)
    compiled, _, _ = tp.compile_plugin_kernel(arch, d, dtype, EPS, SCALE, 0, max_ptx)
    return {
        "name": name.decode(),
        "ptx": ptx.decode(),
        "uncut_ptx": compiled.asm["ptx"],
        "grid": [int(launch.grid_x), int(launch.grid_y), int(launch.grid_z)],
        "block": [int(launch.block_x), int(launch.block_y), int(launch.block_z)],
        "shared": int(launch.shared_mem),
        "scalars": [int(x) for x in extra],
        "ptx_version": tp.ptx_isa(ptx.decode()),
    }


def kernel_args(q_ptr: int, k_ptr: int, v_ptr: int, scalars: list[int], out_ptr: int) -> tuple:
    """The 7 kernel arguments in TensorRT's order, as cuda-bindings' (values, C types) pair."""
    values = (q_ptr, k_ptr, v_ptr, *scalars, out_ptr)
    ctypes_ = (ctypes.c_void_p,) * 3 + (ctypes.c_int32,) * len(scalars) + (ctypes.c_void_p,)
    assert len(values) == tp.N_KERNEL_PARAMS == len(ctypes_)
    return values, ctypes_


def entry_params(ptx: str, name: str) -> int:
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, flags=re.DOTALL)
    return m.group(1).count(".param") if m else -1


def _check(res):
    from cuda.bindings import driver

    err, *out = res if isinstance(res, tuple) else (res,)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"CUDA driver error {err.name}")
    return out[0] if len(out) == 1 else out


def driver_info() -> dict:
    from cuda.bindings import driver

    _check(driver.cuInit(0))
    v = _check(driver.cuDriverGetVersion())
    return {"cuda_driver_version": int(v), "max_ptx_isa": tp.driver_ptx_isa(int(v))}


def launch(c: dict, ptx: str, q, k, v, out) -> None:
    """cuModuleLoadData + cuLaunchKernel with exactly the contract: no attribute set, 7 arguments."""
    import numpy as np
    from cuda.bindings import driver

    torch.cuda.synchronize()
    image = np.frombuffer(ptx.encode() + b"\0", np.uint8)  # NUL-terminated PTX, alive during the load
    module = _check(driver.cuModuleLoadData(image.ctypes.data))
    try:
        fn = _check(driver.cuModuleGetFunction(module, c["name"].encode()))
        args = kernel_args(q.data_ptr(), k.data_ptr(), v.data_ptr(), c["scalars"], out.data_ptr())
        stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
        _check(driver.cuLaunchKernel(fn, *c["grid"], *c["block"], c["shared"], stream, args, 0))
        _check(driver.cuStreamSynchronize(stream))
    finally:
        driver.cuModuleUnload(module)


def run_case(dtype: str, b: int, h: int, nq: int, nk: int, d: int, uncut: bool, max_ptx: int | None) -> dict:
    arch = int("".join(map(str, torch.cuda.get_device_capability(0))))
    c = contract(arch, dtype, b, h, nq, nk, d, max_ptx)
    g = torch.Generator(device="cuda").manual_seed(nq + nk)
    tdt = TORCH_DTYPES[dtype]
    # the graph normalises Q (head_dim 256: q_norm 0) and K before the plugin
    q = F.layer_norm(torch.randn(b, h, nq, d, device="cuda", generator=g) * 2 + 0.5, (d,), eps=EPS).to(tdt)
    k = F.layer_norm(torch.randn(b, h, nk, d, device="cuda", generator=g) * 3, (d,), eps=EPS).to(tdt)
    v = torch.randn(b, h, nk, d, device="cuda", generator=g).to(tdt)
    out = torch.full_like(q, float("nan"))
    launch(c, c["uncut_ptx"] if uncut else c["ptx"], q, k, v, out)
    ref = attention_reference(q.double(), k.double(), v.double(), qk_norm=False, scale=SCALE)
    err = (out.double() - ref).abs().max().item()
    return {
        "grid": c["grid"],
        "block": c["block"],
        "shared": c["shared"],
        "scalars": c["scalars"],
        "ptx_version": c["ptx_version"],
        "entry_params": entry_params(c["uncut_ptx" if uncut else "ptx"], c["name"]),
        "max_abs": err,
        "nan": bool(torch.isnan(out).any().item()),
        "ok": err < MAX_ABS[dtype] and not torch.isnan(out).any().item(),
    }


def uncut_in_child(case, max_ptx, timeout: int) -> dict:
    """The uncut PTX in a child process: a misaligned launch may fault or hang the context."""
    cmd = [sys.executable, __file__, "--uncut-case", json.dumps([*case, max_ptx])]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"outcome": f"timed out after {timeout} s", "ok": False}
    lines = r.stdout.strip().splitlines()
    if r.returncode == 0 and lines:
        return {"outcome": "ran", **json.loads(lines[-1])}
    return {"outcome": f"exit {r.returncode}", "stderr": r.stderr[-1500:], "ok": False}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="plugin_launch.json")
    ap.add_argument("--uncut-timeout", type=int, default=60)
    ap.add_argument("--uncut-case", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.uncut_case:  # child: one uncut launch, one JSON line
        *case, max_ptx = json.loads(a.uncut_case)
        print(json.dumps(run_case(*case, uncut=True, max_ptx=max_ptx)))
        return 0
    rep = Report(a.json, machine=machine_info())
    try:
        rep["driver"] = driver_info()
    except Exception as e:
        rep["driver"] = {"error": error_text(e)}
        rep.save()
        print(f"driver: {rep['driver']}", flush=True)
        return 1
    max_ptx = rep["driver"]["max_ptx_isa"]
    print(f"driver: CUDA {rep['driver']['cuda_driver_version']}, PTX ISA <= {max_ptx}", flush=True)
    rep["cut"], rep["uncut"] = {}, {}
    for case in CASES:
        label = "{} B{} H{} Nq{} Nk{} d{}".format(*case)
        try:
            rep["cut"][label] = run_case(*case, uncut=False, max_ptx=max_ptx)
        except Exception as e:
            rep["cut"][label] = {"error": error_text(e), "ok": False}
        print(f"cut   {label}: {rep['cut'][label]}", flush=True)
        rep.save()
    for case in CASES[:2]:
        label = "{} B{} H{} Nq{} Nk{} d{}".format(*case)
        rep["uncut"][label] = uncut_in_child(case, max_ptx, a.uncut_timeout)
        print(f"uncut {label}: {rep['uncut'][label]}", flush=True)
        rep.save()
    ok = all(r.get("ok") for r in rep["cut"].values())
    print(f"plugin launch contract (cut PTX): {'ok' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
