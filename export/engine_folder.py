"""Engine-folder steps every builder shares: one writer at a time, leftovers of killed builds
removed, a full disk reported as such.

A build assembles its folder under ``.NAME.build-*`` next to the destination and renames it when
complete (``finish_folder``), so readers never see a half-written engine. The lock (``flock`` on
``.NAME.lock``) is released by the kernel when its holder dies, even by SIGKILL, so the next build
knows every ``.NAME.build-*`` it finds is garbage.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


def finish_folder(tmp: Path, out: Path, data: dict) -> None:
    """Checksum every file of the assembled folder into its manifest, then move it into place."""
    from ..engine.manifest import MANIFEST, file_entry, write_manifest

    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST)
    data["files"] = {f: file_entry(tmp, f) for f in files}
    write_manifest(tmp, data)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
