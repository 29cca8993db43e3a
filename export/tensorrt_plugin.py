"""The fused qk-norm attention as one ONNX node, and as a TensorRT plugin for that node.

Export side (runs anywhere): ``auraflow_edge::attention`` is a torch custom op whose ONNX
translation is a single ``auraflow_edge.AuraFlowAttention(q, k, v)`` node (attributes eps, scale,
q_norm), with its schema registered in onnx so the graph checks. K arrives normalised by a
standard LayerNormalization (once per token, not once per query block); Q is normalised inside the
kernel at head_dim <= 128 (``q_norm=1``) and by LayerNormalization above that, where the in-kernel
norm would spill registers. ``--attention-plugin`` puts it
in the transformer graph instead of the standard-ops attention (which stays the default until the
plugin is measured on a GPU).

TensorRT side (needs tensorrt >= 10.6 and a GPU; UNVERIFIED here, written to the documented
``tensorrt.plugin`` API and NVIDIA's quickly_deployable_plugins sample): the op is registered with
``@trtp.register`` (shape/type description) and ``@trtp.aot_impl`` (our Triton kernel compiled
ahead of time to PTX for the build GPU). The ONNX parser maps the node to the plugin by its op type
and its ``plugin_namespace`` attribute, and picks the AOT implementation when ``aot`` is 1.
TensorRT launches an AOT kernel with the input pointers, then the int32 scalars the plugin
returns, then the output pointers; ``_attn_trt`` is that signature around ``_attn_fwd``, with the
softmax scale and eps compiled in.
"""

import torch  # annotations of the custom op are evaluated by torch.library (no postponed annotations here)

from ..engine.errors import UserError

try:
    import triton
    import triton.language as tl

    from ..kernels.attention import _attn_fwd
except ImportError:  # export-only installs: the ONNX side needs no triton
    triton = None

DOMAIN, OP = "auraflow_edge", "AuraFlowAttention"
_state = {}
# TensorRT data type name -> Triton type of the kernel built for it (a strongly typed engine
# gives the plugin the graph's dtype: fp16 engines get the fp16 kernel, bf16 the bf16 one)
TRT_DTYPES = {"HALF": "fp16", "BF16": "bf16", "FLOAT": "fp32"}


def register_onnx_schema() -> None:
    import onnx
    from onnx.defs import OpSchema

    if _state.get("schema"):
        return
    try:
        onnx.defs.get_schema(OP, 1, DOMAIN)
    except Exception:
        p = OpSchema.FormalParameter
        a = OpSchema.Attribute
        onnx.defs.register_schema(
            OpSchema(
                OP, DOMAIN, 1,
                doc="softmax(LN?(q) k^T * scale) v per head; q/k/v (B, H, N, D); LN: fp32 stats, no affine",
                inputs=[p("q", "T"), p("k", "T"), p("v", "T")],
                outputs=[p("out", "T")],
                type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types")],
                attributes=[a("eps", OpSchema.AttrType.FLOAT, "LayerNorm epsilon"),
                            a("scale", OpSchema.AttrType.FLOAT, "softmax scale"),
                            a("q_norm", OpSchema.AttrType.INT, "1: LayerNorm q per head inside the kernel"),
                            a("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace"),
                            a("aot", OpSchema.AttrType.INT, "1: TensorRT uses the plugin's AOT implementation")],
            )
        )  # fmt: skip
    _state["schema"] = True


def torch_op():
    """The torch custom op (registered once); its fake implementation lets it trace on meta."""
    if "op" in _state:
        return _state["op"]

    @torch.library.custom_op("auraflow_edge::attention", mutates_args=())
    def attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, scale: float, q_norm: int
    ) -> torch.Tensor:
        from ..engine.model.transformer import fp32_layer_norm
        from ..kernels.attention import attention_reference

        q = fp32_layer_norm(q, eps) if q_norm else q
        return attention_reference(q, k, v, qk_norm=False, scale=scale)

    @attention.register_fake
    def _(q, k, v, eps, scale, q_norm):
        return torch.empty_like(q)

    _state["op"] = attention
    return attention


def translation_table() -> dict:
    """torch.onnx custom_translation_table: the custom op -> one AuraFlowAttention node."""
    import onnxscript

    register_onnx_schema()
    torch_op()
    opset = onnxscript.values.Opset(DOMAIN, 1)

    def to_onnx(q, k, v, eps: float, scale: float, q_norm: int):
        # plugin_namespace + op type name the TensorRT plugin; aot=1 selects its AOT implementation
        return opset.AuraFlowAttention(
            q, k, v, eps=eps, scale=scale, q_norm=q_norm, plugin_namespace=DOMAIN, aot=1
        )

    return {torch.ops.auraflow_edge.attention.default: to_onnx}


def install(model) -> None:
    """Route every attention of an AuraFlowTransformer through the custom op."""
    from ..engine.model.transformer import fp32_layer_norm
    from ..kernels.attention import q_norm_in_kernel

    op = torch_op()

    def core(q, k, v, eps, scale):
        k = fp32_layer_norm(k, eps)
        if q_norm_in_kernel(q.shape[-1]):
            return op(q, k, v, eps, scale, 1)
        return op(fp32_layer_norm(q, eps), k, v, eps, scale, 0)

    for m in model.modules():
        if hasattr(m, "core"):
            m.core = core


if triton is not None:

    @triton.jit
    def _attn_trt(
        Q, K, V, H, N_Q, N_K, Out,
        QK_SCALE: tl.constexpr, EPS: tl.constexpr, Q_NORM: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, QB: tl.constexpr,
    ):  # fmt: skip
        """TensorRT's AOT calling convention (inputs, int32 scalars, outputs) over contiguous
        (B, H, N, BLOCK_D) tensors; K arrives normalised, Q is normalised here when Q_NORM."""
        _attn_fwd(
            Q, K, V, Out, Q, K,  # QS / KS: unused without INT8
            H * N_Q * BLOCK_D, N_Q * BLOCK_D, BLOCK_D, 1,
            H * N_K * BLOCK_D, N_K * BLOCK_D, BLOCK_D, 1,
            H * N_K * BLOCK_D, N_K * BLOCK_D, BLOCK_D, 1,
            H * N_Q * BLOCK_D, N_Q * BLOCK_D, BLOCK_D, 1,
            H, N_Q, N_K, BLOCK_D, QK_SCALE, EPS,
            Q_NORM, False, IEEE, BLOCK_M, BLOCK_N, BLOCK_D, QB,
        )  # fmt: skip


def kernel_dtype(trt, dtype) -> str:
    """The Triton type of the kernel for a TensorRT data type (``q.dtype`` of a TensorDesc)."""
    for name, tt in TRT_DTYPES.items():
        if dtype == getattr(trt.DataType, name):
            return tt
    raise UserError(f"the attention plugin supports fp16, bf16 and fp32 tensors, not {dtype}")


def plugin_kernel(head_dim: int, dtype: str, eps: float, scale: float, q_norm: int):
    """(signature, constexprs, num_warps, num_stages, BLOCK_M) of ``_attn_trt`` for one node."""
    from ..kernels import attention as A

    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise UserError(f"the attention plugin needs a power-of-two head_dim in 16..256, got {head_dim}")
    bm, bn, warps, stages = A.block_sizes(head_dim, False)
    ptr = f"*{dtype}"
    sig = {"Q": ptr, "K": ptr, "V": ptr, "H": "i32", "N_Q": "i32", "N_K": "i32", "Out": ptr}
    const = dict(
        QK_SCALE=float(scale) * A.LOG2E,
        EPS=float(eps),
        Q_NORM=bool(q_norm),
        IEEE=dtype == "fp32",
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=head_dim,
        QB=A.QUANT_GROUP,
    )
    return sig, const, warps, stages, bm


def aot_impl(trt, trtp, arch: int, q, k, eps: float, scale: float, q_norm: int):
    """What ``@trtp.aot_impl`` returns for one node: (kernel name, PTX, launch parameters, the
    int32 scalars H, N_Q, N_K as symbolic expressions of the input shapes)."""
    from ..kernels.aot import compile_variant

    d = q.shape_expr[3]
    if not d.is_constant:
        raise UserError("the attention plugin needs a static head_dim (last axis of q)")
    sig, const, warps, stages, bm = plugin_kernel(
        d.constant_value(), kernel_dtype(trt, q.dtype), eps, scale, q_norm
    )
    # TensorRT allocations are 256-byte aligned: pointers compile with the divisibility the JIT gives them
    compiled = compile_variant(_attn_trt, sig, const, arch, warps, stages)
    b, h, nq, nk = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2], k.shape_expr[2]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(nq, bm)
    launch.grid_y = b * h
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (h, nq, nk)])
    return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), launch, extra


def register_tensorrt_plugin(arch: int) -> None:  # pragma: no cover - needs TensorRT and a GPU
    """Register AuraFlowAttention with TensorRT's Python plugin API, implemented by our
    ahead-of-time compiled Triton kernel (K normalised by the graph, Q by the kernel when q_norm)."""
    if _state.get("trt"):
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(f"{DOMAIN}::{OP}")
    def _desc(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, eps: float, scale: float, q_norm: int
    ) -> trtp.TensorDesc:
        return q.like()

    @trtp.aot_impl(f"{DOMAIN}::{OP}")
    def _impl(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        eps: float,
        scale: float,
        q_norm: int,
        outputs,
        tactic,
    ):
        return aot_impl(trt, trtp, arch, q, k, eps, scale, q_norm)

    _state["trt"] = True
