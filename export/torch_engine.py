"""`auraflow-edge build --backend torch`: quantize once, load many times.

The folder holds the transformer's linears already quantized (``NAME.w_q`` / ``NAME.w_s``, exactly
what the torch backend's QuantizedLinear keeps in memory, made by the same function), its other
parameters as stored, the folded modulation in int8, and the text encoder, VAE, tokenizer and
scheduler as they are (hard links where the filesystem allows). ``generate`` loads it with no
quantization pass. Same manifest, checksums, lock and atomic rename as the other engines.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np

from ..engine.errors import UserError
from ..engine.model.safetensors_io import save_streamed
from ..engine.runtime.modulation import modulation_names, write_modulation_weights
from .engine_folder import build_lock, finish_folder, reusable

COMPONENTS = ("text_encoder", "vae", "tokenizer", "scheduler")


def packed_layout(cfg, names, shape, fmt: str, block: int) -> dict[str, tuple]:
    """Which transformer weights are stored quantized, and how: name -> ((w_q shape, dtype),
    (w_s shape, dtype), format). The same choice as build_quantized_transformer's (float for the
    kept linears and where an int4 block does not divide K)."""
    import ml_dtypes

    from ..engine.model.spec import keeps_float

    folded = set(modulation_names(cfg))
    out = {}
    for n in names:
        if not n.endswith(".weight") or n in folded or n.startswith("time_step_proj."):
            continue
        s = shape(n)
        if len(s) != 2 or keeps_float(n) or n.startswith("pos_embed.pos_embed"):
            continue
        if fmt == "int4" and s[1] % block:
            continue  # a block that does not divide K: float, as build_quantized_transformer keeps it
        f = fmt
        if f == "int4":
            out[n] = (((s[0], s[1] // 2), np.uint8), ((s[0], s[1] // block), np.float32), f)
        else:
            q = np.dtype(ml_dtypes.float8_e4m3fn) if f == "fp8" else np.int8
            out[n] = (((s[0], s[1]), q), ((s[0],), np.float32), f)
    return out


def _to_numpy(t) -> np.ndarray:
    import ml_dtypes
    import torch

    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).cpu().numpy().view(ml_dtypes.float8_e4m3fn)
    return t.cpu().numpy()


def write_transformer(mf, path: Path, fmt: str, block: int, progress=None) -> tuple[int, dict]:
    import torch

    from ..engine.backends.torch_quant import quantize_weight

    cfg, w = mf.transformer_cfg, mf.weights
    folded = set(modulation_names(cfg))
    layout = packed_layout(cfg, w.names(), w.shape, fmt, block)
    specs, pending = [], {}
    for n in w.names():
        if n in folded or n.startswith("time_step_proj."):
            continue  # in modulation.safetensors
        if n in layout:
            (qs, qd), (ss, sd), _ = layout[n]
            specs += [(n[: -len(".weight")] + ".w_q", qs, qd), (n[: -len(".weight")] + ".w_s", ss, sd)]
        else:
            specs.append((n, w.shape(n), w.dtype(n)))
    order = {name: i for i, (name, _, _) in enumerate(specs, 1)}

    def produce(key: str) -> np.ndarray:
        if progress is not None:
            progress(order[key], len(specs))
        if key.endswith(".w_s"):
            return pending.pop(key)
        if key.endswith(".w_q"):
            base = key[: -len(".w_q")]
            f = layout[base + ".weight"][2]
            q, s = quantize_weight(torch.from_numpy(w.read(base + ".weight").astype(np.float32)), f, block)
            pending[base + ".w_s"] = s.float().numpy()
            return _to_numpy(q)
        return w.read(key)

    nbytes = save_streamed(specs, produce, path)
    return nbytes, {n[: -len(".weight")]: v[2] for n, v in layout.items()}


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        dst.mkdir()
        for f in sorted(src.iterdir()):
            _link_or_copy(f, dst / f.name)
        return
    try:
        os.link(src.resolve(), dst)  # the hub cache holds symlinks into blobs/
    except OSError:
        shutil.copy2(src, dst)


def build_torch_engine(
    model: str,
    out: str | Path,
    precision: str,
    int4_block: int = 64,
    components: str | None = None,
    force: bool = False,
    quiet: bool = False,
    command: str = "",
    loras=None,
    hub: dict | None = None,
) -> Path:
    from ..engine.model.checkpoint import open_model
    from ..engine.model.spec import QUANT_PRECISIONS
    from .engine_folder import Progress, build_key, source_fingerprint, tool_versions

    if precision not in QUANT_PRECISIONS:
        raise UserError(
            f"--backend torch builds quantized engines ({', '.join(QUANT_PRECISIONS)}); "
            f"{precision} runs straight from the checkpoint"
        )
    if loras:
        raise UserError("--lora with --backend torch: pass the LoRAs to `generate --lora` instead")
    out = Path(out)
    mf = open_model(model, components)
    extra = {"int4_block": int4_block, "layout": "torch-packed-1"}
    key = build_key(mf, "torch", precision, {}, None, None, extra)
    with build_lock(out) as tmp:
        if reusable(out, key, force, quiet):
            return out
        prog = Progress(quiet)
        prog.say(f"quantizing the transformer to {precision}")
        nb, formats = write_transformer(
            mf, tmp / "transformer.safetensors", precision, int4_block, prog.bar("transformer")
        )
        prog.say("writing the folded modulation weights (int8)")
        nm = write_modulation_weights(mf.transformer_cfg, mf.weights, tmp / "modulation.safetensors", "int8")
        for c in COMPONENTS:
            _link_or_copy(mf.component(c), tmp / c)
        comps = {
            "transformer": {"file": "transformer.safetensors", "weight_bytes": nb, "formats": formats},
            "modulation": {"file": "modulation.safetensors", "weight_bytes": nm, "format": "int8"},
            **{c: {"dir": c} for c in COMPONENTS},
        }
        data = {
            "build_key": key,
            "backend": "torch",
            "precision": precision,
            "int4_block": int4_block,
            "source": {"model": str(model), "fingerprint": source_fingerprint(mf), **(hub or {})},
            "transformer_config": mf.transformer_cfg.to_dict(),
            "scheduler": {"shift": mf.scheduler_shift()},
            "default_size": list(mf.default_size()),
            "vae_scale_factor": mf.vae_scale_factor(),
            "components": comps,
            "tools": tool_versions(),
            "command": command,
        }
        finish_folder(tmp, out, data)
    if not quiet:
        print(f"engine written to {out}", file=sys.stderr)
    return out
