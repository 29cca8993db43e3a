"""The fused qk-norm attention as one ONNX node, and as a TensorRT plugin for that node.

Export side (runs anywhere): ``auraflow_edge::attention`` is a torch custom op whose ONNX
translation is a single ``auraflow_edge.AuraFlowAttention(q, k, v)`` node, with its schema
registered in onnx so the graph checks. Its numbers travel in ONE float array attribute,
``params = [eps, scale, q_norm]``: TensorRT's plugin layer hands an AOT implementation its
attributes by position, in the order the plugin fields arrive (``tensorrt.plugin._plugin_class``,
``get_launch_params``), so separate attributes would be read correctly only while every parser
keeps one order; one array cannot be reordered. K arrives normalised by a
standard LayerNormalization (once per token, not once per query block); Q is normalised inside the
kernel at head_dim <= 128 (``q_norm=1``) and by LayerNormalization above that, where the in-kernel
norm would spill registers. ``--attention-plugin`` puts it
in the transformer graph instead of the standard-ops attention (which stays the default until the
plugin is measured on a GPU).

TensorRT side: the op is registered with ``@trtp.register`` (shape/type description) and
``@trtp.aot_impl`` (our Triton kernel compiled ahead of time to PTX for the build GPU). Registration,
``create_plugin`` and ``aot_impl`` run through NVIDIA's own ``tensorrt.plugin`` code in the test
suite (tests/test_trt_real.py); a real engine build is UNVERIFIED. The ONNX parser maps the node to
the plugin by its op type and its ``plugin_namespace`` attribute, picks the AOT implementation when
``aot`` is 1, and passes the creator's declared fields in the creator's order, skipping node
attributes the creator does not declare (onnx-tensorrt ``onnxOpImporters.cpp`` ``loadFields``,
``importerUtils.cpp`` ``createPlugin``). ``plugin_namespace`` and ``aot`` are declared anyway, and
the implementation takes its attributes in any order and any subset, so a parser that forwards or
drops them changes nothing.

TensorRT launches an AOT kernel with the input pointers, then the int32 scalars the plugin returns,
then the output pointers: 7 parameters here. ``_attn_trt`` is that signature around ``_attn_fwd``,
with the softmax scale and eps compiled in; Triton appends scratch pointers to every kernel (3.5+:
two), which ``cut_entry_params`` removes from the PTX after checking the kernel never reads them.
Nothing tells TensorRT to opt a kernel in above 48 KiB of dynamic shared memory
(``IKernelLaunchParams::setSharedMem`` documents a size only), so the plugin's launch configuration
is chosen to fit 48 KiB (``SHARED_LIMIT``), and its PTX ISA is capped to what the build machine's
driver loads (``driver_ptx_isa``).
"""

import re

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
PARAMS = ("eps", "scale", "q_norm")  # the order of the node's one ``params`` attribute
N_KERNEL_PARAMS = 7  # Q, K, V, H, N_Q, N_K, Out: what TensorRT passes an AOT kernel
# Dynamic shared memory a kernel may use without cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES),
# which TensorRT is not documented to call for AOT plugin kernels.
SHARED_LIMIT = 48 * 1024


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
                attributes=[a("params", OpSchema.AttrType.FLOATS,
                              "[eps, scale, q_norm]: LayerNorm epsilon, softmax scale, 1 to LayerNorm q per head "
                              "inside the kernel"),
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
        params = [float(eps), float(scale), float(q_norm)]
        return opset.AuraFlowAttention(q, k, v, params=params, plugin_namespace=DOMAIN, aot=1)

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
    """(signature, constexprs, num_warps, num_stages, BLOCK_M) of ``_attn_trt`` for one node, with
    the kernel's own block sizes (``launch_configs`` lists the smaller fallbacks)."""
    return launch_configs(head_dim, dtype, eps, scale, q_norm)[0]


def launch_configs(head_dim: int, dtype: str, eps: float, scale: float, q_norm: int) -> list[tuple]:
    """Candidate (signature, constexprs, num_warps, num_stages, BLOCK_M), first to last: the first
    whose compiled kernel fits ``SHARED_LIMIT`` is used. Two pipelined stages where they fit (cp.async),
    else one, else narrower K/V tiles, else fewer query rows: sm_90 d256 needs 98,304 B with two
    stages, 49,152 B with one; sm_86 d256 53,248 B with one stage at BLOCK_N 32, 43,008 B at 16."""
    from ..kernels import attention as A

    if head_dim & (head_dim - 1) or not 16 <= head_dim <= 256:
        raise UserError(f"the attention plugin needs a power-of-two head_dim in 16..256, got {head_dim}")
    bm, bn, warps, stages = A.block_sizes(head_dim, False)
    ptr = f"*{dtype}"
    sig = {"Q": ptr, "K": ptr, "V": ptr, "H": "i32", "N_Q": "i32", "N_K": "i32", "Out": ptr}
    half_n, half_m = max(bn // 2, 16), max(bm // 2, 16)
    tiles = [(bm, bn, warps, stages), (bm, bn, warps, 1), (bm, half_n, warps, stages), (bm, half_n, warps, 1)]
    tiles.append((half_m, bn, max(warps // 2, 4), 1))
    if head_dim >= 256:  # two stages of 256-wide tiles never fit 48 KiB (measured above): skip the compiles
        tiles = [t for t in tiles if t[3] == 1]
    out = []
    for m, n, w, st in dict.fromkeys(tiles):
        const = dict(
            QK_SCALE=float(scale) * A.LOG2E,
            EPS=float(eps),
            Q_NORM=bool(q_norm),
            IEEE=dtype == "fp32",
            BLOCK_M=m,
            BLOCK_N=n,
            BLOCK_D=head_dim,
            QB=A.QUANT_GROUP,
        )
        out.append((sig, const, w, st, m))
    return out


def node_params(attrs) -> tuple[float, float, int]:
    """(eps, scale, q_norm) from the attribute values TensorRT passes, in any order: the one float
    array among them (``plugin_namespace`` is a str, ``aot`` an int, if a parser forwards them)."""
    import numpy as np

    arrays = [a for a in attrs if isinstance(a, np.ndarray)]
    if len(arrays) != 1 or arrays[0].shape != (len(PARAMS),):
        raise UserError(
            f"the attention plugin needs one float attribute 'params' = [{', '.join(PARAMS)}]; got {attrs!r} "
            "(re-export the model with this version)"
        )
    eps, scale, q_norm = (float(x) for x in arrays[0])
    return eps, scale, int(q_norm)


def driver_ptx_isa(driver_version: int) -> int:
    """The newest PTX ISA (e.g. 87 for 8.7) a driver loads, from ``cuDriverGetVersion`` (e.g. 12080).

    The PTX ISA release notes pair each CUDA release with one ISA: 12.0-12.5 -> 8.0-8.5, 12.6 -> 8.5,
    12.8 -> 8.7, 12.9 -> 8.8, 13.x -> 9.x (Triton's ``ptx_get_version`` uses the same table)."""
    major, minor = driver_version // 1000, driver_version % 1000 // 10
    if major >= 13:
        return 90 + (major - 13) * 10 + minor
    if major == 12:
        return 80 + minor if minor < 6 else 80 + minor - 1
    raise UserError(
        f"the NVIDIA driver supports CUDA {major}.{minor}; the attention plugin's PTX needs CUDA 12 or newer"
    )


def ptx_isa(ptx: str) -> int:
    m = re.search(r"^\.version (\d+)\.(\d+)", ptx, flags=re.MULTILINE)
    if not m:
        raise UserError("the compiled kernel's PTX has no .version line")
    return int(m.group(1)) * 10 + int(m.group(2))


def cut_entry_params(ptx: str, name: str, keep: int, metadata) -> str:
    """The PTX with the ``.entry`` parameter list cut to its first ``keep`` parameters.

    Triton appends scratch-buffer pointers to every kernel (``global_scratch``, and from 3.5
    ``profile_scratch``); TensorRT passes only the plugin's own arguments, so with them left in, the
    entry's parameter layout no longer matches the launch. They are removed only when the kernel
    asks for no scratch memory and its body never reads them; anything else is refused."""
    scratch = {k: int(getattr(metadata, k, 0) or 0) for k in ("global_scratch_size", "profile_scratch_size")}
    if any(scratch.values()):
        raise UserError(f"kernel {name} needs Triton scratch memory {scratch}; TensorRT cannot provide it")
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, flags=re.DOTALL)
    if not m:
        raise UserError(f"no .entry {name} in the compiled PTX")
    params = [p.strip() for p in m.group(1).split(",") if p.strip()]
    if len(params) < keep:
        raise UserError(f"kernel {name} has {len(params)} parameters, fewer than the {keep} TensorRT passes")
    body = ptx[m.end() :]
    for p in params[keep:]:
        pname = p.split()[-1]
        if re.search(re.escape(pname) + r"\b", body):
            raise UserError(f"kernel {name} reads its extra parameter {pname}; it cannot be cut")
    cut = ",\n\t".join(params[:keep])
    return ptx[: m.start(1)] + "\n\t" + cut + "\n" + ptx[m.end(1) :]


def compile_plugin_kernel(arch: int, head_dim: int, dtype: str, eps: float, scale: float, q_norm: int,
                          max_ptx: int | None = None):  # fmt: skip
    """(compiled kernel, PTX cut to TensorRT's 7 parameters, BLOCK_M), memoized: TensorRT asks once
    per plugin layer and format, the transformer has one layer per block."""
    from ..kernels.aot import compile_variant

    key = ("kernel", arch, head_dim, dtype, eps, scale, q_norm, max_ptx)
    if key in _state:
        return _state[key]
    for sig, const, warps, stages, _ in launch_configs(head_dim, dtype, eps, scale, q_norm):
        # TensorRT allocations are 256-byte aligned: pointers compile with the divisibility the JIT gives them
        compiled = compile_variant(_attn_trt, sig, const, arch, warps, stages)
        if max_ptx is not None and ptx_isa(compiled.asm["ptx"]) > max_ptx:
            compiled = compile_variant(_attn_trt, sig, const, arch, warps, stages, ptx_version=max_ptx)
        if compiled.metadata.shared <= SHARED_LIMIT:
            break
    else:
        raise UserError(
            f"no launch configuration of the attention plugin fits {SHARED_LIMIT} B of shared memory at "
            f"head_dim {head_dim} on sm_{arch}; build without --attention-plugin"
        )
    ptx = cut_entry_params(compiled.asm["ptx"], compiled.metadata.name, N_KERNEL_PARAMS, compiled.metadata)
    _state[key] = compiled, ptx, const["BLOCK_M"]
    return _state[key]


def aot_impl(trt, trtp, arch: int, q, k, eps: float, scale: float, q_norm: int, max_ptx: int | None = None):
    """What ``@trtp.aot_impl`` returns for one node: (kernel name, PTX, launch parameters, the
    int32 scalars H, N_Q, N_K as symbolic expressions of the input shapes)."""
    d = q.shape_expr[3]
    if not d.is_constant:
        raise UserError("the attention plugin needs a static head_dim (last axis of q)")
    dtype = kernel_dtype(trt, q.dtype)
    compiled, ptx, bm = compile_plugin_kernel(arch, d.constant_value(), dtype, eps, scale, q_norm, max_ptx)
    b, h, nq, nk = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2], k.shape_expr[2]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(nq, bm)
    launch.grid_y = b * h
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (h, nq, nk)])
    _state.setdefault("built", []).append(
        {
            "dtype": dtype,
            "head_dim": d.constant_value(),
            "ptx_version": ptx_isa(ptx),
            "shared_bytes": int(compiled.metadata.shared),
        }
    )
    return compiled.metadata.name.encode(), ptx.encode(), launch, extra


def plugin_functions(trt, trtp):
    """The functions ``@trtp.register`` and ``@trtp.aot_impl`` decorate. Their signatures are
    declared (``__signature__``: what NVIDIA's validation reads) while the functions themselves take
    the attributes in whatever order and number TensorRT passes them (see the module docstring)."""
    import inspect

    import numpy as np
    import numpy.typing as npt

    P = inspect.Parameter
    tensors = [P(n, P.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc) for n in ("q", "k", "v")]
    attrs = [
        P("params", P.POSITIONAL_OR_KEYWORD, annotation=npt.NDArray[np.float32]),
        P("plugin_namespace", P.POSITIONAL_OR_KEYWORD, annotation=str),
        P("aot", P.POSITIONAL_OR_KEYWORD, annotation=int),
    ]
    tail = [P("outputs", P.POSITIONAL_OR_KEYWORD), P("tactic", P.POSITIONAL_OR_KEYWORD, annotation=int)]
    ret = tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs]

    def desc(q, k, v, **attrs):
        return q.like()

    def impl(q, k, v, *rest):
        *values, _outputs, _tactic = rest
        arch, max_ptx = _state["target"]
        return aot_impl(trt, trtp, arch, q, k, *node_params(values), max_ptx=max_ptx)

    desc.__signature__ = inspect.Signature([*tensors, *attrs], return_annotation=trtp.TensorDesc)
    impl.__signature__ = inspect.Signature([*tensors, *attrs, *tail], return_annotation=ret)
    return desc, impl


def register_tensorrt_plugin(arch: int, max_ptx: int | None = None) -> None:
    """Register AuraFlowAttention with TensorRT's Python plugin API, implemented by our
    ahead-of-time compiled Triton kernel for sm_``arch`` with PTX no newer than ``max_ptx``.

    Registration lives as long as the process (``tensorrt.plugin.op``); calling this again, also
    after a failed attempt, completes what is missing and retargets the kernel, never redefines."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    _state["target"] = (arch, max_ptx)
    plugin_id = f"{DOMAIN}::{OP}"
    desc, impl = plugin_functions(trt, trtp)
    defined = getattr(getattr(trtp.op, DOMAIN, None), OP, None)
    if defined is None:
        trtp.register(plugin_id)(desc)
        defined = getattr(getattr(trtp.op, DOMAIN), OP)
    if defined.aot_impl_func is None:
        trtp.aot_impl(plugin_id)(impl)
