"""`auraflow-edge build`: model -> engine folder (ONNX + external data, modulation weights, tokenizer, manifest).

The folder is assembled under a temporary name next to the destination and renamed when
complete, so a failed or interrupted build never leaves a half-written engine. A rebuild with
the same settings (same build key) reuses the folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..engine.errors import UserError
from ..engine.model.checkpoint import open_model
from ..engine.model.config import check_latent_size
from ..engine.model.hub import is_hub_id, snapshot
from ..engine.model.lora import with_loras
from .engine_folder import build_key, finish_folder, reusable
from .onnx_folder import export_onnx_folder, policies


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
    from ..engine.model.config import check_size
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
    key = build_key(
        mf,
        backend,
        precision,
        policies(precision, backend, int4_block, ort_int8),
        None,
        None,
        extra=calib if act_quant else None,
    )
    with build_lock(out) as tmp:  # one writer; a killed build's leftovers removed; atomic rename
        if reusable(out, key, force, quiet):
            return out
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
        data["build_key"] = key
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
