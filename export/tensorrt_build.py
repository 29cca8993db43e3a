"""TensorRT engines for one GPU: strongly typed, one optimization profile per shape set, timing
cache, progress, weight streaming when the budget needs it.

Written against TensorRT's documented Python API (10.x). TensorRT cannot run on the machines this
project is built on: everything that needs ``import tensorrt`` is UNVERIFIED (see the README);
the pure logic around it (shapes and profiles, engine keys, weight-streaming arithmetic, the ONNX
operator check) is tested on the CPU.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..engine.backends.gpu import driver_version, gpu_identity
from ..engine.errors import UserError
from ..engine.model.config import AuraFlowConfig
from ..engine.model.spec import TEXT_ENCODER, TRANSFORMER, VAE_DECODER, dims

# ONNX operators TensorRT 10 does not parse (onnx-tensorrt docs/operators.md, "N" rows), plus any
# operator outside the standard domain except our plugin's.
TRT_UNSUPPORTED = {
    "BitShift", "ConcatFromSequence", "ConvInteger", "Det", "DynamicQuantizeLinear", "MatMulInteger",
    "MaxRoiPool", "MaxUnpool", "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement",
    "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RandomNormal", "RandomNormalLike", "SequenceAt",
    "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap",
    "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringNormalizer", "TfIdfVectorizer", "Unique",
}  # fmt: skip
PLUGIN_DOMAINS = {"auraflow_edge"}
HARDWARE_COMPAT = ("none", "ampere+", "same-cc")


def unsupported_ops(model_path: str | Path) -> list[str]:
    """Operators in an ONNX graph that TensorRT's ONNX parser would reject."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    bad = set()
    for n in m.graph.node:
        dom = n.domain or "ai.onnx"
        if dom in PLUGIN_DOMAINS:
            continue
        if dom != "ai.onnx" or n.op_type in TRT_UNSUPPORTED:
            bad.add(f"{dom}::{n.op_type}")
    return sorted(bad)


def parse_shapes(spec: str | None, height: int, width: int) -> list[tuple[int, int]]:
    """'1024x1024,768x1344' (width x height) -> [(h, w), ...]; default: the single --height/--width."""
    if not spec:
        return [(height, width)]
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
        if not m:
            raise UserError(f"cannot read shape {part!r}; write WIDTHxHEIGHT, e.g. 1024x1024")
        w, h = int(m.group(1)), int(m.group(2))
        if h % 16 or w % 16:
            raise UserError(f"shape {w}x{h}: sides must be multiples of 16")
        out.append((h, w))
    return out


@dataclass(frozen=True)
class Profile:
    """min / opt / max shape per input name, for one optimization profile."""

    shapes: dict  # name -> (min, opt, max)


def _profile(spec, points, cfg: AuraFlowConfig, **dim_kw) -> Profile:
    """min / opt / max shapes of every input of ``spec`` at three (batch, height, width) points."""
    per = [spec.shapes(dims(cfg, *pt, **dim_kw)) for pt in points]
    return Profile({n: tuple(p[n] for p in per) for n in spec.input_names})


def _points(shapes: list[tuple[int, int]], dynamic: bool, max_side: int, batch: int):
    """Static: one profile per size (fastest kernels). Dynamic: one from 256 px to ``max_side``,
    optimal at the first size. Batch from 1 (no CFG) to ``batch``, optimal at ``batch``."""
    if dynamic:
        (oh, ow), top = shapes[0], max_side
        return [[(1, 256, 256), (batch, oh, ow), (batch, top, top)]]
    return [[(1, h, w), (batch, h, w), (batch, h, w)] for h, w in shapes]


def transformer_profiles(cfg: AuraFlowConfig, shapes: list[tuple[int, int]], dynamic: bool) -> list[Profile]:
    """Batch 1..2 (CFG batch 2 is the optimum); sizes up to the largest the positional grid allows."""
    return [_profile(TRANSFORMER, pts, cfg) for pts in _points(shapes, dynamic, cfg.max_pixels_side, 2)]


def vae_profiles(
    cfg: AuraFlowConfig, shapes: list[tuple[int, int]], dynamic: bool, channels: int = 4
) -> list[Profile]:
    return [
        _profile(VAE_DECODER, pts, cfg, latent_channels=channels)
        for pts in _points(shapes, dynamic, cfg.max_pixels_side, 1)
    ]


def text_encoder_profiles(cfg: AuraFlowConfig) -> list[Profile]:
    return [_profile(TEXT_ENCODER, [(1, 256, 256)] * 3, cfg)]


def engine_key(
    gpu_name: str, compute_capability: tuple[int, int], trt_version: str, hardware_compat: str = "none"
) -> str:
    """How an engine file is keyed in the manifest: the GPU, its compute capability and TensorRT."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower()
    cc = f"sm{compute_capability[0]}{compute_capability[1]}"
    hw = "" if hardware_compat == "none" else f"-{hardware_compat.replace('+', 'plus')}"
    return f"{gpu}-{cc}-trt{trt_version}{hw}"


@dataclass(frozen=True)
class StreamingPlan:
    enable: bool
    budget: int  # bytes of weights kept resident on the device (-1: all)
    streamed: int  # bytes fetched from host memory per forward


def weight_streaming_plan(
    weight_bytes: int, activation_bytes: int, vram_budget: int | None, margin: int = 256 * 2**20
) -> StreamingPlan:
    """Weights that do not fit next to the activations (and a margin) are streamed from host
    memory each step: slower, but an fp16 engine still runs within 8 GB."""
    if vram_budget is None:
        return StreamingPlan(False, -1, 0)
    room = vram_budget - activation_bytes - margin
    if room <= 0:
        raise UserError(
            f"a budget of {vram_budget / 2**30:.2f} GiB leaves no room for weights next to "
            f"{activation_bytes / 2**30:.2f} GiB of activations; use a smaller image or a larger budget"
        )
    if weight_bytes <= room:
        return StreamingPlan(False, -1, 0)
    return StreamingPlan(True, room, weight_bytes - room)


def require_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        raise UserError(
            'TensorRT is not installed: on a machine with an NVIDIA GPU, `pip install "auraflow-edge[tensorrt]"`; '
            "or build for ONNX Runtime with --backend onnxruntime"
        ) from None
    return trt


# Option name -> how a user recognises it in a message about a folder built with other options
OPTION_FLAGS = {
    "source": "the model (its files changed)",
    "precision": "--precision",
    "shapes": "--shapes / --height / --width",
    "dynamic_shapes": "--dynamic-shapes",
    "hardware_compat": "--hardware-compat",
    "attention_plugin": "--attention-plugin",
    "plugin_ptx": "the NVIDIA driver (the attention plugin's PTX version)",
    "act_quant": "--act-quant",
    "calibration_prompts": "--calibration-prompts",
    "loras": "other LoRAs (--lora)",
    "refittable": "--refittable",
    "vram_budget": "--vram-budget",
    "components": "--components",
    "gpu": "the GPU",
    "tensorrt": "the TensorRT version",
    "tools": "the tool versions",
    "format": "the engine format",
}


def build_options(**opts) -> tuple[dict, str]:
    """(options, key): everything that changes a TensorRT engine folder, and its hash. A folder is
    reused only by a build with the same key (``check_reuse``)."""
    import hashlib
    import json

    key = hashlib.sha256(json.dumps(opts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return opts, key


def check_reuse(out: Path, precision: str, options: dict, key: str, force: bool, quiet: bool) -> bool:
    """True when ``out`` holds engines built with exactly ``options`` (reuse them). A folder holds
    one build: one GPU, one set of options; anything else is refused unless ``force`` (then the
    build replaces it). Several GPUs: one folder each."""
    from ..engine.runtime.manifest import MANIFEST, Manifest

    if force or not (out / MANIFEST).exists():
        return False
    m = Manifest.load(out)
    if m.get("backend") != "tensorrt" or m.get("precision") != precision:
        raise UserError(
            f"{out} holds a {m.get('backend')} {m.get('precision')} engine; pass --force to replace it "
            "(a folder holds the engines of one build: one GPU, one precision, one set of options)"
        )
    old = m.get("tensorrt_build") or {}
    if old.get("key") == key:
        if not quiet:
            print(f"{out}: up to date (TensorRT build key {key}); reusing it", file=sys.stderr)
        return True
    before = old.get("options") or {}
    changed = [OPTION_FLAGS.get(k, k) for k in OPTION_FLAGS if before.get(k) != options.get(k)]
    what = ", ".join(changed) if before else "options this version does not know (built by an older version)"
    built = "; ".join(
        f"{e.get('gpu')} sm_{''.join(map(str, e.get('compute_capability', [])))}"
        for e in m.get("engines", {}).values()
    )
    raise UserError(
        f"{out} holds TensorRT engines for {built or 'another build'} built with other options ({what}); "
        "pass --force to replace them, or build into another folder (one folder per GPU and set of options)"
    )


def build_one(
    trt,
    onnx_path: Path,
    plan_path: Path,
    profiles: list[Profile],
    *,
    workspace: int,
    timing_cache: Path | None,
    hardware_compat: str,
    weight_streaming: bool,
    quiet: bool,
    plugin_arch: int | None = None,
    refittable: bool = False,
    plugin_ptx: int | None = None,
) -> dict:  # pragma: no cover - needs TensorRT
    logger = trt.Logger(trt.Logger.WARNING)
    if plugin_arch is not None:
        from .tensorrt_plugin import register_tensorrt_plugin

        register_tensorrt_plugin(plugin_arch, plugin_ptx)
    builder = trt.Builder(logger)
    # Strongly typed: precisions come from the graph (Q/DQ weights, fp16/bf16 activations).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path.name}: {errs[:500]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if refittable:  # weights can be swapped later (`auraflow-edge refit --lora`)
        config.set_flag(trt.BuilderFlag.REFIT)
    if weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if hardware_compat == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    elif hardware_compat == "same-cc":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, (mn, opt, mx) in p.shapes.items():
            prof.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(prof)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    if not quiet:
        config.progress_monitor = _progress_monitor(trt)
    t0 = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise UserError(f"TensorRT failed to build {onnx_path.name} (see the messages above)")
    plan_path.write_bytes(bytes(blob))
    if timing_cache:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "file": plan_path.name,
        "build_seconds": time.perf_counter() - t0,
        "weight_streaming": weight_streaming,
        "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in profiles],
    }


def plugin_manifest(cc, plugin_ptx: int | None) -> dict:
    """What the attention plugin's kernels were built as (recorded in the engine's manifest entry)."""
    from .tensorrt_plugin import SHARED_LIMIT, _state

    built = {
        (b["dtype"], b["head_dim"], b["ptx_version"], b["shared_bytes"]) for b in _state.get("built", [])
    }
    return {
        "arch": f"sm_{cc[0]}{cc[1]}",
        "max_ptx_version": plugin_ptx,
        "shared_limit": SHARED_LIMIT,
        "kernels": [
            dict(zip(("dtype", "head_dim", "ptx_version", "shared_bytes"), b)) for b in sorted(built)
        ],
    }


def _progress_monitor(trt):  # pragma: no cover - needs TensorRT
    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, parent_phase, phase_name, num_steps):
            print(f"  [trt] {phase_name} ({num_steps} steps)", file=sys.stderr, flush=True)

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def _check_hardware_compat(hardware_compat: str, attention_plugin: bool) -> None:
    if hardware_compat not in HARDWARE_COMPAT:
        raise UserError(f"--hardware-compat must be one of {', '.join(HARDWARE_COMPAT)}")
    if hardware_compat == "ampere+" and attention_plugin:
        # The plugin's PTX is built for this GPU's architecture only, and TensorRT's AMPERE_PLUS
        # level caps every kernel at 48 KiB of shared memory, driver-reserved included, which the
        # plugin's d256 launch (49,152 B on sm_90) leaves no room for.
        raise UserError(
            "--hardware-compat ampere+ makes engines for other GPUs (kernels within 48 KiB of shared memory "
            "including the driver's reserve), and the attention plugin's kernel is compiled for this GPU only; "
            "build without --attention-plugin, or with --hardware-compat none or same-cc"
        )


def _recorded_options(model: str, components, precision: str, loras) -> dict:
    """The build options that come from the model and this software rather than from the flags."""
    from ..engine.model.checkpoint import open_model
    from ..engine.model.lora import requested
    from ..engine.runtime.manifest import VERSION
    from .engine_folder import source_fingerprint, tool_versions

    return {
        "format": VERSION,
        "source": source_fingerprint(open_model(model, components)),
        "precision": precision,
        "loras": [list(f) for f in requested(loras)],
        "components": components,
        "tools": tool_versions(),
    }


def _build_components(
    trt, tmp: Path, data: dict, key: str, gpu_cc, options: dict, timing_cache, quiet: bool
) -> dict:
    """One engine per exported component in ``tmp`` -> the manifest's engine records."""
    from ..engine.runtime.planner import block_activations

    gpu, cc = gpu_cc
    cfg = AuraFlowConfig(**data["transformer_config"])
    comps = data["components"]
    shape_list, dynamic = [tuple(s) for s in options["shapes"]], options["dynamic_shapes"]
    (h0, w0), budget = shape_list[0], options["vram_budget"]
    act = block_activations(cfg, h0, w0, batch=2, act_bytes=2)  # CFG batch, 16-bit activations
    ws = weight_streaming_plan(comps["transformer"]["weight_bytes"], act, budget)
    workspace = min(budget // 4 if budget else 4 << 30, 4 << 30)
    cache = Path(timing_cache) if timing_cache else None
    specs = {
        "transformer": (transformer_profiles(cfg, shape_list, dynamic), ws.enable),
        "text_encoder": (text_encoder_profiles(cfg), False),
        "vae_decoder": (vae_profiles(cfg, shape_list, dynamic), False),
    }
    engines = {}
    for name, (profs, stream) in specs.items():
        if not quiet:
            print(f"building the {name} engine for {gpu} ({key})", file=sys.stderr)
        on_transformer = name == "transformer"
        engines[name] = build_one(
            trt,
            tmp / comps[name]["file"],
            tmp / f"{name}.{key}.plan",
            profs,
            workspace=workspace,
            timing_cache=cache,
            hardware_compat=options["hardware_compat"],
            weight_streaming=stream,
            quiet=quiet,
            plugin_arch=cc[0] * 10 + cc[1] if options["attention_plugin"] and on_transformer else None,
            refittable=options["refittable"] and on_transformer,
            plugin_ptx=options["plugin_ptx"],
        )
    engines["transformer"]["streaming_budget"] = ws.budget
    return engines


def build_tensorrt(
    model: str,
    out: str | Path,
    precision: str = "fp16",
    height: int | None = None,
    width: int | None = None,
    shapes: str | None = None,
    vram_budget: str | None = None,
    timing_cache: str | None = None,
    dynamic_shapes: bool = False,
    hardware_compat: str = "none",
    attention_plugin: bool = False,
    components: str | None = None,
    force: bool = False,
    quiet: bool = False,
    command: str = "",
    act_quant: str | None = None,
    calibration_prompts: int = 8,
    loras=None,
    refittable: bool = False,
) -> Path:
    """Export the ONNX (TensorRT form) into a temp folder, build one engine per component, rename."""
    _check_hardware_compat(hardware_compat, attention_plugin)
    trt = require_tensorrt()  # before spending minutes on the export
    from ..engine.runtime.planner import parse_bytes
    from .engine_folder import build_lock, finish_folder
    from .onnx_folder import export_onnx_folder

    out = Path(out)
    if height is None or width is None:  # the checkpoint's default size, as diffusers picks it
        from ..engine.model.checkpoint import open_model

        dh, dw = open_model(model, components).default_size()
        height, width = height or dh, width or dw
    shape_list = parse_shapes(shapes, height, width)
    h0, w0 = shape_list[0]
    gpu, cc = gpu_identity()
    key = engine_key(gpu, cc, trt.__version__, hardware_compat)
    plugin_ptx = None
    if attention_plugin:  # the plugin's PTX is loaded by this machine's driver: no newer ISA than it reads
        from .tensorrt_plugin import driver_ptx_isa

        plugin_ptx = driver_ptx_isa(driver_version())
    options, build_key = build_options(
        **_recorded_options(model, components, precision, loras),
        shapes=[list(s) for s in shape_list],
        dynamic_shapes=bool(dynamic_shapes),
        hardware_compat=hardware_compat,
        attention_plugin=bool(attention_plugin),
        plugin_ptx=plugin_ptx,
        act_quant=act_quant,
        calibration_prompts=calibration_prompts if act_quant else None,
        refittable=bool(refittable),
        vram_budget=parse_bytes(vram_budget) if vram_budget else None,
        gpu=[gpu, list(cc)],
        tensorrt=trt.__version__,
    )
    if check_reuse(out, precision, options, build_key, force, quiet):
        return out
    with build_lock(out) as tmp:  # one writer; a killed build's leftovers removed; atomic rename
        data = export_onnx_folder(
            model,
            tmp,
            "tensorrt",
            precision,
            h0,
            w0,
            components=components,
            quiet=quiet,
            attention_plugin=attention_plugin,
            act_quant=act_quant,
            calibration_prompts=calibration_prompts,
            loras=loras,
        )
        comps = data["components"]
        for name in ("transformer", "text_encoder", "vae_decoder"):
            bad = unsupported_ops(tmp / comps[name]["file"])
            if bad:
                raise UserError(f"{name} graph has operators TensorRT cannot parse: {', '.join(bad)}")
        engines = _build_components(trt, tmp, data, key, (gpu, cc), options, timing_cache, quiet)
        data["backend"] = "tensorrt"
        data["engines"] = {
            key: {
                "gpu": gpu,
                "compute_capability": list(cc),
                "tensorrt": trt.__version__,
                "hardware_compat": hardware_compat,
                "components": engines,
                "shapes": [list(s) for s in shape_list],
                "dynamic_shapes": dynamic_shapes,
                "refittable": refittable,
                **({"attention_plugin": plugin_manifest(cc, plugin_ptx)} if attention_plugin else {}),
            }
        }
        data["tensorrt_build"] = {"key": build_key, "options": options}
        data["command"] = command
        finish_folder(tmp, out, data)
    return out
