"""Hub ids: the files an AuraFlow pipeline needs, found in or fetched into the Hugging Face cache.

The hub itself is huggingface_hub's business: HF_ENDPOINT, HF_TOKEN, HF_HOME / HF_HUB_CACHE and
HF_HUB_OFFLINE, the cache layout, progress bars, and retrying a dropped transfer from where it
stopped (an HTTP Range request). This module only decides which files of a repo the pipeline needs,
and turns the hub's failures into one line a user can act on. No torch here: the ONNX Runtime path
imports it.

Why a plain ``snapshot_download(id, local_files_only=True)`` misses a cache that diffusers filled:
huggingface_hub keeps the repo's full file listing next to the snapshot (``trees/<commit>.json``) and,
offline, refuses a snapshot that lacks any listed file that the patterns allow. diffusers downloads
only what its pipeline needs (no root single file, no fp16 copies), so with no patterns the snapshot
always looks incomplete. We ask with our own list of needed files, which diffusers' download covers.
"""

from __future__ import annotations

import glob
import importlib
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

COMPONENTS = ("scheduler", "tokenizer", "text_encoder", "transformer", "vae")
WEIGHTED = ("text_encoder", "transformer", "vae")
_AUX_SUFFIXES = (".json", ".txt", ".model")  # configs, tokenizer files (tokenizer.json, spiece.model, ...)
_SHARD = re.compile(r"-\d{5}-of-\d{5}")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(spec) -> bool:
    """``org/name`` that is not an existing local path."""
    s = str(spec)
    return bool(_REPO_ID.fullmatch(s)) and not Path(s).exists()


def download_command(repo_id: str, revision: str | None = None) -> str:
    return f"auraflow-edge download {repo_id}" + (f" --revision {revision}" if revision else "")


def _weight_kind(name: str) -> tuple[str, str | None] | None:
    """("weights" | "index", variant) for a safetensors weight file or its index, else None.

    Covers every naming diffusers writes: ``x.safetensors``, ``x-00001-of-00002.safetensors``,
    ``x.fp16.safetensors``, ``x.fp16-00001-of-00002.safetensors`` (and the legacy
    ``x-00001-of-00002.fp16.safetensors``), ``x.safetensors.index.json``,
    ``x.safetensors.index.fp16.json`` (and the legacy ``x.safetensors.fp16.index.json``).
    """
    base = _SHARD.sub("", name)
    if base.endswith(".safetensors"):
        kind = "weights"
    elif ".safetensors." in base and ".index." in base and base.endswith(".json"):
        kind = "index"
    else:
        return None
    tags = [t for t in base.split(".")[1:] if t not in ("safetensors", "index", "json")]
    return kind, (tags[0] if tags else None)


def select_files(files: list[str], variant: str | None = None, repo_id: str = "") -> list[str]:
    """The repo files the pipeline needs: model_index.json, the scheduler and tokenizer files, and
    per model component its config.json and one safetensors weight set (the plain one, or
    ``variant``'s where the component has it). Never a root single-file checkpoint, variant copies
    not asked for, pickles (.bin/.pt/.ckpt), onnx or flax files. A subset of what diffusers'
    ``from_pretrained`` downloads, so a cache it filled is complete for us."""
    if "model_index.json" not in files:
        raise UserError(
            f"{repo_id}: no model_index.json in the repo: not a diffusers pipeline; "
            "for a single-file checkpoint, download the file and pass it with --components"
        )
    out = ["model_index.json"]
    for comp in COMPONENTS:
        names = [f[len(comp) + 1 :] for f in files if f.startswith(comp + "/") and f.count("/") == 1]
        weights: dict[str | None, list[str]] = {}
        for n in names:
            kind = _weight_kind(n)
            if kind is not None:
                weights.setdefault(kind[1], []).append(n)
            elif n == "config.json" or (comp not in WEIGHTED and n.endswith(_AUX_SUFFIXES)):
                out.append(f"{comp}/{n}")
        if comp not in WEIGHTED or not names:
            continue
        pick = variant if variant in weights else None
        if pick not in weights:
            only = sorted(v for v in weights if v)
            has = f"only {', '.join(only)} variant copies" if only else "no safetensors weights"
            raise UserError(
                f"{repo_id}: {comp}/ has {has}; pickle checkpoints are never loaded and the torch "
                "backend reads the plain (non-variant) files"
            )
        out += [f"{comp}/{n}" for n in weights[pick]]
    return sorted(out)


@dataclass(frozen=True)
class HubSnapshot:
    repo_id: str
    revision: str  # as asked ("main" when not given)
    commit: str
    folder: Path

    def record(self) -> dict:
        """Where a build came from, for its manifest."""
        return {"model": self.repo_id, "revision": self.revision, "commit": self.commit}


def _patterns(files: list[str]) -> list[str]:
    return [glob.escape(f) for f in files]  # huggingface_hub matches fnmatch patterns; these are names


def _why(e: BaseException) -> str:
    """The root cause in a few words, on one line."""
    while e.__cause__ is not None:
        e = e.__cause__
    msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {msg[:160]}" if msg else type(e).__name__


def _cached(repo_id: str, revision, variant: str | None) -> Path | None:
    """The cached snapshot if it holds every file the pipeline needs; never touches the network."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, LocalEntryNotFoundError

    try:
        listing = [f.path for f in get_cached_repo_tree(repo_id, revision=revision)]
    except CachedRepoTreeNotFoundError:
        listing = None  # a cache copied by hand or written by an older huggingface_hub
    try:
        if listing is None:
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
            listing = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        wanted = select_files(listing, variant, repo_id)
        # huggingface_hub checks the wanted files against its cached listing (IncompleteSnapshotError
        # is a LocalEntryNotFoundError)
        folder = snapshot_download(
            repo_id, revision=revision, local_files_only=True, allow_patterns=_patterns(wanted)
        )
    except LocalEntryNotFoundError:
        return None
    return Path(folder)


def snapshot(
    repo_id: str, revision: str | None = None, variant: str | None = None, progress: bool = True
) -> HubSnapshot:
    """The local snapshot of ``repo_id`` at ``revision`` holding what the pipeline needs, downloaded
    first when it is not complete in the cache (offline: found in the cache or a clear error)."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub import errors as hfe

    where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
    offline = constants.is_offline_mode()
    not_cached = f"{where}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE})"
    api = HfApi()
    try:
        rev = api.resolve_revision(repo_id, revision=revision, local_files_only=offline)
        folder = _cached(repo_id, rev, variant)
        if folder is None and offline:
            raise hfe.OfflineModeIsEnabled()
        if folder is None:
            info = api.model_info(repo_id, revision=rev.resolved)
            wanted = select_files([s.rfilename for s in info.siblings or []], variant, repo_id)
    except hfe.HFValidationError as e:
        raise UserError(f"{repo_id}: not a valid hub id ({_why(e)})") from None
    except (hfe.RevisionResolutionError, hfe.OfflineModeIsEnabled) as e:
        if offline:
            raise UserError(
                f"{not_cached} and HF_HUB_OFFLINE is set; fetch it first with "
                f"`{download_command(repo_id, revision)}` where the hub can be reached"
            ) from None
        raise UserError(
            f"{not_cached} and the hub at {constants.ENDPOINT} cannot be reached ({_why(e)}); "
            "check the network or HF_ENDPOINT"
        ) from None
    except hfe.GatedRepoError:
        raise UserError(
            f"{repo_id}: a gated model; accept its terms on the model page, then set HF_TOKEN "
            "(or `hf auth login`) to a token with access"
        ) from None
    except hfe.RepositoryNotFoundError:
        raise UserError(
            f"{repo_id}: not a local path, and no such model on {constants.ENDPOINT} (or it is private "
            "and HF_TOKEN is unset or has no access); check the path or the id"
        ) from None
    except hfe.RevisionNotFoundError:
        raise UserError(f"{repo_id}: no revision {revision!r} on {constants.ENDPOINT}") from None
    except (hfe.HfHubHTTPError, *_transport_errors()) as e:
        raise UserError(
            f"{not_cached} and the hub at {constants.ENDPOINT} failed ({_why(e)}); try again later"
        ) from None

    if folder is None:
        try:
            folder = Path(
                snapshot_download(
                    repo_id,
                    revision=rev,
                    allow_patterns=_patterns(wanted),
                    tqdm_class=None if progress else _quiet_bar(),
                )
            )
        except (hfe.HfHubHTTPError, OSError, *_transport_errors()) as e:
            raise UserError(
                f"{where}: download interrupted ({_why(e)}); run the same command again to resume "
                "(finished files are kept in the cache)"
            ) from None
    return HubSnapshot(repo_id, rev.initial or constants.DEFAULT_REVISION, rev.resolved, folder)


def _transport_errors() -> tuple[type[Exception], ...]:
    """Connection errors of the HTTP client huggingface_hub uses: httpx2 from 2.x, httpx in 1.x."""
    out = []
    for name in ("httpx2", "httpx"):
        try:
            out.append(importlib.import_module(name).TransportError)
        except ImportError:
            pass
    return tuple(out)


def _quiet_bar():
    """huggingface_hub's progress bar class, always disabled (``--quiet``)."""
    from huggingface_hub.utils import tqdm

    class QuietBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietBar
