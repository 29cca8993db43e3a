"""`auraflow-edge refit ENGINE --lora FILE[:SCALE]`: swap the LoRAs merged into a TensorRT engine
folder built with ``--refittable``, without rebuilding its engines.

The new weights come from the build's own code: every linear the old or the new LoRAs touch (so the
ones only the old LoRAs changed go back to the base) is streamed through ``stream_weights`` with the
folder's recorded weight policy, in a graph that holds just that linear. A refit folder therefore
holds bit for bit what ``build --lora`` would write. Then:

1. the transformer engine built for this GPU goes through TensorRT's Refitter in batches
   (``set_named_weights`` by ONNX initializer name, the names the ONNX parser gives weights; any
   weight TensorRT reports missing is supplied from the folder's ONNX data) and is serialized back;
2. the ONNX external data is updated in place (same sizes), so the folder stays self-consistent;
3. modulation.safetensors is rewritten when a LoRA touches the folded modulation linears;
4. the manifest records the LoRAs, their targets, the build key and the new checksums.

Engines built with ``--act-quant`` are refused: SmoothQuant's factors and the activation scales
were derived from the weights and activations of the build.

UNVERIFIED: TensorRT never ran where this was written. The calls follow TensorRT 10's documented
Python API (``Runtime.deserialize_cuda_engine``, ``Refitter.get_all_weights`` /
``set_named_weights`` / ``get_missing_weights`` / ``refit_cuda_engine``, ``Weights(type, ptr,
count)``, ``ICudaEngine.serialize``); the tests run everything around them against a fake module.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..engine.errors import UserError
from ..engine.model.checkpoint import open_model
from ..engine.model.config import AuraFlowConfig
from ..engine.model.lora import folded_names, lora_records, lora_targets, with_loras
from ..engine.runtime.manifest import Manifest, file_entry, write_manifest
from ..engine.runtime.modulation import modulation_format, write_modulation_weights
from .onnx_export import WeightPolicy, stream_weights

# trace_transformer wraps the model as ``m``: its parameters are named "m." + our weight name
GRAPH_PREFIX = "m."


def linear_initializers(weights, name: str, policy: WeightPolicy) -> dict[str, tuple[int, list, bytes]]:
    """The ONNX initializers (name -> (data type, dims, raw bytes)) that a build writes for the
    linear weight ``name`` read through ``weights``: ``stream_weights`` on a graph of that one linear."""
    from onnx import TensorProto, helper

    out_f, in_f = weights.shape(name)
    p = GRAPH_PREFIX + name
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", [p], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "wt"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_f])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_f])],
    )
    model = helper.make_model(graph)
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "w.data"
        stream_weights(model, lambda n: weights.read(n[len(GRAPH_PREFIX) :]), policy, data)
        raw = data.read_bytes()
    out = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        off, n = int(ext["offset"]), int(ext["length"])
        out[t.name] = (t.data_type, list(t.dims), raw[off : off + n])
    return out


def data_locations(onnx_path: Path) -> dict[str, tuple[int, list, Path, int, int]]:
    """initializer name -> (data type, dims, data file, offset, length) of an ONNX graph's external data."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "location" in ext:
            loc = onnx_path.parent / ext["location"]
            out[t.name] = (t.data_type, list(t.dims), loc, int(ext.get("offset", 0)), int(ext["length"]))
    return out


def _trt_weights(trt, init: tuple[int, list, bytes], held: list):
    """trt.Weights over a host copy of ``init``'s bytes (kept alive in ``held`` until the refit)."""
    from onnx import TensorProto

    types = {
        TensorProto.FLOAT: trt.DataType.FLOAT,
        TensorProto.FLOAT16: trt.DataType.HALF,
        TensorProto.BFLOAT16: trt.DataType.BF16,
        TensorProto.INT8: trt.DataType.INT8,
        TensorProto.FLOAT8E4M3FN: trt.DataType.FP8,
        TensorProto.INT4: trt.DataType.INT4,  # packed two per byte, low nibble first, as TensorRT reads it
    }
    dtype, dims, raw = init
    if dtype not in types:
        raise UserError(f"cannot refit a weight of ONNX type {dtype}")
    buf = np.frombuffer(raw, dtype=np.uint8).copy()
    held.append(buf)
    return trt.Weights(types[dtype], buf.ctypes.data, int(np.prod(dims, dtype=np.int64)))


def refit_plan(trt, plan_path: Path, batches, supply) -> bytes:  # the TensorRT calls: UNVERIFIED
    """Refit the serialized engine at ``plan_path`` with each batch ({name: init}); weights TensorRT
    reports missing come from ``supply(name)``. Returns the refitted engine, serialized."""
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise UserError(f"{plan_path}: TensorRT could not deserialize it; rebuild with --force")
    refitter = trt.Refitter(engine, logger)
    known = set(refitter.get_all_weights())
    for batch in batches:
        unknown = sorted(set(batch) - known)
        if unknown:
            raise UserError(
                f"{plan_path.name}: TensorRT has no refittable weights named {', '.join(unknown[:3])}; "
                "rebuild with --refittable"
            )
        held: list = []
        for name, init in batch.items():
            if not refitter.set_named_weights(name, _trt_weights(trt, init, held)):
                raise UserError(f"{plan_path.name}: TensorRT refused new weights for {name}")
        for name in refitter.get_missing_weights():
            if not refitter.set_named_weights(name, _trt_weights(trt, supply(name), held)):
                raise UserError(f"{plan_path.name}: TensorRT refused weights for {name}")
        if not refitter.refit_cuda_engine():
            raise UserError(f"{plan_path.name}: TensorRT's refit failed (see the messages above)")
    return bytes(engine.serialize())


def _policy(d: dict) -> WeightPolicy:
    return WeightPolicy(**{**d, "keep": tuple(d.get("keep", ()))})


def refit_engine(
    engine_dir: str | Path,
    loras=None,
    model: str | None = None,
    components: str | None = None,
    quiet: bool = False,
    command: str = "",
    batch_bytes: int = 1 << 30,
) -> Path:
    """Swap the folder's merged LoRAs for ``loras`` ([(file, scale)]; none restores the base model).
    Holds the folder's build lock throughout: a refit edits files in place, so no build may run
    beside it (and it runs beside no build)."""
    from .engine_folder import build_lock

    with build_lock(Path(engine_dir)):
        return _refit_locked(engine_dir, loras, model, components, quiet, command, batch_bytes)


def _refitted_manifest(folder: Path, m, merged, entry: dict, command: str, changed: set) -> dict:
    """The manifest after a refit: the new LoRAs, the build key a build with them would have, and
    the sizes and checksums of the files that changed; written, and returned."""
    from ..engine.model.lora import fingerprints
    from .engine_folder import build_key

    data = dict(m.data)
    data["loras"], data["lora_targets"] = lora_records(merged.weights), lora_targets(merged.weights)
    q = m["quantization"]
    pol = {k: _policy(v) for k, v in q.items()}
    h, w = entry["shapes"][0]  # the shape the build traced at (build_tensorrt: the first shape set)
    data["build_key"] = build_key(merged, "tensorrt", m["precision"], pol, h, w)
    if data.get("tensorrt_build"):  # the folder now is what a build with these LoRAs would reuse
        from .tensorrt_build import build_options

        opts = dict(data["tensorrt_build"]["options"], loras=[list(f) for f in fingerprints(data["loras"])])
        opts, key = build_options(**opts)
        data["tensorrt_build"] = {"key": key, "options": opts}
    data["refit_command"] = command
    files = dict(data["files"])
    root = folder.resolve()
    for p in changed:
        rel = str(p.resolve().relative_to(root))
        files[rel] = file_entry(folder, rel)
    data["files"] = files
    write_manifest(folder, data)
    return data


def _refit_locked(engine_dir, loras, model, components, quiet, command, batch_bytes) -> Path:
    """The refit under the build lock: check the folder, stream the changed initializers to a side
    file, refit the plan, then change the folder only once everything is computed. Kept as one
    function so that the order of the irreversible steps (the in-place writes) is visible at once."""
    from .engine_folder import source_fingerprint
    from .tensorrt_build import gpu_identity, require_tensorrt

    folder = Path(engine_dir)
    m = Manifest.load(folder)
    if m.get("backend") != "tensorrt":
        raise UserError(
            f"{folder}: not a TensorRT engine folder; ONNX Runtime engines take LoRAs at `build --lora`"
        )
    if m.get("calibration"):
        raise UserError(
            f"{folder}: built with --act-quant, whose smoothing and activation scales depend on the weights; "
            "rebuild with --lora instead of refitting"
        )
    if len(m.get("engines", {})) != 1:  # a build writes one GPU's engines per folder (check_reuse)
        raise UserError(
            f"{folder}: holds engines for {len(m.get('engines', {}))} GPUs, not one; rebuild with --force"
        )
    trt = require_tensorrt()
    from ..engine.backends.tensorrt_backend import select_engine

    gpu, cc = gpu_identity()
    key, entry = select_engine(m, gpu, cc, trt.__version__)
    if not entry.get("refittable"):
        raise UserError(
            f"{folder}: the engines were not built --refittable; rebuild with --refittable --lora ..."
        )
    mf = open_model(model or m["source"]["model"], components)
    if source_fingerprint(mf) != m["source"]["fingerprint"]:
        raise UserError(
            f"{model or m['source']['model']}: not the model this engine was built from (fingerprint differs); "
            "pass --model with the build's model"
        )
    merged = with_loras(mf, loras)
    cfg = AuraFlowConfig(**m["transformer_config"])
    names = set(m.get("lora_targets", [])) | set(lora_targets(merged.weights))
    folded = folded_names(cfg)
    graph_names = sorted(names - folded)
    policy = _policy(m["quantization"]["transformer"])
    onnx_path = m.path(m.component("transformer")["file"])
    where = data_locations(onnx_path)
    plan_path = m.path(entry["components"]["transformer"]["file"])

    def read(loc):
        _, _, path, off, n = loc
        with open(path, "rb") as f:
            f.seek(off)
            return f.read(n)

    side = folder / ".refit-weights.tmp"  # new initializer bytes, kept on disk until the refit succeeded
    written: dict[str, tuple[int, int]] = {}

    def batches():
        with open(side, "wb") as f:
            batch, size = {}, 0
            for i, name in enumerate(graph_names):
                for iname, init in linear_initializers(merged.weights, name, policy).items():
                    old = where.get(iname)
                    if old is None or old[0] != init[0] or old[1] != init[1] or old[4] != len(init[2]):
                        raise UserError(
                            f"{onnx_path.name}: initializer {iname} is missing or has another type or shape than "
                            "the build's policy gives; rebuild with --force"
                        )
                    written[iname] = (f.tell(), len(init[2]))
                    f.write(init[2])
                    batch[iname], size = init, size + len(init[2])
                if size >= batch_bytes or i == len(graph_names) - 1:
                    if not quiet:
                        print(f"refitting {i + 1}/{len(graph_names)} linears", file=sys.stderr)
                    yield batch
                    batch, size = {}, 0

    tmp_plan = plan_path.with_name(plan_path.name + ".tmp")
    tmp_mod = None
    try:
        plan = refit_plan(trt, plan_path, batches(), lambda n: (*where[n][:2], read(where[n])))
        tmp_plan.write_bytes(plan)
        if names & folded:
            mod = m.path(m.component("modulation")["file"])
            tmp_mod = mod.with_name(mod.name + ".tmp")
            write_modulation_weights(cfg, merged.weights, tmp_mod, modulation_format(policy.fmt))
        # Everything is computed: only now does the folder change.
        with open(side, "rb") as src:
            for iname, (off, n) in written.items():
                _, _, path, dst_off, _ = where[iname]
                src.seek(off)
                with open(path, "r+b") as dst:
                    dst.seek(dst_off)
                    dst.write(src.read(n))
        os.replace(tmp_plan, plan_path)
        if tmp_mod is not None:
            os.replace(tmp_mod, mod)
    finally:
        for p in (side, tmp_plan, tmp_mod):
            if p is not None and p.exists():
                p.unlink()
    changed = {where[n][2] for n in written} | {plan_path} | ({mod} if tmp_mod is not None else set())
    data = _refitted_manifest(folder, m, merged, entry, command, changed)
    if not quiet:
        print(
            f"{folder}: refit {key} with {len(data['loras'])} LoRA(s), {len(names)} weights changed",
            file=sys.stderr,
        )
    return folder
