"""Finding and reading AuraFlow checkpoints: diffusers folders, original single files, cached hub ids.

Everything is read from safetensors one tensor at a time; nothing is ever unpickled. The
transformer's weights come out under diffusers' names whatever the source, so the model, the
exporter and the quantizer all see one naming.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .config import AuraFlowConfig, default_image_side
from .safetensors_io import SafetensorsFile

PIPELINE_CLASS = "AuraFlowPipeline"
TRANSFORMER_CLASS = "AuraFlowTransformer2DModel"


def resolve_model(spec: str | Path, revision: str | None = None, progress: bool = True) -> Path:
    """A folder or file path as given, or a hub id found in or downloaded into the Hugging Face cache
    (only the files the pipeline needs; see ``hub.py``)."""
    from .hub import is_hub_id, snapshot

    if is_hub_id(spec):
        return snapshot(str(spec), revision, progress=progress).folder
    if revision is not None:
        raise UserError(f"{spec}: --revision applies to hub ids (org/name), not to local paths")
    p = Path(spec)
    if p.exists():
        return p
    raise UserError(f"{spec}: no such file or folder")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


@dataclass
class WeightSource:
    """diffusers name -> (file, stored key, swap halves) over one or more safetensors files."""

    files: dict[str, SafetensorsFile] = field(default_factory=dict)
    index: dict[str, tuple[str, str, bool]] = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.index)

    def shape(self, name: str) -> tuple[int, ...]:
        f, k, _ = self.index[name]
        return self.files[f].shape(k)

    def dtype(self, name: str) -> np.dtype:
        f, k, _ = self.index[name]
        return self.files[f].dtype(k)

    def nbytes(self, name: str) -> int:
        f, k, _ = self.index[name]
        return self.files[f].nbytes(k)

    def read(self, name: str) -> np.ndarray:
        f, k, swap = self.index[name]
        a = self.files[f].read(k)
        if swap:  # original final modulation is (shift, scale); diffusers' is (scale, shift)
            h = a.shape[0] // 2
            a = np.concatenate([a[h:], a[:h]], axis=0)
        return a

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for n in self.index:
            yield n, self.read(n)


_VARIANT = re.compile(r"\.(fp16|bf16|fp32)\.safetensors(\.index\.json)?$")


def _prefer_plain(paths: list[Path]) -> list[Path]:
    """Hub folders may hold variant copies (``*.fp16.safetensors``); use them only when alone."""
    plain = [p for p in paths if not _VARIANT.search(p.name)]
    return plain or paths


def safetensors_files(folder: Path) -> list[Path]:
    return _safetensors_files(folder)


def _safetensors_files(folder: Path) -> list[Path]:
    idx = _prefer_plain(sorted(folder.glob("*.safetensors.index.json")))
    if idx:
        wm = _read_json(idx[0]).get("weight_map", {})
        files = []
        for rel in dict.fromkeys(wm.values()):
            # lexically: in a Hugging Face cache snapshot every file is a symlink into blobs/
            f = Path(os.path.normpath(folder.absolute() / rel))
            if folder.absolute() not in f.parents:
                raise UserError(f"{idx[0]}: shard path {rel!r} points outside the folder")
            if not f.is_file():
                raise UserError(f"{folder}: shard {rel} listed in {idx[0].name} is missing")
            files.append(f)
        return files
    files = _prefer_plain(sorted(folder.glob("*.safetensors")))
    if files and _VARIANT.search(files[0].name):
        files = [
            f for f in files if _VARIANT.search(f.name).group(1) == _VARIANT.search(files[0].name).group(1)
        ]
    if not files:
        bins = list(folder.glob("*.bin")) + list(folder.glob("*.pt")) + list(folder.glob("*.ckpt"))
        hint = " (pickle checkpoints are never loaded; convert to safetensors)" if bins else ""
        raise UserError(f"{folder}: no safetensors weights{hint}")
    return files


def diffusers_transformer(folder: Path) -> tuple[AuraFlowConfig, WeightSource]:
    cfg = _read_json(folder / "config.json")
    if cfg.get("_class_name") not in (None, TRANSFORMER_CLASS):
        raise UserError(
            f"{folder}: unknown model type {cfg.get('_class_name')!r}, expected {TRANSFORMER_CLASS}"
        )
    src = WeightSource()
    for f in _safetensors_files(folder):
        sf = SafetensorsFile(f)
        src.files[str(f)] = sf
        for k in sf.keys():
            src.index[k] = (str(f), k, False)
    return AuraFlowConfig.from_diffusers(cfg), src


def original_names(n_joint: int, n_single: int) -> dict[str, str]:
    """diffusers name -> original AuraFlow name (diffusers' conversion, inverted)."""
    m = {
        "register_tokens": "register_tokens",
        "time_step_proj.linear_1.weight": "t_embedder.mlp.0.weight",
        "time_step_proj.linear_1.bias": "t_embedder.mlp.0.bias",
        "time_step_proj.linear_2.weight": "t_embedder.mlp.2.weight",
        "time_step_proj.linear_2.bias": "t_embedder.mlp.2.bias",
        "context_embedder.weight": "cond_seq_linear.weight",
        "proj_out.weight": "final_linear.weight",
        "norm_out.linear.weight": "modF.1.weight",
        "pos_embed.pos_embed": "positional_encoding",
        "pos_embed.proj.weight": "init_x_linear.weight",
        "pos_embed.proj.bias": "init_x_linear.bias",
    }
    ff = {"c_fc1": "linear_1", "c_fc2": "linear_2", "c_proj": "out_projection"}
    for i in range(n_joint):
        d, o = f"joint_transformer_blocks.{i}", f"double_layers.{i}"
        for ok, dk in (("mlpX", "ff"), ("mlpC", "ff_context")):
            for a, b in ff.items():
                m[f"{d}.{dk}.{b}.weight"] = f"{o}.{ok}.{a}.weight"
        m[f"{d}.norm1.linear.weight"] = f"{o}.modX.1.weight"
        m[f"{d}.norm1_context.linear.weight"] = f"{o}.modC.1.weight"
        attn = {"w2q": "to_q", "w2k": "to_k", "w2v": "to_v", "w2o": "to_out.0"}
        attn |= {"w1q": "add_q_proj", "w1k": "add_k_proj", "w1v": "add_v_proj", "w1o": "to_add_out"}
        for a, b in attn.items():
            m[f"{d}.attn.{b}.weight"] = f"{o}.attn.{a}.weight"
    for i in range(n_single):
        d, o = f"single_transformer_blocks.{i}", f"single_layers.{i}"
        for a, b in ff.items():
            m[f"{d}.ff.{b}.weight"] = f"{o}.mlp.{a}.weight"
        m[f"{d}.norm1.linear.weight"] = f"{o}.modCX.1.weight"
        for a, b in {"w1q": "to_q", "w1k": "to_k", "w1v": "to_v", "w1o": "to_out.0"}.items():
            m[f"{d}.attn.{b}.weight"] = f"{o}.attn.{a}.weight"
    return m


def original_transformer(path: Path, head_dim: int = 256) -> tuple[AuraFlowConfig, WeightSource]:
    """An original single-file AuraFlow checkpoint (keys optionally prefixed ``model.``)."""
    sf = SafetensorsFile(path)
    keys = sf.keys()
    prefix = "model." if any(k.startswith("model.") for k in keys) else ""
    stored = {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}
    if "cond_seq_linear.weight" not in stored or "positional_encoding" not in stored:
        raise UserError(
            f"{path}: not an AuraFlow transformer checkpoint (no cond_seq_linear / positional_encoding)"
        )

    def count(tag):
        return len({int(k.split(".")[1]) for k in stored if k.startswith(tag + ".")})

    hidden, joint_dim = sf.shape(stored["cond_seq_linear.weight"])
    patch_in = sf.shape(stored["init_x_linear.weight"])[1]
    if hidden % head_dim:
        raise UserError(f"{path}: hidden size {hidden} is not a multiple of head_dim {head_dim}")
    cfg = AuraFlowConfig(
        patch_size=int(round((patch_in / 4) ** 0.5)),
        num_mmdit_layers=count("double_layers"),
        num_single_dit_layers=count("single_layers"),
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=joint_dim,
        caption_projection_dim=hidden,
        pos_embed_max_size=sf.shape(stored["positional_encoding"])[1],
        num_register_tokens=sf.shape(stored["register_tokens"])[1],
        # a single file carries no config: the released checkpoints' sample sizes by grid
        sample_size=128 if sf.shape(stored["positional_encoding"])[1] >= 9216 else 64,
    )
    src = WeightSource(files={str(path): sf})
    for dname, oname in original_names(cfg.num_mmdit_layers, cfg.num_single_dit_layers).items():
        if oname not in stored:
            raise UserError(f"{path}: missing tensor {prefix}{oname}")
        src.index[dname] = (str(path), stored[oname], dname == "norm_out.linear.weight")
    return cfg, src


@dataclass
class ModelFolder:
    """A diffusers AuraFlow pipeline folder (or a single transformer file plus a components folder)."""

    root: Path
    transformer_cfg: AuraFlowConfig
    weights: WeightSource
    components: Path | None  # folder holding tokenizer/, text_encoder/, vae/, scheduler/

    def component(self, name: str) -> Path:
        if self.components is None:
            raise UserError(
                f"{self.root}: a single transformer file has no {name}; pass a pipeline folder "
                "with --components"
            )
        p = self.components / name
        if not p.is_dir():
            raise UserError(f"{self.components}: missing component folder {name}/")
        return p

    def vae_scale_factor(self) -> int:
        """2 ** (VAE down blocks - 1), as diffusers computes it (8 for the SDXL VAE)."""
        p = self.components / "vae" / "config.json" if self.components else None
        if p is None or not p.exists():
            return 8
        return 2 ** (len(_read_json(p).get("block_out_channels", [0, 0, 0, 0])) - 1)

    def default_size(self) -> tuple[int, int]:
        side = default_image_side(self.transformer_cfg, self.vae_scale_factor())
        return side, side

    def scheduler_shift(self) -> float:
        if self.components is None:
            return 1.73
        p = self.components / "scheduler" / "scheduler_config.json"
        return float(_read_json(p).get("shift", 1.73)) if p.exists() else 1.73


def open_model(
    spec: str | Path,
    components: str | Path | None = None,
    head_dim: int = 256,
    revision: str | None = None,
    progress: bool = True,
) -> ModelFolder:
    root = resolve_model(spec, revision, progress)
    comp = Path(components) if components else None
    if root.is_file():
        if root.suffix != ".safetensors":
            raise UserError(f"{root}: only .safetensors checkpoints are loaded (never pickles)")
        cfg, src = original_transformer(root, head_dim)
        return ModelFolder(root, cfg, src, comp)
    mi = root / "model_index.json"
    if mi.is_file():
        cls = _read_json(mi).get("_class_name")
        if cls != PIPELINE_CLASS:
            raise UserError(
                f"{root}: unknown model type {cls!r} in model_index.json, expected {PIPELINE_CLASS}"
            )
        cfg, src = diffusers_transformer(root / "transformer")
        return ModelFolder(root, cfg, src, comp or root)
    if (root / "config.json").is_file():
        cfg, src = diffusers_transformer(root)
        return ModelFolder(root, cfg, src, comp)
    raise UserError(
        f"{root}: not an AuraFlow model (no model_index.json, config.json or .safetensors file); "
        "for an engine folder built by `auraflow-edge build`, check that manifest.json is present"
    )
