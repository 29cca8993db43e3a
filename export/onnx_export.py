"""Streamed ONNX export: trace with no weights, then write each weight once, quantizing on the way.

1. ``trace`` runs the dynamo exporter on a model built on the meta device: the graph refers to
   every parameter by name but holds no data (seconds and well under 1 GB for the full model).
2. ``stream_weights`` reads the parameters one at a time from safetensors, rewrites every
   ``MatMul(x, Transpose(W))`` to a pre-transposed weight (float, ``DequantizeLinear`` on int8 /
   fp8 / int4, or ONNX Runtime's ``MatMulNBits``), and appends each tensor to one external-data
   file. Peak memory is about one tensor, whatever the model size.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from ..engine.backends.ort_int8 import ATTN_K_ZP
from ..engine.model import quant as qz
from ..engine.model.spec import NUMPY_DTYPES

OPSET = 21
_ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(ml_dtypes.bfloat16): TensorProto.BFLOAT16,
    np.dtype(ml_dtypes.float8_e4m3fn): TensorProto.FLOAT8E4M3FN,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
}


@dataclass(frozen=True)
class WeightPolicy:
    """How the linear weights of one graph are stored.

    ``fmt``: "float" (in ``act_dtype``), "int8", "fp8" or "int4". ``keep``: name fragments of
    linears left in float (engine/model/spec.py KEEP_FLOAT).
    ``ort_native``: int8/int4 as com.microsoft.MatMulNBits, which ONNX Runtime keeps packed
    (it expands DequantizeLinear weights to fp32 at session creation).
    """

    fmt: str = "float"
    act_dtype: str = "fp32"
    int4_block: int = 64
    ort_native: bool = False
    keep: tuple[str, ...] = ()
    # ONNX Runtime int8 kernel: "dynamic" (DynamicQuantizeMatMul: per-tensor activation quantization,
    # fastest on CPU) or "nbits" (MatMulNBits, activations quantized per block of K: more accurate)
    ort_int8: str = "nbits"
    # W8A8: static activation quantization ("int8" / "fp8", matching ``fmt``) from calibration stats,
    # with SmoothQuant smoothing strength ``smooth_alpha``; emitted as Q/DQ pairs (TensorRT form)
    act_quant: str | None = None
    smooth_alpha: float = 0.5
    # ONNX Runtime int8: attention logits Q K^T as DynamicQuantizeMatMul (Q uint8 per tensor, K int8
    # per tensor, int32 accumulate; VNNI/AMX on x86): 3.4x faster than the fp32 MatMul on an AMX Xeon
    int8_attention: bool = False

    def format_for(self, name: str, shape: tuple[int, ...]) -> str:
        if self.fmt == "float" or any(k in name for k in self.keep):
            return "float"
        if self.fmt == "int4" and shape[1] % self.int4_block:
            return "int8"  # an input dim the block does not divide: the next-best format
        return self.fmt


def trace(
    module, args: tuple, input_names, output_names, dynamic_shapes=None, translations=None
) -> onnx.ModelProto:
    """Export ``module`` (built on the meta device) to a weightless ModelProto."""
    import logging

    import torch

    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module,
            args,
            dynamo=True,
            optimize=False,
            verbose=False,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=translations,
        )
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "graph.onnx"
        prog.save(str(p), include_initializers=False)
        return onnx.load(str(p), load_external_data=False)


@dataclass
class StreamStats:
    tensors: int = 0
    bytes_written: int = 0
    by_format: dict[str, int] = field(default_factory=dict)

    def add(self, fmt: str, n: int) -> None:
        self.tensors += 1
        self.bytes_written += n
        self.by_format[fmt] = self.by_format.get(fmt, 0) + n


class _DataWriter:
    """Appends tensors to one external-data file, 64-byte aligned."""

    def __init__(self, path: Path):
        self.path, self.f, self.offset = path, open(path, "wb"), 0

    def tensor(self, name: str, onnx_type: int, dims, raw: bytes) -> TensorProto:
        pad = -self.offset % 64
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        self.f.write(raw)
        t = TensorProto(name=name, data_type=onnx_type, dims=list(dims))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(len(raw)))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += len(raw)
        return t

    def array(self, name: str, a: np.ndarray) -> TensorProto:
        a = np.ascontiguousarray(a)
        return self.tensor(name, _ONNX_TYPES[a.dtype], a.shape, a.tobytes())

    def close(self):
        self.f.close()


def _dangling(graph: onnx.GraphProto) -> list[str]:
    produced = {o for n in graph.node for o in n.output}
    produced |= {i.name for i in graph.input} | {i.name for i in graph.initializer}
    seen = []
    for n in graph.node:
        for i in n.input:
            if i and i not in produced and i not in seen:
                seen.append(i)
    return seen


def stream_weights(
    model: onnx.ModelProto,
    read: Callable[[str], np.ndarray],
    policy: WeightPolicy,
    data_path: Path,
    param_dtypes: dict[str, np.dtype] | None = None,
    progress: Callable[[int, int], None] | None = None,
    act_stats: dict[str, np.ndarray] | None = None,
) -> StreamStats:
    """Attach every parameter of the traced graph from ``read(name)``, quantizing linear weights.

    ``read`` gets the graph's parameter name; ``param_dtypes`` gives each float parameter's dtype
    in the graph (default: the activation dtype).
    """
    g = model.graph
    act = NUMPY_DTYPES[policy.act_dtype]
    params = _dangling(g)
    linear = _linear_weights(g, params)
    writer = _DataWriter(data_path)
    stats = StreamStats()
    new_nodes: list[onnx.NodeProto] = []
    drop: set[int] = set()
    replace_node: dict[int, onnx.NodeProto] = {}
    insert_before: dict[int, list[onnx.NodeProto]] = {}  # activation Q/DQ goes right before its MatMul
    uses_ms = False
    try:
        for i, name in enumerate(params):
            w = read(name)
            if name not in linear:
                dt = (param_dtypes or {}).get(name, act)
                arr = w.astype(dt) if w.dtype.kind == "f" or w.dtype == qz.FP8 else w
                t = writer.array(name, arr)
                g.initializer.append(t)
                stats.add("float", arr.nbytes)
                continue
            tnode, users = linear[name]
            drop.add(id(tnode))
            fmt = policy.format_for(name, w.shape)
            nbits = {"int8": 8, "int4": 4}.get(fmt)
            block = _nbits_block(w.shape[1], policy.int4_block if fmt == "int4" else 128)
            if policy.ort_native and fmt == "int8" and policy.ort_int8 == "dynamic":
                replace_node.update(_dynamic_int8(writer, g, name, w, users, stats))
                uses_ms = True
            elif policy.ort_native and nbits and block:
                replace_node.update(
                    _matmul_nbits(writer, g, name, w, users, fmt, nbits, block, policy, act, stats)
                )
                uses_ms = True
            elif fmt == "float":
                wt = np.ascontiguousarray(w.T).astype(act)  # (in, out): no Transpose at run time
                g.initializer.append(writer.array(name + "_T", wt))
                stats.add("float", wt.nbytes)
                _rewire(users, tnode.output[0], name + "_T")
            else:
                amax = (act_stats or {}).get(name) if policy.act_quant else None
                if amax is not None and fmt == policy.act_quant:
                    from .calibrate import smoothing

                    sm = smoothing(amax, w, policy.smooth_alpha)
                    w = w.astype(np.float32) * sm[None, :]
                    insert_before.update(_quantize_activation(writer, g, name, users, sm, amax, fmt, act))
                new_nodes.append(_dequantize(writer, g, name, w, fmt, policy.int4_block, act, stats))
                _rewire(users, tnode.output[0], name + "_dq")
            del w
            if progress is not None:
                progress(i + 1, len(params))
    finally:
        writer.close()
    nodes = []
    for n in g.node:
        if id(n) in drop:
            continue
        nodes += insert_before.get(id(n), [])
        nodes.append(replace_node.get(id(n), n))
    del g.node[:]
    g.node.extend(new_nodes + nodes)
    if policy.int8_attention:
        uses_ms |= int8_attention_logits(g) > 0
    if uses_ms and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return stats


def int8_attention_logits(g: onnx.GraphProto) -> int:
    """Every ``Softmax(MatMul(Q, K^T))`` (attention logits, the scale already inside Q and K) becomes
    ``DynamicQuantizeMatMul(Q, QuantizeLinear(K^T, s_k, zp), s_k, zp)``: Q quantized to uint8 per
    tensor by the operator, K^T to int8 with one symmetric scale ``s_k = max|K| / 127`` computed in
    the graph. All heads and both CFG halves share the scales (qk-LayerNorm keeps their ranges alike).

    The zero point is one shared initializer (int8 0): on CPUs where MLAS multiplies u8 x s8 with
    saturating int16 pair sums, the runtime swaps it for uint8 128 (ort_int8.reencode_u8), which
    gives the same integers through the exact u8 x u8 kernel. Returns how many were rewritten.
    """
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    replace: dict[int, list[onnx.NodeProto]] = {}
    for sm in g.node:
        mm = producers.get(sm.input[0]) if sm.op_type == "Softmax" else None
        if mm is None or mm.op_type != "MatMul" or len(consumers.get(mm.output[0], [])) != 1:
            continue
        q, kt = mm.input
        p = f"{mm.name or mm.output[0]}_i8"
        replace[id(mm)] = [
            helper.make_node("Abs", [kt], [p + "_abs"]),
            helper.make_node("ReduceMax", [p + "_abs"], [p + "_max"], keepdims=0),
            helper.make_node("Max", [p + "_max", "attn_tiny"], [p + "_max1"]),
            helper.make_node("Div", [p + "_max1", "attn_127"], [p + "_scale"]),
            helper.make_node("QuantizeLinear", [kt, p + "_scale", ATTN_K_ZP], [p + "_k"]),
            helper.make_node(
                "DynamicQuantizeMatMul",
                [q, p + "_k", p + "_scale", ATTN_K_ZP],
                list(mm.output),
                domain="com.microsoft",
            ),
        ]
    if not replace:
        return 0
    g.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.array(1e-30, np.float32), "attn_tiny"),
            onnx.numpy_helper.from_array(np.array(127.0, np.float32), "attn_127"),
            onnx.numpy_helper.from_array(np.array(0, np.int8), ATTN_K_ZP),
        ]
    )
    nodes = [x for n in g.node for x in replace.get(id(n), [n])]
    del g.node[:]
    g.node.extend(nodes)
    return len(replace)


def _linear_weights(g: onnx.GraphProto, params) -> dict:
    """Linear weights: Transpose(W) whose every consumer is a MatMul taking it as B.
    -> {weight name: (transpose node, its MatMul users)}."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    linear = {}
    for n in g.node:
        if n.op_type == "Transpose" and n.input[0] in params:
            users = consumers.get(n.output[0], [])
            if users and all(u.op_type == "MatMul" and u.input[1] == n.output[0] for u in users):
                linear[n.input[0]] = (n, users)
    return linear


def _dynamic_int8(writer, g, name: str, w: np.ndarray, users, stats) -> dict:
    """ONNX Runtime's fastest CPU int8 path: activations quantized per tensor at run time (uint8,
    asymmetric), int8 weights per output channel, int32 accumulate. -> {id(MatMul): replacement}."""
    q, s = qz.quantize_int8(w)
    qt = np.ascontiguousarray(q.T)  # (in, out)
    g.initializer.append(writer.array(name + "_q", qt))
    g.initializer.append(writer.array(name + "_scale", s.astype(np.float32)))
    stats.add("int8", qt.nbytes + s.nbytes)
    ins = [name + "_q", name + "_scale"]
    return {
        id(u): helper.make_node(
            "DynamicQuantizeMatMul", [u.input[0], *ins], list(u.output), domain="com.microsoft"
        )
        for u in users
    }


def _matmul_nbits(
    writer, g, name: str, w, users, fmt: str, nbits: int, block: int, policy, act, stats
) -> dict:
    """int8 / int4 weights packed for com.microsoft.MatMulNBits. -> {id(MatMul): replacement}."""
    q, s = qz.quantize_int4(w, policy.int4_block) if fmt == "int4" else qz.quantize_int8(w)
    if fmt == "int8":  # per-channel scale, repeated over the blocks
        s = np.repeat(s[:, None], w.shape[1] // block, axis=1)
    blob = qz.matmul_nbits_blob(q, nbits, block)
    g.initializer.append(writer.array(name + "_nbits", blob))
    g.initializer.append(writer.array(name + "_nbits_scale", s.astype(act).reshape(-1)))
    stats.add(fmt, blob.nbytes + s.size * act.itemsize)
    k, n = w.shape[1], w.shape[0]
    ins = [name + "_nbits", name + "_nbits_scale"]
    return {
        id(u): helper.make_node(
            "MatMulNBits",
            [u.input[0], *ins],
            list(u.output),
            domain="com.microsoft",
            K=k,
            N=n,
            bits=nbits,
            block_size=block,
            accuracy_level=4,
        )  # fmt: skip
        for u in users
    }


def _nbits_block(k: int, want: int) -> int | None:
    b = want
    while b >= 16:
        if k % b == 0:
            return b
        b //= 2
    return None


def _rewire(users, old: str, new: str) -> None:
    for u in users:
        for j, x in enumerate(u.input):
            if x == old:
                u.input[j] = new


def _dequantize(writer, g, name, w, fmt, block, act, stats) -> onnx.NodeProto:
    """Standard DequantizeLinear on a pre-transposed (in, out) weight (TensorRT and ORT both read it)."""
    if fmt == "int4":
        q, s = qz.quantize_int4(w, block)
        qt, st = np.ascontiguousarray(q.T), np.ascontiguousarray(s.T).astype(act)  # (in, out), (in/b, out)
        raw = qz.pack_int4(qt)
        g.initializer.append(writer.tensor(name + "_q", TensorProto.INT4, qt.shape, raw))
        g.initializer.append(writer.array(name + "_scale", st))
        stats.add(fmt, len(raw) + st.nbytes)
        return helper.make_node(
            "DequantizeLinear", [name + "_q", name + "_scale"], [name + "_dq"], axis=0, block_size=block
        )
    q, s = qz.quantize_fp8(w) if fmt == "fp8" else qz.quantize_int8(w)
    qt = np.ascontiguousarray(q.T)  # (in, out), scale per output channel = axis 1
    g.initializer.append(writer.array(name + "_q", qt))
    g.initializer.append(writer.array(name + "_scale", s.astype(act)))
    stats.add(fmt, qt.nbytes + s.size * act.itemsize)
    return helper.make_node("DequantizeLinear", [name + "_q", name + "_scale"], [name + "_dq"], axis=1)


def _quantize_activation(writer, g, name, users, sm, amax, fmt, act) -> dict[int, list[onnx.NodeProto]]:
    """x -> Mul(1/s) -> QuantizeLinear -> DequantizeLinear, static per-tensor scale; rewires the MatMuls."""
    qmax = qz.FP8_MAX if fmt == "fp8" else 127.0
    scale = np.array(max(float((amax / sm).max()) / qmax, 1e-12), dtype=act)
    g.initializer.append(writer.array(name + "_smooth", (1.0 / sm).astype(act)))
    g.initializer.append(writer.array(name + "_act_scale", scale))
    zp = np.zeros((), qz.FP8 if fmt == "fp8" else np.int8)
    g.initializer.append(writer.array(name + "_act_zp", zp))
    out = {}
    for i, u in enumerate(users):
        x = u.input[0]
        t = f"{name}_x{i}"
        out[id(u)] = [
            helper.make_node("Mul", [x, name + "_smooth"], [t + "_s"]),
            helper.make_node("QuantizeLinear", [t + "_s", name + "_act_scale", name + "_act_zp"], [t + "_q"]),
            helper.make_node(
                "DequantizeLinear", [t + "_q", name + "_act_scale", name + "_act_zp"], [t + "_dq"]
            ),
        ]
        u.input[0] = t + "_dq"
    return out


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write the graph (weights already external) atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(model.SerializeToString())
    os.replace(tmp, path)
