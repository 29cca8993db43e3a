"""LoRA adapters for the AuraFlow transformer: every common file layout, mapped onto our weights.

Layouts read (safetensors only): diffusers / PEFT (``transformer.<module>.lora_A|lora_B.weight``,
optional ``<module>.alpha`` tensors, or ``lora_alpha`` / ``rank_pattern`` / ``alpha_pattern`` /
``use_rslora`` from the ``lora_adapter_metadata`` JSON that diffusers' ``save_lora_weights`` writes
into the header), kohya / ComfyUI / OneTrainer (``lora_unet_`` or ``lora_transformer_`` + the module
path with dots turned into underscores, ``lora_down`` / ``lora_up`` / ``alpha``), ComfyUI's
``diffusion_model.<module>`` with dots kept, and bare keys. The module path may use diffusers' names
(``joint_transformer_blocks.0.attn.to_q``) or the original AuraFlow ones
(``double_layers.0.attn.w2q``, as ComfyUI and the single-file checkpoints name them). A file that
does not fit (keys that match no linear, shapes that disagree, DoRA, text-encoder keys) is refused
whole with the offending keys named: never a partial apply.

Two ways of applying, with the same numbers (``W + sum_i scale_i * B_i @ A_i``):
- merged per weight as it is read (``MergedWeights``), in float32 before any rounding or
  quantization: engine builds, TensorRT refit, the folded modulation tables (evaluated from
  weights on the CPU), and the float torch transformer when it loads (free: every weight passes
  through the loader anyway, and no cost per step);
- unmerged, as a low-rank side branch ``y += (x @ A'^T) @ B^T`` on each targeted linear of a torch
  model (``install_branches``): next to quantized linears always (no re-quantization), and on a
  resident float model after a switch, holding the difference to what was merged at load (a bf16
  merge cannot be undone exactly, and re-merging rewrites every targeted weight). Switching swaps
  the small factors only: base weights are neither re-read nor re-quantized. Measured per step and
  per switch: ``bench/lora_cost.py``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..runtime.manifest import sha256_file
from ..runtime.modulation import TIME_NAMES, modulation_names
from .checkpoint import ModelFolder, WeightSource, original_names
from .safetensors_io import SafetensorsFile

_FACTOR = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)\.weight$")
_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")
_DORA = re.compile(r"\.(dora_scale|lora_magnitude_vector)(\.|$)")
_UNSUPPORTED = re.compile(r"\.(hada_|lokr_|lora_mid\.|diff$|diff_b$|lora_B\.bias$)")
# Module-path prefixes: text encoders (refused by name), underscored, dotted (longest first).
_TEXT = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_", "lora_te.")
_UNDERSCORED = ("lora_unet_", "lora_transformer_")
_DOTTED = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.", "model.")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` -> (file, scale); a tail after the last colon that is no number stays in the path."""
    path, sep, tail = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        return text, 1.0
    if not math.isfinite(scale):
        raise UserError(f"--lora {text}: the scale must be a finite number")
    return path, scale


@dataclass(frozen=True)
class LoraLayer:
    down: np.ndarray  # (r, in) float32, times the file's alpha / r
    up: np.ndarray  # (out, r) float32


@dataclass
class LoraFile:
    path: Path
    scale: float
    sha256: str
    layout: str
    layers: dict[str, LoraLayer]  # our weight name ("....attn.to_q.weight") -> factors

    def record(self) -> dict:
        return {
            "file": self.path.name,
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "scale": self.scale,
            "layout": self.layout,
            "targets": len(self.layers),
        }


@dataclass
class LoraSet:
    """Adapters applied together; every weight's delta is ``sum_i scale_i * B_i @ A_i``."""

    files: list[LoraFile] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.files)

    @property
    def targets(self) -> set[str]:
        return {n for f in self.files for n in f.layers}

    def factors(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(A', B) with every adapter stacked along the rank: A' (R, in) scaled, B (out, R)."""
        parts = [(f.scale * f.layers[name].down, f.layers[name].up) for f in self.files if name in f.layers]
        if not parts:
            return None
        return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts], axis=1)

    def merge(self, name: str, w: np.ndarray) -> np.ndarray:
        """``w`` with the adapters merged in (float32), or ``w`` untouched when no adapter targets it."""
        f = self.factors(name)
        if f is None:
            return w
        a, b = f
        return w.astype(np.float32) + b @ a

    def records(self) -> list[dict]:
        return [f.record() for f in self.files]

    def minus(self, other: LoraSet | None) -> LoraSet:
        """The adapters that turn ``other`` (already merged) into ``self``: ``other``'s with negated scales."""
        if not other:
            return self
        if fingerprints(self.records()) == fingerprints(other.records()):
            return LoraSet()
        return LoraSet(self.files + [replace(f, scale=-f.scale) for f in other.files])


def fingerprints(records: Iterable[dict]) -> list[tuple[str, float]]:
    """What makes a build differ: each adapter's content and scale, in order."""
    return [(r["sha256"], float(r["scale"])) for r in records]


def requested(specs) -> list[tuple[str, float]]:
    """``fingerprints`` of adapters asked for ([(path, scale)]), without reading them against a model."""
    out = []
    for s in specs or []:
        path, scale = (s, 1.0) if isinstance(s, (str, Path)) else s
        out.append((sha256_file(_open(Path(path))[0]), float(scale)))
    return out


def _module_maps(cfg) -> tuple[dict, dict]:
    """Every transformer linear under diffusers' and the original names: path -> (our weight, swap).

    ``swap``: the original final modulation stores (shift, scale), ours (scale, shift)."""
    dotted = {}
    for ours, orig in original_names(cfg.num_mmdit_layers, cfg.num_single_dit_layers).items():
        if ours.endswith(".weight"):
            dotted[ours[: -len(".weight")]] = (ours, False)
            dotted[orig[: -len(".weight")]] = (ours, ours == "norm_out.linear.weight")
    return dotted, {k.replace(".", "_"): v for k, v in dotted.items()}


def _resolve(path: str, dotted: dict, underscored: dict) -> tuple[str, bool] | None:
    for p in _UNDERSCORED:
        if path.startswith(p):
            return underscored.get(path[len(p) :])
    for p in (*_DOTTED, ""):
        if path.startswith(p) and path[len(p) :] in dotted:
            return dotted[path[len(p) :]]
    return None


def _peft_metadata(sf: SafetensorsFile) -> dict:
    raw = sf.metadata.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{sf.path}: damaged {METADATA_KEY} in the header ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{sf.path}: {METADATA_KEY} in the header is not a JSON object")
    # diffusers prefixes each field with the component it belongs to
    comp = {k[len("transformer.") :]: v for k, v in meta.items() if k.startswith("transformer.")}
    return comp or {k: v for k, v in meta.items() if "." not in k}


def _pattern(patterns: dict, module: str):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _name_some(keys: list[str], n: int = 3) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _open(path: Path) -> tuple[Path, SafetensorsFile]:
    if path.is_dir():  # a diffusers save_lora_weights or PEFT save_pretrained folder
        for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise UserError(
                f"{path}: a folder without pytorch_lora_weights.safetensors or adapter_model.safetensors"
            )
    if not path.is_file():
        raise UserError(f"{path}: LoRA file not found")
    try:
        sf = SafetensorsFile(path)
        for e in sf.entries.values():
            a, b = e["data_offsets"]
            if not isinstance(e["shape"], list) or b < a:
                raise ValueError("bad tensor entry")
    except UserError:
        raise
    except Exception:  # a header that is JSON but not a safetensors header
        raise UserError(f"{path}: not a safetensors file (LoRAs are read from .safetensors only)") from None
    return path, sf


def read_lora(path: str | Path, scale: float, mf: ModelFolder) -> LoraFile:
    """Read and check one adapter against the model; a UserError names every key that does not fit."""
    path, sf = _open(Path(path))
    meta = _peft_metadata(sf)
    if (
        sf.path.name == "adapter_model.safetensors"
        and not meta
        and (sf.path.parent / "adapter_config.json").is_file()
    ):
        meta = json.loads((sf.path.parent / "adapter_config.json").read_text())
    if meta.get("use_dora"):
        raise UserError(f"{path}: a DoRA adapter (use_dora); only plain LoRA is supported")
    if meta.get("lora_bias"):
        raise UserError(f"{path}: a LoRA with bias terms (lora_bias); only plain LoRA is supported")
    keys = sf.keys()
    if not keys:
        raise UserError(f"{path}: holds no tensors")
    dora = [k for k in keys if _DORA.search(k)]
    if dora:
        raise UserError(f"{path}: a DoRA adapter ({_name_some(dora)}); only plain LoRA is supported")
    text = [k for k in keys if k.startswith(_TEXT)]
    if text:
        raise UserError(
            f"{path}: has text-encoder LoRA tensors ({_name_some(text)}); only transformer LoRAs are "
            "supported (as in diffusers' AuraFlowPipeline)"
        )
    other = [k for k in keys if _UNSUPPORTED.search(k)]
    if other:
        raise UserError(
            f"{path}: LyCORIS / LoCon / bias / diff tensors are not supported ({_name_some(other)})"
        )

    dotted, underscored = _module_maps(mf.transformer_cfg)
    parts: dict[str, dict] = {}
    unknown, layouts = [], set()
    for k in keys:
        m = _FACTOR.match(k) or _ALPHA.match(k)
        hit = _resolve(m.group("mod"), dotted, underscored) if m else None
        if hit is None:
            unknown.append(k)
            continue
        kind = m.groupdict().get("kind", "alpha")
        slot = {"lora_A": "down", "lora_down": "down", "lora_B": "up", "lora_up": "up"}.get(kind, kind)
        entry = parts.setdefault(hit[0], {"swap": hit[1], "module": m.group("mod")})
        if slot in entry:
            raise UserError(f"{path}: two tensors for {hit[0]} ({entry['module']} and {m.group('mod')})")
        entry[slot] = k
        layouts.add("kohya" if kind in ("lora_down", "lora_up") else "peft")
    if unknown:
        raise UserError(
            f"{path}: {len(unknown)} tensors match no linear of this AuraFlow transformer: {_name_some(unknown)}"
        )

    layers, bad = {}, []
    for name, e in sorted(parts.items()):
        if "down" not in e or "up" not in e:
            bad.append(f"{e['module']} has no {'up/B' if 'down' in e else 'down/A'} tensor")
            continue
        down, up = sf.read(e["down"]), sf.read(e["up"])
        if down.dtype.kind in "iub" or up.dtype.kind in "iub":
            bad.append(f"{e['module']} has integer factors ({down.dtype}, {up.dtype})")
            continue
        out_f, in_f = mf.weights.shape(name)
        if (
            down.ndim != 2
            or up.ndim != 2
            or down.shape[1] != in_f
            or up.shape[0] != out_f
            or up.shape[1] != down.shape[0]
        ):
            bad.append(
                f"{e['module']}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit "
                f"({out_f}, {in_f}) as (r, {in_f}) / ({out_f}, r)"
            )
            continue
        down, up = down.astype(np.float32), up.astype(np.float32)
        r = down.shape[0]
        if not (np.isfinite(down).all() and np.isfinite(up).all()):
            bad.append(f"{e['module']} holds non-finite values")
            continue
        layers[name] = LoraLayer(_alpha(sf, e, meta, name[: -len(".weight")], r, bad) * down, up)
        if e["swap"]:  # original final modulation: (shift, scale) -> ours (scale, shift)
            h = out_f // 2
            layers[name] = LoraLayer(layers[name].down, np.concatenate([up[h:], up[:h]]))
    if bad:
        raise UserError(f"{path}: {len(bad)} LoRA layers do not fit this model: {_name_some(bad, 2)}")
    layout = "+".join(sorted(layouts))
    return LoraFile(path, float(scale), sha256_file(path), layout, layers)


def _alpha(sf, entry, meta: dict, module: str, r: int, bad: list) -> float:
    """The file's own multiplier: alpha / r (kohya ``alpha`` tensor or PEFT config), 1 when unstated."""
    if "alpha" in entry:
        a = sf.read(entry["alpha"]).astype(np.float64).reshape(-1)
        if a.size != 1 or not np.isfinite(a[0]):
            bad.append(f"{entry['alpha']} is not one finite number")
            return 1.0
        return float(a[0]) / r
    if "lora_alpha" not in meta and "r" not in meta:
        return 1.0  # diffusers' convention without metadata: alpha == rank
    want_r = _pattern(meta.get("rank_pattern"), module) or meta.get("r", r)
    if int(want_r) != r:
        bad.append(f"{module}: the header metadata says rank {want_r}, the tensors have rank {r}")
    alpha = _pattern(meta.get("alpha_pattern"), module) or meta.get("lora_alpha", want_r)
    return float(alpha) / (math.sqrt(r) if meta.get("use_rslora") else r)


def load_loras(specs, mf: ModelFolder) -> LoraSet:
    """``specs``: [(path, scale)] or paths (scale 1); each file read and checked before anything runs."""
    files = []
    for s in specs or []:
        path, scale = (s, 1.0) if isinstance(s, (str, Path)) else s
        if not math.isfinite(float(scale)):
            raise UserError(f"{path}: LoRA scale must be a finite number, got {scale}")
        files.append(read_lora(path, float(scale), mf))
    return LoraSet(files)


# ---- merged into weights as they are read (engine builds, refit, folded modulation) ----


@dataclass
class MergedWeights(WeightSource):
    """A WeightSource whose reads come back with the adapters merged in (float32 for targeted weights)."""

    loras: LoraSet = field(default_factory=LoraSet)

    def read(self, name: str) -> np.ndarray:
        return self.loras.merge(name, super().read(name))


def merged_model(mf: ModelFolder, loras: LoraSet) -> ModelFolder:
    """The model with ``loras`` merged into every weight read; unchanged when there are none."""
    if not loras:
        return mf
    return replace(mf, weights=MergedWeights(mf.weights.files, mf.weights.index, loras))


def with_loras(mf: ModelFolder, specs) -> ModelFolder:
    """``merged_model`` of the adapters ``specs`` ([(path, scale)]), read and checked first."""
    return merged_model(mf, load_loras(specs, mf))


def lora_records(weights) -> list[dict]:
    return weights.loras.records() if isinstance(weights, MergedWeights) else []


def lora_targets(weights) -> list[str]:
    """Every weight the merged adapters change (a TensorRT refit must restore them)."""
    return sorted(weights.loras.targets) if isinstance(weights, MergedWeights) else []


def folded_names(cfg) -> set[str]:
    """Weights the runtime evaluates on the CPU into the modulation table (never on the device)."""
    return set(modulation_names(cfg)) | set(TIME_NAMES)


# ---- unmerged side branches on a torch model (switchable on every precision) ----


def _add_branch(module, inputs, out):
    """Forward hook: out + (x @ A'^T) @ B^T, in the branch's dtype (the model's activation dtype)."""
    a, b = module.lora_branch
    x = inputs[0]
    x2 = x.reshape(-1, x.shape[-1]).to(a.dtype)  # (tokens, in)
    y2 = out.reshape(-1, out.shape[-1])  # (tokens, out)
    if y2.dtype == a.dtype and y2.is_contiguous():
        return y2.addmm_(x2 @ a.T, b.T).reshape(out.shape)  # in place: no second (tokens, out) buffer
    return y2.to(a.dtype).addmm(x2 @ a.T, b.T).reshape(out.shape).to(out.dtype)


def remove_branches(model) -> None:
    for m in model.modules():
        if hasattr(m, "_lora_hook"):
            m._lora_hook.remove()
            del m._lora_hook, m.lora_branch


def install_branches(model, loras: LoraSet, dtype, device) -> set[str]:
    """Replace every side branch of ``model`` by those of ``loras``. Returns the targeted weights the
    model does not hold (folded modulation linears, left on the meta device by the quantized loader)."""
    import torch

    remove_branches(model)
    absent = set()
    for name in sorted(loras.targets):
        try:
            m = model.get_submodule(name[: -len(".weight")])
        except AttributeError:
            absent.add(name)
            continue
        w = getattr(m, "weight", None)
        if w is not None and w.is_meta:
            absent.add(name)
            continue
        a, b = loras.factors(name)
        m.lora_branch = (
            torch.from_numpy(a).to(device, dtype).contiguous(),
            torch.from_numpy(np.ascontiguousarray(b)).to(device, dtype).contiguous(),
        )
        m._lora_hook = m.register_forward_hook(_add_branch)
    return absent


def attach(stage, loras: LoraSet, base_read: Callable[[str], np.ndarray]) -> None:
    """(Re)apply ``loras`` to a loaded torch transformer stage (TorchTransformer, QuantTorchTransformer).

    Branches go on the linears the stage's model holds, for the difference to ``stage.lora_merged``
    (the adapters its weights were loaded with; none on a quantized stage). The quantized stage
    folds the modulation onto the CPU: LoRAs on those linears are merged into its table's weight
    reads and the cached tables are dropped, so the next ``prepare`` recomputes them; when neither
    the old nor the new adapters touch the modulation, the cached tables stay."""
    branches = loras.minus(getattr(stage, "lora_merged", None))
    absent = install_branches(stage.model, branches, stage.dtype, stage.device)
    table = getattr(stage, "table", None)
    if table is None:
        if absent:
            raise UserError(f"LoRA targets {_name_some(sorted(absent))} are not in this model")
        return
    before = getattr(stage, "lora_folded", set())
    table.reset(lambda n: loras.merge(n, base_read(n)), clear=bool(before or absent))
    stage.lora_folded = absent
