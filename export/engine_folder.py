"""Engine-folder steps every builder shares (ONNX Runtime, TensorRT, torch, refit): one writer at a
time, leftovers of killed builds removed, a full disk reported as such, the build key, tool
versions, source fingerprint, progress lines, and the checksummed rename into place.

A build assembles its folder under ``.NAME.build-*`` next to the destination and renames it when
complete (``finish_folder``), so readers never see a half-written engine. The lock (``flock`` on
``.NAME.lock``) is released by the kernel when its holder dies, even by SIGKILL, so the next build
knows every ``.NAME.build-*`` it finds is garbage.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ..engine.errors import UserError


@contextmanager
def build_lock(out: Path) -> Iterator[Path]:
    """Hold the destination for one build; yields a fresh temporary folder next to it (removed
    unless the build renamed it into place)."""
    out = Path(out)
    if not out.parent.exists():
        raise UserError(f"{out.parent}: folder does not exist")
    lock_path = out.parent / f".{out.name}.lock"
    f = open(lock_path, "a+")  # noqa: SIM115 - held for the whole build
    try:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no advisory locks; builds are not serialized there
            pass
        except BlockingIOError:
            raise UserError(
                f"{out}: another build is writing this engine folder; wait for it or choose another -o"
            ) from None
        for stale in out.parent.glob(f".{out.name}.build-*"):  # left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the engine is an ordinary folder
        try:
            yield tmp
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                free = shutil.disk_usage(out.parent).free
                raise UserError(
                    f"{out.parent}: disk full while writing the engine ({free / 2**20:.0f} MiB free); "
                    "nothing was written, free some space and build again"
                ) from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock_path.unlink(missing_ok=True)  # before unlocking: a newcomer then locks a new file
        f.close()


def reusable(out: Path, key: str, force: bool, quiet: bool) -> bool:
    """True when ``out`` already holds the engine with this build key (reuse it); refuses a folder
    holding something else unless ``force``; False when the build should go ahead."""
    from ..engine.runtime.manifest import MANIFEST, Manifest

    if (out / MANIFEST).exists() and not force:
        try:
            old = Manifest.load(out)
        except UserError:
            old = None
        if old is not None and old.get("build_key") == key:
            if not quiet:
                print(f"{out}: up to date (build key {key}); reusing it", file=sys.stderr)
            return True
        raise UserError(f"{out} already holds a different engine; pass --force to replace it")
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not an engine folder; choose another -o")
    return False


def finish_folder(tmp: Path, out: Path, data: dict) -> None:
    """Checksum every file of the assembled folder into its manifest, then move it into place."""
    from ..engine.runtime.manifest import MANIFEST, file_entry, write_manifest

    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST)
    data["files"] = {f: file_entry(tmp, f) for f in files}
    write_manifest(tmp, data)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def tool_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("auraflow-edge", "torch", "onnx", "onnxruntime", "onnxscript", "diffusers", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def source_fingerprint(mf) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(mf.transformer_cfg.to_dict(), sort_keys=True).encode())
    for f in sorted(mf.weights.files):
        st = Path(f).stat()
        h.update(f"{Path(f).name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()


class Progress:
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


def build_key(mf, backend, precision, pol, height, width, extra=None) -> str:
    """Everything that made an engine: a rebuild with the same key reuses the folder."""
    from ..engine.model.lora import fingerprints, lora_records
    from ..engine.runtime.manifest import VERSION
    from .onnx_export import OPSET

    key_data = {
        "version": VERSION,
        "source": source_fingerprint(mf),
        "backend": backend,
        "precision": precision,
        "policies": {k: asdict(v) for k, v in pol.items()},
        "shape": [height, width],
        "opset": OPSET,
        "tools": tool_versions(),
        "extra": extra,
        # only with LoRAs, so engines built without any keep their key
        **({"loras": fingerprints(lora_records(mf.weights))} if lora_records(mf.weights) else {}),
    }
    return hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
