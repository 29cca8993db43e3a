"""`auraflow-edge build`: model -> engine folder (ONNX + external data, modulation weights, tokenizer, manifest).

The folder is assembled under a temporary name next to the destination and renamed when
complete, so a failed or interrupted build never leaves a half-written engine. A rebuild with
the same settings (same build key) reuses the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..engine.checkpoint import open_model
from ..engine.errors import UserError
from ..engine.hub import is_hub_id, snapshot
from ..engine.lora import fingerprints, lora_records, lora_targets, with_loras
from ..engine.manifest import MANIFEST, VERSION, Manifest
from ..engine.model_config import check_latent_size
from ..engine.modulation import modulation_format, write_modulation_weights
from ..engine.positions import write_position_table
from .engine_folder import finish_folder
from .onnx_export import OPSET, WeightPolicy, save_model, stream_weights

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
# Linears kept in high precision in every quantized build (see bench/precision_error.py):
# the patch embedding (K = 16) and the final projection (N = 16) are tiny and sit at the ends of
# the network where their error is not averaged away.
KEEP_FLOAT = ("pos_embed.proj", "proj_out")


ORT_INT8_KERNELS = ("dynamic", "nbits")


def policies(
    precision: str, backend: str, int4_block: int, ort_int8: str = "dynamic"
) -> dict[str, WeightPolicy]:
    """Per component weight policy for a precision and backend.

    ONNX Runtime int8: ``dynamic`` (DynamicQuantizeMatMul, per-tensor activation scale: about twice
    as fast on CPU as ``nbits``) or ``nbits`` (MatMulNBits, activations quantized per block of K:
    about 5x less error). Measured on the mid-size model: 0.70 vs 1.45 s/step, 1.2% vs 0.22% rel L2.
    """
    if ort_int8 not in ORT_INT8_KERNELS:
        raise UserError(f"--ort-int8 must be one of {', '.join(ORT_INT8_KERNELS)}")
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    ort = backend == "onnxruntime"
    if ort and precision == "bf16":
        raise UserError(
            "ONNX Runtime has no bf16 kernels for these graphs; use fp32, fp16, int8, fp8 or int4"
        )
    if int4_block < 16 or int4_block & (int4_block - 1):
        raise UserError(f"--int4-block must be a power of two >= 16, got {int4_block}")
    if precision in ("fp32", "fp16", "bf16"):
        tr = WeightPolicy("float", precision)
        te = WeightPolicy("float", "fp32" if ort else precision)
    else:
        act = "fp32" if ort else "fp16"
        tr = WeightPolicy(precision, act, int4_block, ort_native=ort, keep=KEEP_FLOAT, ort_int8=ort_int8)
        # UMT5 overflows in fp16 activations; its weights still quantize (1.2 B parameters).
        te = WeightPolicy(precision, "fp32", int4_block, ort_native=ort, ort_int8=ort_int8)
    return {"transformer": tr, "text_encoder": te, "vae_decoder": WeightPolicy("float", "fp32")}


def _tool_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("auraflow-edge", "torch", "onnx", "onnxruntime", "onnxscript", "diffusers", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _source_fingerprint(mf) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(mf.transformer_cfg.to_dict(), sort_keys=True).encode())
    for f in sorted(mf.weights.files):
        st = Path(f).stat()
        h.update(f"{Path(f).name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()


class _Progress:
    def __init__(self, quiet: bool):
        self.quiet, self.t0 = quiet, time.perf_counter()

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr)

    def bar(self, desc: str):
        if self.quiet:
            return None
        from tqdm import tqdm

        state = {}

        def cb(i, n):
            if "bar" not in state:
                state["bar"] = tqdm(total=n, desc=desc, unit="tensor", file=sys.stderr, leave=False)
            state["bar"].update(1)
            if i == n:
                state["bar"].close()

        return cb


def build_engine(
    model: str,
    out: str | Path,
    backend: str = "onnxruntime",
    precision: str = "int8",
    height: int | None = None,
    width: int | None = None,
    int4_block: int = 64,
    components: str | None = None,
    force: bool = False,
    quiet: bool = False,
    command: str = "",
    ort_int8: str = "dynamic",
    act_quant: str | None = None,
    calibration_prompts: int = 8,
    loras=None,
    revision: str | None = None,
    **trt_options,
) -> Path:
    hub = {}
    if is_hub_id(model):  # fetched once, here; every later step reads the cached snapshot
        snap = snapshot(model, revision, progress=not quiet)
        model, hub = str(snap.folder), snap.record()
    elif revision is not None:
        raise UserError(f"{model}: --revision applies to hub ids (org/name), not to local paths")
    if backend == "tensorrt":
        from .tensorrt_build import build_tensorrt

        trt_options.update(act_quant=act_quant, calibration_prompts=calibration_prompts, loras=loras)
        return build_tensorrt(
            model,
            out,
            precision=precision,
            height=height,
            width=width,
            components=components,
            force=force,
            quiet=quiet,
            command=command,
            **trt_options,
        )
    if backend == "torch":
        from .torch_engine import build_torch_engine

        return build_torch_engine(
            model, out, precision, int4_block, components, force, quiet, command, loras, hub
        )
    if backend != "onnxruntime":
        raise UserError(f"unknown build backend {backend!r}; choose onnxruntime, tensorrt or torch")
    from ..engine.pipeline import check_size
    from .engine_folder import build_lock

    out = Path(out)
    if not out.parent.exists():
        raise UserError(f"{out.parent}: folder does not exist")
    mf = with_loras(open_model(model, components), loras)  # read and checked before any export
    # An ONNX Runtime engine serves every size the positional grid covers: the size given (or the
    # model's default) is only the tracing sample and the calibration size, not part of the engine.
    height, width = _default_size(mf, height, width)
    check_size(height, width)
    check_latent_size(mf.transformer_cfg, height // 8, width // 8)
    calib = {"act_quant": act_quant, "prompts": calibration_prompts, "side": min(512, height, width)}
    build_key = _build_key(
        mf,
        backend,
        precision,
        policies(precision, backend, int4_block, ort_int8),
        None,
        None,
        extra=calib if act_quant else None,
    )
    with build_lock(out) as tmp:
        return _build_ort(
            model, out, tmp, mf, build_key, precision, height, width, int4_block, components, force,
            quiet, command, ort_int8, act_quant, calibration_prompts, loras, hub,
        )  # fmt: skip


def _build_ort(
    model, out, tmp, mf, build_key, precision, height, width, int4_block, components, force, quiet,
    command, ort_int8, act_quant, calibration_prompts, loras, hub,
) -> Path:  # fmt: skip
    backend = "onnxruntime"
    if (out / MANIFEST).exists() and not force:
        try:
            old = Manifest.load(out)
        except UserError:
            old = None
        if old is not None and old.get("build_key") == build_key:
            if not quiet:
                print(f"{out}: up to date (build key {build_key}); reusing it", file=sys.stderr)
            return out
        raise UserError(f"{out} already holds a different engine; pass --force to replace it")
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not an engine folder; choose another -o")
    data = export_onnx_folder(
        model,
        tmp,
        backend,
        precision,
        height,
        width,
        int4_block,
        components,
        quiet,
        ort_int8=ort_int8,
        act_quant=act_quant,
        calibration_prompts=calibration_prompts,
        loras=loras,
    )
    data["build_key"] = build_key
    data["command"] = command
    data["source"].update(hub)  # a hub id: the id, the revision asked for and its commit
    finish_folder(tmp, out, data)
    if not quiet:
        print(f"engine written to {out}", file=sys.stderr)
    return out


def _default_size(mf, height: int | None, width: int | None) -> tuple[int, int]:
    """Missing sides come from the checkpoint, as diffusers does (sample_size x VAE scale factor)."""
    dh, dw = mf.default_size()
    return height or dh, width or dw


def _build_key(mf, backend, precision, pol, height, width, extra=None) -> str:
    key_data = {
        "version": VERSION,
        "source": _source_fingerprint(mf),
        "backend": backend,
        "precision": precision,
        "policies": {k: asdict(v) for k, v in pol.items()},
        "shape": [height, width],
        "opset": OPSET,
        "tools": _tool_versions(),
        "extra": extra,
        # only with LoRAs, so engines built without any keep their key
        **({"loras": fingerprints(lora_records(mf.weights))} if lora_records(mf.weights) else {}),
    }
    return hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]


def export_onnx_folder(
    model: str,
    tmp: Path,
    backend: str,
    precision: str,
    height: int,
    width: int,
    int4_block: int = 64,
    components: str | None = None,
    quiet: bool = False,
    attention_plugin: bool = False,
    ort_int8: str = "dynamic",
    act_quant: str | None = None,
    calibration_prompts: int = 8,
    smooth_alpha: float = 0.5,
    loras=None,
) -> dict:
    """Export the three components (ONNX + external data), the modulation weights and the tokenizer
    into ``tmp``; returns the manifest data (without the file list)."""
    from .components import FolderReader, text_encoder_aliases, trace_text_encoder, trace_vae_decoder

    # LoRAs merge into each weight as it is streamed (and into the folded modulation weights)
    mf = with_loras(open_model(model, components), loras)
    check_latent_size(mf.transformer_cfg, height // 8, width // 8)
    pol = policies(precision, backend, int4_block, ort_int8)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    prog = _Progress(quiet)
    cfg = mf.transformer_cfg
    stats, calib = None, None
    if act_quant:
        if act_quant != precision or precision not in ("int8", "fp8"):
            raise UserError(
                "--act-quant needs --precision int8 (with --act-quant int8) or fp8 (with --act-quant fp8)"
            )
        from dataclasses import replace

        from ..engine.safetensors_io import save_file
        from .calibrate import CALIBRATION_PROMPTS, calibrate

        prompts = CALIBRATION_PROMPTS[: max(1, calibration_prompts)]
        side = min(512, height, width)
        prog.say(f"calibrating activations on {len(prompts)} prompts ({side}x{side}, 4 steps)")
        stats = calibrate(mf, prompts, steps=4, height=side, width=side)
        save_file(stats, tmp / "calibration.safetensors")
        pol["transformer"] = replace(
            pol["transformer"], ort_native=False, act_quant=act_quant, smooth_alpha=smooth_alpha
        )
        calib = {
            "act_quant": act_quant,
            "prompts": prompts,
            "steps": 4,
            "size": side,
            "smooth_alpha": smooth_alpha,
            "file": "calibration.safetensors",
        }
    comps = export_transformer(mf, tmp, pol["transformer"], height, width, prog, attention_plugin, stats)

    te_dir = mf.component("text_encoder")
    tcfg = json.loads((te_dir / "config.json").read_text())
    prog.say("tracing the text encoder")
    proto, rename = trace_text_encoder(te_dir, pol["text_encoder"].act_dtype)
    rd = FolderReader(te_dir, text_encoder_aliases())
    st = stream_weights(
        proto,
        lambda n: rd(rename(n)),
        pol["text_encoder"],
        tmp / "text_encoder.onnx.data",
        progress=prog.bar("text encoder"),
    )
    save_model(proto, tmp / "text_encoder.onnx")
    comps["text_encoder"] = {
        "file": "text_encoder.onnx",
        "data": "text_encoder.onnx.data",
        "inputs": ["input_ids", "attention_mask"],
        "outputs": ["hidden_states"],
        "dtype": pol["text_encoder"].act_dtype,
        "weight_bytes": st.bytes_written,
        "dims": [tcfg.get("d_model"), tcfg.get("d_ff"), tcfg.get("num_heads")],
    }

    vae_dir = mf.component("vae")
    prog.say("tracing the VAE decoder")
    vcfg = json.loads((vae_dir / "config.json").read_text())
    proto, rename = trace_vae_decoder(vae_dir)
    rd = FolderReader(vae_dir)
    st = stream_weights(proto, lambda n: rd(rename(n)), pol["vae_decoder"], tmp / "vae_decoder.onnx.data")
    save_model(proto, tmp / "vae_decoder.onnx")
    comps["vae_decoder"] = {
        "file": "vae_decoder.onnx",
        "data": "vae_decoder.onnx.data",
        "inputs": ["latents"],
        "outputs": ["image"],
        "dtype": "fp32",
        "scaling_factor": float(vcfg.get("scaling_factor", 0.13025)),
        "channels": int(vcfg.get("block_out_channels", [128])[0]),
        "weight_bytes": st.bytes_written,
    }

    tok = mf.component("tokenizer")
    (tmp / "tokenizer").mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok / f).is_file():
            shutil.copy2(tok / f, tmp / "tokenizer" / f)
    comps["tokenizer"] = {"dir": "tokenizer"}
    return {
        "build_key": _build_key(mf, backend, precision, pol, height, width),
        "backend": backend,
        "precision": precision,
        "quantization": {k: asdict(v) for k, v in pol.items()},
        "source": {"model": str(model), "fingerprint": _source_fingerprint(mf)},
        "transformer_config": cfg.to_dict(),
        "scheduler": {"shift": mf.scheduler_shift()},
        "default_size": list(mf.default_size()),
        "opset": OPSET,
        "attention_plugin": attention_plugin,
        "calibration": calib,
        "loras": lora_records(mf.weights),
        "lora_targets": lora_targets(mf.weights),
        "components": comps,
        "tools": _tool_versions(),
    }


def export_transformer(
    mf,
    folder: Path,
    policy: WeightPolicy,
    height: int,
    width: int,
    prog=None,
    attention_plugin: bool = False,
    act_stats: dict | None = None,
) -> dict:
    """The transformer graph + weights and the folded modulation weights, streamed into ``folder``.
    ``act_stats`` (weight name -> per-input-channel activation amax) enables W8A8 Q/DQ when the
    policy asks for activation quantization."""
    from .components import TRANSFORMER, trace_transformer

    prog = prog or _Progress(True)
    cfg = mf.transformer_cfg
    prog.say(
        f"tracing the transformer ({cfg.hidden} wide, {cfg.num_mmdit_layers}+{cfg.num_single_dit_layers} blocks) on meta"
    )
    proto, rename = trace_transformer(cfg, height, width, policy.act_dtype, attention_plugin)
    prog.say(f"writing transformer weights ({policy.fmt}, activations {policy.act_dtype})")
    st = stream_weights(
        proto,
        lambda n: mf.weights.read(rename(n)),
        policy,
        folder / "transformer.onnx.data",
        progress=prog.bar("transformer"),
        act_stats={"m." + k: v for k, v in (act_stats or {}).items()},
    )
    save_model(proto, folder / "transformer.onnx")
    prog.say("writing the folded modulation weights and the positional table")
    mod_fmt = modulation_format(policy.fmt)
    nb = write_modulation_weights(cfg, mf.weights, folder / "modulation.safetensors", mod_fmt)
    npos = write_position_table(mf.weights, folder / "positions.safetensors")
    return {
        "transformer": {
            "file": "transformer.onnx",
            "data": "transformer.onnx.data",
            "inputs": list(TRANSFORMER.inputs),
            "outputs": list(TRANSFORMER.outputs),
            "dtype": policy.act_dtype,
            "max_side": cfg.max_pixels_side,  # any multiple of 16 up to this, no rebuild
            "batch": [1, 2],
            "weight_bytes": st.bytes_written,
            "bytes_by_format": st.by_format,
        },
        "modulation": {"file": "modulation.safetensors", "weight_bytes": nb, "format": mod_fmt},
        "positions": {"file": "positions.safetensors", "weight_bytes": npos},
    }
