"""The trained tiny AuraFlow shipped with the package, and the writer of its pipeline folder.

``weights/`` is a diffusers pipeline folder in fp16, each component's safetensors sharded below
1 MB with the usual index json, plus ``SHA256SUMS`` and ``training.json`` (how it was made).
``write_pipeline(folder)`` turns it into an ordinary fp32 folder (one safetensors per component)
that ``AuraFlowPipeline.from_pretrained`` and every backend of this engine load; it needs numpy and
safetensors only, no torch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from ..errors import UserError

WEIGHTS = Path(__file__).parent / "weights"
SUMS = "SHA256SUMS"
SHARD_BYTES = 900_000
# component -> weight file stem (diffusers models vs transformers models)
STEMS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors(component: Path, stem: str) -> dict[str, np.ndarray]:
    index = component / f"{stem}.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else [f"{stem}.safetensors"]
    )
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(load_file(component / f))
    return out


def _save_sharded(tensors: dict[str, np.ndarray], component: Path, stem: str) -> None:
    shards: list[list[str]] = [[]]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += a.nbytes
    if len(shards) == 1:
        save_file(tensors, component / f"{stem}.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, component / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (component / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _convert(src: Path, dst: Path, dtype, sharded: bool) -> None:
    """Copy a pipeline folder, weights cast to ``dtype`` (sharded below 1 MB or one file each)."""
    if dst.exists():
        shutil.rmtree(dst)
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if f.is_dir() or f.name == SUMS or ".safetensors" in f.name:
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst / rel)
    for comp, stem in STEMS.items():
        tensors = {k: v.astype(dtype) for k, v in _tensors(src / comp, stem).items()}
        (dst / comp).mkdir(parents=True, exist_ok=True)
        if sharded:
            _save_sharded(tensors, dst / comp, stem)
        else:
            save_file(tensors, dst / comp / f"{stem}.safetensors", metadata={"format": "pt"})


def pack(trained: str | Path, dst: str | Path = WEIGHTS, command: str = "") -> str:
    """fp16, sharded copy of a trained folder with SHA256SUMS; returns the digest of SHA256SUMS."""
    dst = Path(dst)
    _convert(Path(trained), dst, np.float16, sharded=True)
    record = dst / "training.json"
    rec = json.loads(record.read_text()) if record.exists() else {}
    rec["command"] = command
    record.write_text(json.dumps(rec, indent=2))
    files = sorted(f for f in dst.rglob("*") if f.is_file() and f.name != SUMS)
    (dst / SUMS).write_text("".join(f"{_sha256(f)}  {f.relative_to(dst).as_posix()}\n" for f in files))
    return _sha256(dst / SUMS)


def verify(folder: str | Path = WEIGHTS) -> None:
    """Every file listed in SHA256SUMS is there with that digest, and nothing else is."""
    folder = Path(folder)
    if not (folder / SUMS).is_file():
        raise UserError(
            f"{folder}: the trained tiny model is not installed (no {SUMS}); reinstall auraflow-edge"
        )
    listed = {}
    for line in (folder / SUMS).read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    present = {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file() and f.name != SUMS}
    if present != set(listed):
        raise UserError(f"{folder}: files differ from {SUMS}: {sorted(present ^ set(listed))}")
    for name, digest in listed.items():
        if _sha256(folder / name) != digest:
            raise UserError(f"{folder / name}: checksum mismatch; reinstall auraflow-edge")


def write_pipeline(folder: str | Path, source: str | Path = WEIGHTS) -> Path:
    """Write the trained tiny AuraFlow as an fp32 diffusers pipeline folder (no torch needed)."""
    verify(source)
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    _convert(Path(source), tmp, np.float32, sharded=False)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
