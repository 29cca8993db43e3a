"""NVIDIA's real TensorRT Python layer on a machine without TensorRT's libraries or a GPU.

``tensorrt-cu13-bindings`` holds the Python bindings (``tensorrt_bindings/tensorrt.so``) and
TensorRT's pure-Python plugin layer (``tensorrt_bindings/plugin``). The bindings link against
libnvinfer.so.11, libnvonnxparser.so.11 and libnvinfer_plugin.so.11; ``build_standins`` compiles
three tiny C libraries with those names that export the entry points the bindings import and return
null, so ``import tensorrt`` works and every line of NVIDIA's Python runs as shipped. What the C++
libraries would do (the plugin registry, the shape-expression builder of a real build) is replaced
by small stand-ins here, named as such.

Run as a script (``python tests/trt_real.py STANDIN_DIR``) it performs every check of
tests/test_trt_real.py in one fresh process (no Triton interpreter, no fake ``tensorrt`` modules of
other tests) and prints one JSON line of results.
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

BINDINGS = "tensorrt_bindings"  # the import name of tensorrt-cu13-bindings
# entry points tensorrt.so imports (nm -D --undefined-only), by the library that defines them
STANDINS = {
    "nvinfer": [
        "createInferBuilder_INTERNAL",
        "createInferRefitter_INTERNAL",
        "createInferRuntime_INTERNAL",
        "getBuilderPluginRegistry",
        "getPluginRegistry",
    ],
    "nvonnxparser": [
        "createNvOnnxParser_INTERNAL",
        "createNvOnnxParserRefitter_INTERNAL",
        "getNvOnnxParserVersion",
    ],
    "nvinfer_plugin": ["initLibNvInferPlugins"],
}


def unavailable() -> str | None:
    """Why the real layer cannot run here (None when it can)."""
    if importlib.util.find_spec(BINDINGS) is None:
        return 'tensorrt-cu13-bindings is not installed (pip install -e ".[trt-cpu]")'
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        return "no C compiler to build the stand-in TensorRT libraries"
    return None


def build_standins(folder: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    folder.mkdir(parents=True, exist_ok=True)
    for lib, symbols in STANDINS.items():
        src = folder / f"{lib}.c"
        src.write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in symbols))
        so = f"lib{lib}.so.11"
        subprocess.run(
            [cc, "-shared", "-fPIC", "-o", str(folder / so), f"-Wl,-soname,{so}", str(src)],
            check=True,
            capture_output=True,
        )
    return folder


class PluginRegistry:
    """Stand-in for the C++ plugin registry (the stand-in getPluginRegistry returns null): keeps
    the Python creators ``tensorrt.plugin`` registers and hands them back."""

    def __init__(self):
        self.creators = {}

    def register_creator(self, creator, namespace):
        self.creators[(creator.name, creator.plugin_version, namespace)] = creator
        return True

    def get_creator(self, name, version, namespace):
        return self.creators.get((name, version, namespace))


def load_tensorrt(folder: Path):
    """(tensorrt, tensorrt.plugin), NVIDIA's modules over the stand-in libraries."""
    for lib in STANDINS:  # loaded by soname before the bindings, which then find them
        ctypes.CDLL(str(folder / f"lib{lib}.so.11"), mode=ctypes.RTLD_GLOBAL)
    import tensorrt_bindings

    sys.modules["tensorrt"] = tensorrt_bindings  # what the tensorrt metapackage provides
    import tensorrt as trt

    registry = PluginRegistry()
    trt.get_plugin_registry = lambda: registry
    import tensorrt.plugin as trtp

    return trt, trtp


def expr_types(trt):
    """Stand-ins for the builder's IDimensionExpr / IExprBuilder: symbolic trees, e.g.
    ``("CEIL_DIV", "NQ", 64)``. They subclass trt.IDimensionExpr (NVIDIA's code checks isinstance)
    and are made without the C++ constructor, which only a real build has."""

    class Expr(trt.IDimensionExpr):
        def is_constant(self):
            return isinstance(self.tree, int)

        def get_constant_value(self):
            return self.tree

    def expr(tree):
        e = Expr.__new__(Expr)
        e.tree = tree
        return e

    class Builder:
        def constant(self, v):
            return expr(int(v))

        def operation(self, op, a, b):
            return expr((op.name, a.tree, b.tree))

    return expr, Builder()


def evaluate(tree, env: dict) -> int:
    if isinstance(tree, int):
        return tree
    if isinstance(tree, str):
        return env[tree]
    ops = {
        "SUM": lambda a, b: a + b,
        "PROD": lambda a, b: a * b,
        "SUB": lambda a, b: a - b,
        "FLOOR_DIV": lambda a, b: a // b,
        "CEIL_DIV": lambda a, b: -(-a // b),
        "MAX": max,
        "MIN": min,
    }
    return ops[tree[0]](evaluate(tree[1], env), evaluate(tree[2], env))


def project_names(root: Path) -> dict[str, list[str]]:
    """Every ``trt.X.Y`` / ``trtp.X`` attribute chain the project's code uses (source files of the
    package and the bench scripts), as written."""
    import ast

    out = {"trt": set(), "trtp": set()}
    for d in ("engine", "export", "kernels", "bench"):
        for f in sorted((root / d).glob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if not isinstance(node, ast.Attribute):
                    continue
                chain, n = [], node
                while isinstance(n, ast.Attribute):
                    chain.append(n.attr)
                    n = n.value
                if isinstance(n, ast.Name) and n.id in out:
                    out[n.id].add(".".join(reversed(chain)))
    # keep the longest chains only (trt.DataType.HALF covers trt.DataType)
    return {k: sorted(c for c in v if not any(o.startswith(c + ".") for o in v)) for k, v in out.items()}


# Methods and properties the project calls on TensorRT objects (not visible as trt.X chains)
INSTANCE_NAMES = {
    "Builder": ["create_network", "create_builder_config", "create_optimization_profile", "build_serialized_network"],
    "IBuilderConfig": [
        "set_memory_pool_limit", "set_flag", "hardware_compatibility_level", "add_optimization_profile",
        "create_timing_cache", "set_timing_cache", "get_timing_cache", "progress_monitor",
    ],
    "IOptimizationProfile": ["set_shape"],
    "OnnxParser": ["parse_from_file", "get_error", "num_errors"],
    "ITimingCache": ["serialize"],
    "Runtime": ["deserialize_cuda_engine"],
    "Refitter": ["get_all_weights", "set_named_weights", "get_missing_weights", "refit_cuda_engine"],
    "ICudaEngine": [
        "serialize", "streamable_weights_size", "weight_streaming_budget_v2", "create_execution_context",
        "num_io_tensors", "get_tensor_name", "get_tensor_dtype", "get_tensor_mode", "device_memory_size_v2",
    ],
    "IExecutionContext": [
        "set_input_shape", "set_tensor_address", "execute_async_v3", "get_tensor_shape", "set_device_memory",
        "set_optimization_profile_async",
    ],
    "IProgressMonitor": ["phase_start", "step_complete", "phase_finish"],
}  # fmt: skip


def check_names(trt, trtp, root: Path) -> dict:
    from auraflow_edge.export.tensorrt_plugin import TRT_DTYPES

    missing, seen = [], []
    names = project_names(root)
    names["trt"] += [f"DataType.{n}" for n in TRT_DTYPES]
    for mod_name, mod in (("trt", trt), ("trtp", trtp)):
        for chain in names[mod_name]:
            seen.append(f"{mod_name}.{chain}")
            obj = mod
            for part in chain.split("."):
                if part == "__init__":
                    break
                if not hasattr(obj, part):
                    missing.append(f"{mod_name}.{chain}")
                    break
                obj = getattr(obj, part)
    for cls, attrs in INSTANCE_NAMES.items():
        for a in attrs:
            seen.append(f"trt.{cls}.{a}")
            if not hasattr(getattr(trt, cls, None), a):
                missing.append(f"trt.{cls}.{a}")
    return {"seen": seen, "missing": missing}


_KEEP = []  # a PluginField points at its data: keep the arrays alive


def _fields(trt, order, values):
    """The PluginFieldCollection onnx-tensorrt's ``loadFields`` makes of the node's attributes, in
    ``order``: FLOATS -> FLOAT32 array, STRING -> CHAR bytes, INT -> one INT32."""
    import numpy as np

    data = {
        "params": (np.asarray(values["params"], np.float32), trt.PluginFieldType.FLOAT32),
        "plugin_namespace": (
            np.frombuffer(values["plugin_namespace"].encode(), np.int8),
            trt.PluginFieldType.CHAR,
        ),
        "aot": (np.asarray([values["aot"]], np.int32), trt.PluginFieldType.INT32),
    }
    _KEEP.extend(data[n][0] for n in order)
    return trt.PluginFieldCollection([trt.PluginField(n, *data[n]) for n in order])


def plugin_layer_run(trt, trtp, tp, fields, dtype, shapes, head_dim):
    """One plugin through NVIDIA's code as a build drives it: create_plugin (STRICT_AOT),
    get_output_data_types, get_output_shapes, get_launch_params, get_kernel. ``shapes``: symbolic
    (B, H, NQ, NK). Returns what TensorRT would be handed."""
    from tensorrt.plugin._plugin_class import _TemplateAOTPlugin

    expr, builder = expr_types(trt)
    creator = trt.get_plugin_registry().get_creator(tp.OP, "1", tp.DOMAIN)
    plg = creator.create_plugin(
        tp.OP, tp.DOMAIN, fields, trt.TensorRTPhase.BUILD, trt.QuickPluginCreationRequest.STRICT_AOT
    )
    assert isinstance(plg, _TemplateAOTPlugin), type(plg)
    dt = getattr(trt.DataType, dtype)
    out_types = plg.get_output_data_types([dt] * 3, [4] * 3)
    b, h, nq, nk = shapes
    dims = []
    for n in (nq, nk, nk):
        d = trt.DimsExprs(4)
        for j, t in enumerate((b, h, n, head_dim)):
            d[j] = expr(t)
        dims.append(d)
    # get_output_shapes wraps each input DimsExprs entry; ours are read back as the stand-in objects
    plg.get_output_shapes([[expr(t) for t in (b, h, n, head_dim)] for n in (nq, nk, nk)], [], builder)
    out_shape = [e._expr.tree for e in plg.output_descs[0].shape_expr]
    in_out = []
    for _ in range(4):
        d = trt.DynamicPluginTensorDesc()
        d.desc.type, d.desc.format = dt, trt.TensorFormat.LINEAR
        d.desc.dims = trt.Dims([2, 3, 7, head_dim])
        in_out.append(d)
    plg.set_tactic(0)

    class Launch:  # stand-in for IKernelLaunchParams: keeps what TensorRT would be told
        pass

    class SymSetter(dict):
        nbSymExprs = 0

    launch, extra = Launch(), SymSetter()
    plg.get_launch_params(dims, in_out, 3, launch, extra, builder)
    name, ptx = plg.get_kernel([d.desc for d in in_out[:3]], [in_out[3].desc])
    return {
        "out_types": [t.name for t in out_types],
        "out_shape": out_shape,
        "launch": {k: v._afe_tree for k, v in vars(launch).items()},
        "extra": [extra[i]._afe_tree for i in range(extra.nbSymExprs)],
        "extra_kinds": [extra[i]._afe_kind for i in range(extra.nbSymExprs)],
        "name": name.decode() if isinstance(name, bytes) else name,
        "ptx": ptx.decode(),
    }


def observe_sym_exprs(trtp):
    """SymExprImpl hands its expression to C++ and has no getter: keep a copy for the checks."""
    real = trtp.SymInt32.__call__

    def call(self):
        impl = real(self)
        impl._afe_tree, impl._afe_kind = self._expr.tree, type(self).__name__
        return impl

    trtp.SymInt32.__call__ = call


def main(folder: str) -> dict:
    root = Path(__file__).resolve().parent.parent
    res = {}
    trt, trtp = load_tensorrt(Path(folder))
    res["version"] = trt.__version__
    res["names"] = check_names(trt, trtp, root)
    observe_sym_exprs(trtp)
    from auraflow_edge.export import tensorrt_plugin as tp

    tp.register_tensorrt_plugin(90)
    tp.register_tensorrt_plugin(90, 87)  # a second call in one process: harmless, retargets
    res["registered"] = sorted(trtp.op.auraflow_edge.__dict__.keys() & {tp.OP})
    res["target"] = list(tp._state["target"])
    tp.register_tensorrt_plugin(90)

    # every order and subset of the node's attributes reaches the kernel as the same (eps, scale, q_norm)
    seen = []
    real_aot_impl = tp.aot_impl

    def record(trt_, trtp_, arch, q, k, eps, scale, q_norm, max_ptx=None):
        seen.append([eps, scale, q_norm])
        return real_aot_impl(trt_, trtp_, arch, q, k, eps, scale, q_norm, max_ptx)

    tp.aot_impl = record
    values = {"params": [1e-6, 0.0625, 1.0], "plugin_namespace": tp.DOMAIN, "aot": 1}
    orders = []
    for r in (1, 2, 3):
        for order in itertools.permutations(values, r):
            if "params" in order:
                orders.append(list(order))
    runs = {}
    for order in orders:
        runs[",".join(order)] = plugin_layer_run(
            trt, trtp, tp, _fields(trt, order, values), "HALF", ("B", "H", "NQ", "NK"), 64
        )
    res["orders"] = [",".join(o) for o in orders]
    res["order_values"] = seen
    res["order_launch_same"] = len({json.dumps(r["launch"], sort_keys=True) for r in runs.values()}) == 1
    tp.aot_impl = real_aot_impl
    try:
        plugin_layer_run(
            trt,
            trtp,
            tp,
            _fields(trt, ["plugin_namespace", "aot"], values),
            "HALF",
            ("B", "H", "NQ", "NK"),
            64,
        )
    except Exception as e:
        res["no_params"] = f"{type(e).__name__}: {e}"
    # the real kernels, as a build on sm_90 / sm_86 would ask for them (head_dim 256)
    res["kernels"] = {}
    for arch, dtype in ((90, "HALF"), (90, "BF16"), (86, "BF16")):
        tp.register_tensorrt_plugin(arch, 87)
        values = {"params": [1e-5, 1 / 16, 0.0], "plugin_namespace": tp.DOMAIN, "aot": 1}
        r = plugin_layer_run(
            trt, trtp, tp, _fields(trt, list(values), values), dtype, ("B", "H", "NQ", "NK"), 256
        )
        r["shared"] = evaluate(r["launch"]["shared_mem"], {})
        res["kernels"][f"sm{arch} {dtype}"] = r
    res["state_built"] = tp._state.get("built", [])
    return res


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
