"""ONNX Runtime int8 on every CPU: which weight encoding is exact where, and the switch at load.

``com.microsoft.DynamicQuantizeMatMul`` quantizes activations to uint8 (asymmetric, per tensor) and
multiplies them with the int8 weights in MLAS. How MLAS multiplies depends on the CPU (read from
onnxruntime/core/mlas/lib/x86_64/Qgemm*.S and qgemm_kernel_*.cpp):

- x86-64 with AVX-VNNI, AVX512-VNNI or AMX: u8 x s8 through vpdpbusd / tdpbusd, exact int32 sums.
- x86-64 with AVX2 or AVX512BW but no VNNI: u8 x s8 through vpmaddubsw, which adds the products of
  each adjacent pair along K into a *saturating* int16. 2 * 255 * 127 = 64770 does not fit, so a
  large activation against a large weight is clipped (issue 14: 4.2% error on the tiny model,
  26.7 dB mid-size images). u8 x u8 there zero-extends both operands to int16 and uses vpmaddwd
  (int32 pair sums, at most 2 * 255 * 255): exact.
- ARM64: widening NEON multiplies, udot/sdot or ummla/smmla: exact for either encoding.

Engines store s8 weights, the encoding that is both exact and fast where VNNI exists (one
768x3072 layer measured on an AMX Xeon: 3.1 int8 TOPS for s8, 0.37 for u8). On an x86-64 CPU
without VNNI the runtime re-encodes each s8 weight as u8 with zero point 128 when the session is
created (the same integers: byte XOR 0x80), so one engine folder is exact on every CPU.

The emulation half of this module reproduces both integer paths in numpy, so tests can show on any
machine what every target computes.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from .cpu import cpu_flags

ENCODINGS = ("auto", "s8", "u8")
ATTN_K_ZP = "attn_k_zero_point"  # the export names it so (export/onnx_export.py)
_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}


def int8_encoding(machine: str | None = None, flags: set[str] | None = None) -> str:
    """The weight encoding MLAS multiplies exactly (and fastest) on this CPU: "s8" or "u8"."""
    machine = (machine or platform.machine()).lower()
    if machine not in _X86:
        return "s8"  # ARM64 and others: no saturating u8 x s8 path
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return "u8"  # unknown x86: the encoding that is exact everywhere
    # MLAS's choice of u8 x s8 kernel (mlasi platform init): AMX overrides everything; with AVX-512
    # core the AVX512-VNNI kernel or else the saturating AVX512-core one (AVX-VNNI is not used there);
    # with AVX2 only, the AVX-VNNI kernel or else the saturating AVX2 one.
    if "amx_int8" in flags:
        return "s8"
    if "avx512bw" in flags:
        return "s8" if "avx512_vnni" in flags else "u8"
    return "s8" if "avx_vnni" in flags else "u8"


# ----------------------------------------------------------------------------------------------
# load time: s8 weights of DynamicQuantizeMatMul nodes -> u8 with zero point 128


def reencode_u8(onnx_path: Path) -> tuple[bytes, dict[str, np.ndarray]] | None:
    """The graph with every int8 DynamicQuantizeMatMul weight re-encoded as uint8 + zero point 128,
    and the int8 attention logits' K quantized against uint8 128 instead of int8 0.

    Returns (graph bytes, {initializer name: uint8 array}) to create the session from, or None when
    the graph has neither. The arrays are read from the external data once; they replace the
    declared initializers (``SessionOptions.add_initializer``) and must outlive the session.
    """
    import onnx
    from onnx import TensorProto, numpy_helper

    from ..runtime.manifest import inside

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    folder = onnx_path.parent
    arrays: dict[str, np.ndarray] = {}
    for n in g.node:
        if n.op_type != "DynamicQuantizeMatMul" or n.domain != "com.microsoft":
            continue
        t = inits.get(n.input[1])
        if t is None or t.data_type != TensorProto.INT8 or (len(n.input) > 3 and n.input[3]):
            continue
        name = t.name + "__u8"
        if name not in arrays:
            arrays[name] = _read_int8(t, folder, inside) ^ np.uint8(0x80)  # q + 128 as a byte
            u = TensorProto()
            u.CopyFrom(t)
            u.name, u.data_type = name, TensorProto.UINT8
            g.initializer.append(u)
            zp = numpy_helper.from_array(np.full(t.dims[-1], 128, np.uint8), t.name + "__zp128")
            g.initializer.append(zp)
        inputs = list(n.input) + [""] * (4 - len(n.input))  # A, B, b_scale, b_zero_point[, bias]
        inputs[1], inputs[3] = name, t.name + "__zp128"
        del n.input[:]
        n.input.extend(inputs)
    # int8 attention logits (export/onnx_export.int8_attention_logits): K is quantized in the graph
    # against one shared int8 zero point; uint8 128 there makes the same integers, u8 x u8
    zp = next((t for t in g.initializer if t.name == ATTN_K_ZP), None)
    if zp is not None:
        zp.CopyFrom(numpy_helper.from_array(np.array(128, np.uint8), ATTN_K_ZP))
    if not arrays and zp is None:
        return None
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return model.SerializeToString(), arrays


def _read_int8(t, folder: Path, inside) -> np.ndarray:
    shape = tuple(t.dims)
    if not t.external_data:
        return np.frombuffer(t.raw_data, np.uint8).reshape(shape).copy()
    ext = {e.key: e.value for e in t.external_data}
    path = inside(folder, ext["location"])
    count = int(np.prod(shape))
    return np.fromfile(path, np.uint8, count=count, offset=int(ext.get("offset", 0))).reshape(shape)
