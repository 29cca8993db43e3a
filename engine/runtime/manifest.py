"""Engine folder manifest: what was built, from what, with which settings and tools.

Everything that made an artifact is recorded here and read back from here (never parsed out of
file names). Loading checks the format version, that every path stays inside the folder, that
every file exists with its recorded size, and on request its sha256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError

FORMAT = "auraflow-edge-engine"
VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def inside(folder: Path, rel: str) -> Path:
    """``folder / rel``, refusing absolute paths and anything that resolves outside the folder."""
    if Path(rel).is_absolute():
        raise UserError(
            f"{folder / MANIFEST}: path {rel!r} is absolute; engine folders hold relative paths only"
        )
    p = (folder / rel).resolve()
    root = folder.resolve()
    if p != root and root not in p.parents:
        raise UserError(
            f"{folder / MANIFEST}: path {rel!r} points outside the engine folder; refusing to load it"
        )
    return p


def file_entry(folder: Path, rel: str) -> dict:
    p = folder / rel
    return {"size": p.stat().st_size, "sha256": sha256_file(p)}


class Manifest:
    def __init__(self, folder: Path, data: dict):
        self.folder, self.data = folder, data

    def __getitem__(self, k):
        return self.data[k]

    def get(self, k, default=None):
        return self.data.get(k, default)

    def path(self, rel: str) -> Path:
        return inside(self.folder, rel)

    def component(self, name: str) -> dict:
        comps = self.data.get("components", {})
        if name not in comps:
            raise UserError(
                f"{self.folder}: engine has no {name} component; rebuild it with `auraflow-edge build`"
            )
        return comps[name]

    @classmethod
    def load(cls, folder: str | Path, verify: bool = False) -> Manifest:
        folder = Path(folder)
        mp = folder / MANIFEST
        try:
            data = json.loads(mp.read_text())
        except FileNotFoundError:
            raise UserError(
                f"{folder}: no {MANIFEST}; not an engine folder (build one with `auraflow-edge build`)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{mp}: damaged ({e}); rebuild the engine with --force") from None
        if data.get("format") != FORMAT:
            raise UserError(f"{mp}: not an AuraFlow Edge engine manifest")
        if data.get("version") != VERSION:
            raise UserError(
                f"{mp}: engine format version {data.get('version')} but this runtime reads {VERSION}; rebuild with --force"
            )
        m = cls(folder, data)
        for rel, entry in data.get("files", {}).items():
            p = m.path(rel)
            if not p.is_file():
                raise UserError(f"{folder}: {rel} listed in the manifest is missing; rebuild with --force")
            if p.stat().st_size != entry["size"]:
                raise UserError(
                    f"{folder}: {rel} has {p.stat().st_size} bytes, the manifest says {entry['size']}: damaged; rebuild with --force"
                )
            if verify and sha256_file(p) != entry["sha256"]:
                raise UserError(f"{folder}: {rel} fails its sha256 check: damaged; rebuild with --force")
        for comp in data.get("components", {}).values():
            for key in ("file", "data", "dir"):
                if key in comp:
                    m.path(comp[key])
            if str(comp.get("file", "")).endswith(".onnx"):
                check_external_data(folder, m.path(comp["file"]))
        return m


def check_external_data(folder: Path, onnx_path: Path) -> None:
    """Every external-data location named inside an ONNX graph must stay inside the engine folder
    (a crafted graph could otherwise make the runtime read any file)."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:
        raise UserError(
            f"{onnx_path}: not a readable ONNX graph ({str(e)[:120]}); rebuild with --force"
        ) from None
    root = folder.resolve()
    for loc in {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}:
        p = (onnx_path.parent / loc).resolve()
        if Path(loc).is_absolute() or (p != root and root not in p.parents):
            raise UserError(
                f"{onnx_path.name}: external data {loc!r} points outside the engine folder; refusing to load it"
            )


def write_manifest(folder: Path, data: dict) -> None:
    data = {"format": FORMAT, "version": VERSION, **data}
    (folder / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
