"""Hub ids against a hub endpoint served here on 127.0.0.1, never the real hub.

The fake hub answers what huggingface_hub 2.4 asks for snapshot_download, hf_hub_download and
model_info: /api/models/{id}[/revision/{rev}], /api/models/{id}/tree/{rev}, HEAD/GET
/{id}/resolve/{rev}/{file}. Weights answer as on the real hub: a redirect to another host (the "CDN",
here localhost) carrying X-Linked-Etag / X-Linked-Size, then a GET there with Range support. No Xet
headers, so the plain HTTP path runs. The repo is the suite's tiny pipeline laid out like
fal/AuraFlow-v0.3: a sharded transformer with its index, fp16 variant copies, an original single file
at the root, a pickle and a flax file, a README.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from safetensors.numpy import load_file, save

from auraflow_edge.engine.errors import UserError
from auraflow_edge.engine.model.checkpoint import open_model
from auraflow_edge.engine.model.hub import select_files, snapshot

REPO = "fal/AuraFlow-tiny"
SHARDS = [f"transformer/diffusion_pytorch_model-{i:05d}-of-00002.safetensors" for i in (1, 2)]
# What the pipeline needs from REPO, and nothing else.
NEEDED = sorted(
    [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        *SHARDS,
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
)
FP16 = sorted(
    [
        "text_encoder/model.fp16.safetensors",
        "transformer/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
)


def _half(tensors: dict) -> dict:
    return {k: v.astype(np.float16) for k, v in tensors.items()}


def repo_files(tiny_dir: Path, proj_out_scale: float = 1.0) -> dict[str, bytes]:
    files = {p.relative_to(tiny_dir).as_posix(): p.read_bytes() for p in tiny_dir.rglob("*") if p.is_file()}
    tr = load_file(tiny_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    tr["proj_out.weight"] = tr["proj_out.weight"] * np.float32(proj_out_scale)
    del files["transformer/diffusion_pytorch_model.safetensors"]
    keys = sorted(tr)
    plain_map, half_map = {}, {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), 1):
        name, hname = (
            SHARDS[i - 1].split("/")[1],
            f"diffusion_pytorch_model.fp16-{i:05d}-of-00002.safetensors",
        )
        files[f"transformer/{name}"] = save({k: tr[k] for k in part})
        files[f"transformer/{hname}"] = save(_half({k: tr[k] for k in part}))
        plain_map |= {k: name for k in part}
        half_map |= {k: hname for k in part}
    for name, wm in (("index.json", plain_map), ("index.fp16.json", half_map)):
        size = sum(len(files[f"transformer/{f}"]) for f in set(wm.values()))
        index = {"metadata": {"total_size": size}, "weight_map": wm}
        files[f"transformer/diffusion_pytorch_model.safetensors.{name}"] = json.dumps(index).encode()
    for f in ("vae/diffusion_pytorch_model", "text_encoder/model"):
        files[f + ".fp16.safetensors"] = save(_half(load_file(tiny_dir / (f + ".safetensors"))))
    files["aura_flow_0.3.safetensors"] = save(
        {"model.positional_encoding": np.zeros((1, 256, 8), np.float32)}
    )
    files["vae/diffusion_pytorch_model.bin"] = b"\x80\x04 a pickle, never fetched"
    files["text_encoder/flax_model.msgpack"] = b"flax, never fetched"
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# tiny\n"
    files[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    return files


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.blobs: dict[str, tuple[str, bytes]] = {}  # sha256 -> (repo path, content)
        self.log: list[tuple[str, str, dict, int]] = []  # method, url path, headers, status
        self.drop: set[str] = set()  # repo paths whose next transfer stops half-way (connection dropped)
        self.fail: set[str] = set()  # repo paths whose next GET answers 500
        self.token: str | None = None  # required by private repos

    def add(self, repo_id: str, ref: str, files: dict[str, bytes], private: bool = False) -> str:
        r = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}, "private": private})
        sha = hashlib.sha1(f"{repo_id}{len(r['commits'])}".encode()).hexdigest()
        r["commits"][sha], r["refs"][ref] = files, sha
        for path, data in files.items():
            self.blobs[hashlib.sha256(data).hexdigest()] = (path, data)
        return sha

    def sha(self, repo_id: str, ref: str) -> str:
        return self.repos[repo_id]["refs"][ref]

    def gets(self, prefix: str = "") -> list[str]:
        """Repo paths of the file bodies requested (GET), in order."""
        return [p for m, p, _, _ in self.log if m == "GET" and p.startswith(prefix) and not p.startswith("/")]

    def reset(self) -> None:
        self.log.clear()
        self.drop.clear()
        self.fail.clear()
        self.token = None

    def start(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def reply(self, status, body=b"", headers=None, logged=None):
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                hub.log.append(
                    (
                        self.command,
                        logged or self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        status,
                    )
                )

            def error(self, status, code, extra=None):
                self.reply(
                    status, json.dumps({"error": code}).encode(), {"X-Error-Code": code, **(extra or {})}
                )

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
                if parts[0] == "cdn":
                    return self.cdn(parts[1])
                api = parts[0] == "api" and parts[1] == "models"
                repo_id = "/".join(parts[2:4] if api else parts[0:2])
                repo = hub.repos.get(repo_id)
                if repo is None or (
                    repo["private"] and self.headers.get("authorization") != f"Bearer {hub.token}"
                ):
                    return self.error(401, "RepoNotFound")
                rest = parts[4:] if api else parts[2:]
                if api and not rest:
                    rest = ["revision", "main"]
                rev = rest[1] if len(rest) > 1 else "main"
                sha = repo["refs"].get(rev, rev if rev in repo["commits"] else None)
                if sha is None:
                    return self.error(404, "RevisionNotFound")
                files = repo["commits"][sha]
                if api and rest[0] == "revision":
                    sib = [{"rfilename": f} for f in sorted(files)]
                    info = {"id": repo_id, "sha": sha, "private": repo["private"], "siblings": sib}
                    return self.reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
                if api and rest[0] == "tree":
                    tree = [
                        {"type": "file", "oid": _git_oid(d), "size": len(d), "path": f}
                        for f, d in files.items()
                    ]
                    return self.reply(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
                if rest[0] != "resolve":
                    return self.error(404, "NotFound")
                path = "/".join(rest[2:])
                if path not in files:
                    return self.error(404, "EntryNotFound", {"X-Repo-Commit": sha})
                data, head = files[path], {"X-Repo-Commit": sha, "ETag": f'"{_git_oid(files[path])}"'}
                if path.endswith(".safetensors"):  # LFS: redirect to the CDN, metadata on the redirect
                    digest = hashlib.sha256(data).hexdigest()
                    port = self.server.server_address[1]
                    head |= {
                        "Location": f"http://localhost:{port}/cdn/{digest}",
                        "X-Linked-Etag": f'"{digest}"',
                    }
                    return self.reply(302, b"", head | {"X-Linked-Size": str(len(data))})
                self.reply(200, data, head, logged=path)

            def cdn(self, digest):
                path, data = hub.blobs[digest]
                if self.command == "GET" and path in hub.fail:
                    hub.fail.discard(path)
                    return self.reply(500, b"server error", logged=path)
                start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0])
                head = {"Accept-Ranges": "bytes", "ETag": f'"{digest}"'}
                if start:
                    head["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                if self.command == "GET" and path in hub.drop:  # full length announced, half sent, then cut
                    hub.drop.discard(path)
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    hub.log.append((self.command, path, {k.lower(): v for k, v in self.headers.items()}, -1))
                    return
                self.reply(206 if start else 200, data[start:], head, logged=path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture(scope="module")
def fake_hub(tiny_dir):
    hub = FakeHub()
    hub.add(REPO, "v1", repo_files(tiny_dir, proj_out_scale=0.5))  # an older commit, tagged
    hub.add(REPO, "main", repo_files(tiny_dir))
    hub.add("fal/private-tiny", "main", repo_files(tiny_dir), private=True)
    hub.add(
        "fal/pickles", "main", {"model_index.json": b"{}", "vae/config.json": b"{}", "vae/x.bin": b"\x80"}
    )
    hub.start()
    yield hub
    hub.server.shutdown()


@pytest.fixture
def hub(fake_hub, tmp_path, monkeypatch):
    """The fake hub as HF_ENDPOINT, a fresh HF_HOME, online, no token.

    huggingface_hub reads these variables once, at import: the environment is set for the CLI's
    subprocesses, and the same values are patched into this process's huggingface_hub.
    """
    from huggingface_hub import constants, hf_api

    home = tmp_path / "hf"
    for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", fake_hub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_api.api, "endpoint", fake_hub.url)  # the HfApi behind huggingface_hub.model_info
    fake_hub.reset()
    return fake_hub


def _dead_endpoint() -> str:
    """An address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "auraflow_edge.engine.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_only_the_files_the_pipeline_needs(hub):
    snap = snapshot(REPO, progress=False)
    assert snap.revision == "main" and snap.commit == hub.sha(REPO, "main")
    assert files_in(snap.folder) == NEEDED
    assert (
        sorted(hub.gets()) == NEEDED
    )  # the root single file, fp16 copies, pickle, flax, README: never asked for
    # a variant only when asked; files it already has are not fetched again
    hub.log.clear()
    snap = snapshot(REPO, variant="fp16", progress=False)
    assert sorted(hub.gets()) == FP16
    assert files_in(snap.folder) == sorted(NEEDED + FP16)


def test_selection_rules():
    files = ["model_index.json", "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors"]
    with pytest.raises(UserError, match="vae/ has only fp16 variant copies"):
        select_files(files)
    assert "vae/diffusion_pytorch_model.fp16.safetensors" in select_files(files, "fp16")
    legacy = [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
    ]
    legacy += ["transformer/diffusion_pytorch_model-00001-of-00002.fp16.safetensors"]
    legacy += [
        "transformer/diffusion_pytorch_model.safetensors.fp16.index.json",
        "transformer/onnx/model.onnx",
    ]
    assert select_files(legacy) == ["model_index.json", "transformer/config.json", legacy[2]]
    assert select_files(legacy, "fp16") == [
        "model_index.json",
        "transformer/config.json",
        *sorted(legacy[3:5]),
    ]
    with pytest.raises(UserError, match="not a diffusers pipeline"):
        select_files(["aura_flow_0.3.safetensors"], repo_id="fal/single")


def test_hub_id_round_trip(hub, tiny_dir):
    from auraflow_edge.engine.runtime.pipeline import Pipeline

    kw = dict(prompt="a photo of a cat", steps=2, height=64, width=64, seed=3)
    ours = Pipeline.load(REPO, progress=False).generate(**kw)
    ref = Pipeline.load(tiny_dir).generate(**kw)
    np.testing.assert_array_equal(np.asarray(ours.image), np.asarray(ref.image))
    # online and cached: one call to resolve the revision, no file requests
    hub.log.clear()
    Pipeline.load(REPO, progress=False)
    assert [(m, p) for m, p, _, _ in hub.log] == [("GET", f"/api/models/{REPO}")]


def test_revision(hub, tiny_dir, monkeypatch):
    ref = open_model(tiny_dir).weights.read("proj_out.weight")
    v1 = snapshot(REPO, revision="v1", progress=False)
    assert v1.commit == hub.sha(REPO, "v1") != hub.sha(REPO, "main") and v1.revision == "v1"
    np.testing.assert_array_equal(open_model(REPO, revision="v1").weights.read("proj_out.weight"), ref * 0.5)
    np.testing.assert_array_equal(open_model(REPO).weights.read("proj_out.weight"), ref)
    assert snapshot(REPO, revision=v1.commit).folder == v1.folder
    with pytest.raises(UserError, match=f"{REPO}: no revision 'v9' on http"):
        snapshot(REPO, revision="v9")
    with pytest.raises(UserError, match="applies to hub ids"):
        open_model(tiny_dir, revision="v1")
    offline(monkeypatch)  # a branch or tag name is found in the cache offline too
    assert snapshot(REPO, revision="v1").folder == v1.folder


def test_offline_or_unreachable_and_cached(hub, tiny_dir, monkeypatch):
    from huggingface_hub import constants

    snapshot(REPO, progress=False)
    cfg = open_model(tiny_dir).transformer_cfg
    monkeypatch.setattr(constants, "ENDPOINT", _dead_endpoint())  # online, the hub down: the cache serves
    assert open_model(REPO).transformer_cfg == cfg
    offline(monkeypatch)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    hub.log.clear()
    assert open_model(REPO).transformer_cfg == cfg
    assert hub.log == []  # offline: no request at all


def test_offline_and_not_cached_is_one_line(hub, tmp_path):
    out = tmp_path / "o.png"
    r = run_cli(
        "generate", REPO, "--revision", "v1", "--prompt", "a cat", "-o", str(out), env={"HF_HUB_OFFLINE": "1"}
    )
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.count("\n") == 1, r.stderr
    assert f"error: {REPO} at revision 'v1': not in the local Hugging Face cache" in r.stderr
    assert f"`auraflow-edge download {REPO} --revision v1`" in r.stderr
    assert hub.log == []


def test_missing_private_and_unreachable(hub, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(UserError, match=f"fal/nope: not a local path, and no such model on {hub.url}") as e:
        snapshot("fal/nope")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="vae/ has no safetensors weights"):
        snapshot("fal/pickles")
    assert hub.gets() == []  # refused before downloading anything
    # private: not found without a token, fetched with HF_TOKEN (sent to the hub, not to the CDN)
    hub.token = "hf_test"
    with pytest.raises(UserError, match="private and HF_TOKEN is unset"):
        snapshot("fal/private-tiny")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    hub.log.clear()
    assert files_in(snapshot("fal/private-tiny", progress=False).folder) == NEEDED
    auth = {p: h.get("authorization") for _, p, h, _ in hub.log}
    assert auth["/api/models/fal/private-tiny"] == "Bearer hf_test"
    assert auth["model_index.json"] == "Bearer hf_test" and auth[SHARDS[0]] is None
    monkeypatch.setattr(constants, "ENDPOINT", _dead_endpoint())
    with pytest.raises(
        UserError, match=f"{REPO}: not in the local Hugging Face cache .* cannot be reached"
    ) as e:
        snapshot(REPO)
    assert "\n" not in str(e.value)


def test_cache_filled_by_diffusers_is_found(hub, tiny_dir, monkeypatch):
    from diffusers import AuraFlowPipeline
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError

    AuraFlowPipeline.from_pretrained(REPO)  # as a diffusers user would have filled the cache
    assert "aura_flow_0.3.safetensors" not in hub.gets()
    offline(monkeypatch)
    # why the previous lookup missed it: offline, the whole repo listing must be present
    with pytest.raises(IncompleteSnapshotError):
        snapshot_download(REPO, local_files_only=True)
    hub.log.clear()
    assert open_model(REPO).transformer_cfg == open_model(tiny_dir).transformer_cfg
    assert hub.log == []


def test_interrupted_download_resumes(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # so the half that arrived is on disk
    # the connection drops half-way through a shard: the same run picks up where it stopped
    hub.drop.add(SHARDS[0])
    snap = snapshot(REPO, progress=False)
    tries = [(h.get("range"), st) for m, p, h, st in hub.log if m == "GET" and p == SHARDS[0]]
    size = len(hub.repos[REPO]["commits"][snap.commit][SHARDS[0]])
    assert tries[0] == (None, -1) and tries[1][1] == 206
    assert 0 < int(tries[1][0].removeprefix("bytes=").rstrip("-")) <= size // 2
    assert files_in(snap.folder) == NEEDED
    assert (snap.folder / SHARDS[0]).read_bytes() == hub.repos[REPO]["commits"][snap.commit][SHARDS[0]]
    # a run that fails part-way keeps what it finished; the next run fetches only the rest
    hub.fail.add(SHARDS[1])
    hub.log.clear()
    with pytest.raises(
        UserError, match=f"{REPO} at revision 'v1': download interrupted .*run the same command again"
    ):
        snapshot(REPO, revision="v1", progress=False)
    first = [p for m, p, _, st in hub.log if m == "GET" and st == 200 and not p.startswith("/")]
    hub.log.clear()
    v1 = snapshot(REPO, revision="v1", progress=False)
    assert files_in(v1.folder) == NEEDED
    assert SHARDS[1] in hub.gets() and not set(hub.gets()) & set(first)


def test_cli_download_uses_the_environment(hub, tmp_path):
    # only the environment here (HF_ENDPOINT, HF_HOME): what a user's shell would set
    r = run_cli("--quiet", "download", REPO, "--revision", "v1")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    folder = Path(r.stdout.strip())
    assert folder == tmp_path / "hf" / "hub" / "models--fal--AuraFlow-tiny" / "snapshots" / hub.sha(
        REPO, "v1"
    )
    assert files_in(folder) == NEEDED
    # progress: huggingface_hub's bars (TQDM_POSITION=-1 forces them on without a terminal)
    r = run_cli("download", REPO, env={"TQDM_POSITION": "-1"})
    assert r.returncode == 0, r.stderr
    assert "Fetching" in r.stderr and f"commit {hub.sha(REPO, 'main')}" in r.stderr


def test_build_fetches_the_revision_asked_for(hub, tiny_dir, tmp_path):
    from auraflow_edge.export.build import build_engine

    with pytest.raises(UserError, match=f"{REPO}: no revision 'v9'"):
        build_engine(REPO, tmp_path / "e", precision="fp32", revision="v9", quiet=True)
    with pytest.raises(UserError, match="applies to hub ids"):
        build_engine(str(tiny_dir), tmp_path / "e", precision="fp32", revision="v1", quiet=True)
    assert not (tmp_path / "e").exists() and hub.gets() == []
