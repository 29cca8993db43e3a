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
``tensorrt.plugin`` API): the op is registered with ``@trtp.register`` (shape/type description)
and ``@trtp.aot_impl`` (our Triton kernel compiled ahead of time to PTX for the build GPU).
"""

import torch  # annotations of the custom op are evaluated by torch.library (no postponed annotations here)

DOMAIN, OP = "auraflow_edge", "AuraFlowAttention"
_state = {}


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
                            a("q_norm", OpSchema.AttrType.INT, "1: LayerNorm q per head inside the kernel")],
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
        from ..engine.model import fp32_layer_norm
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
        return opset.AuraFlowAttention(q, k, v, eps=eps, scale=scale, q_norm=q_norm)

    return {torch.ops.auraflow_edge.attention.default: to_onnx}


def install(model) -> None:
    """Route every attention of an AuraFlowTransformer through the custom op."""
    from ..engine.model import fp32_layer_norm
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


def register_tensorrt_plugin(arch: int) -> None:  # pragma: no cover - needs TensorRT and a GPU
    """Register AuraFlowAttention with TensorRT's Python plugin API, implemented by our
    ahead-of-time compiled Triton kernel (single-kernel form: Q and K normalised in the kernel)."""
    import numpy as np
    import tensorrt.plugin as trtp

    from ..kernels import attention as A
    from ..kernels.aot import compile_variant

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
        d = int(q.shape_expr[3])
        dt = {np.float16: "fp16"}.get(q.dtype, "bf16")
        bm, bn, warps, stages = A.block_sizes(d, False)
        sig = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "Out": f"*{dt}", "QS": "*fp32", "KS": "*fp32"}
        sig |= {n: "i32" for n in [f"s{t}{a}" for t in "qkvo" for a in "bhnd"] + ["H", "N_Q", "N_K", "D"]}
        sig |= {"qk_scale": "fp32", "eps": "fp32"}
        # one kernel: K arrives normalised; Q normalised in-kernel when q_norm
        const = dict(
            Q_NORM=bool(q_norm), INT8=False, IEEE=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, QB=A.QUANT_GROUP
        )
        compiled = compile_variant(A._attn_fwd, sig, const, arch, warps, stages)
        b, h, n = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(n, bm)
        launch.grid_y = b * h
        launch.block_x = warps * 32
        launch.shared_mem = compiled.metadata.shared
        strides = [h * n * d, n * d, d, 1]
        extra = trtp.SymIntExprs(4 * 4 + 4 + 2)
        vals = strides * 4 + [h, n, n, d]
        for i, e in enumerate(vals):
            extra[i] = trtp.SymInt32(e)
        extra[len(vals)] = (
            trtp.SymFloat32(scale * A.LOG2E) if hasattr(trtp, "SymFloat32") else scale * A.LOG2E
        )
        return compiled.metadata.name, compiled.asm["ptx"], launch, extra
