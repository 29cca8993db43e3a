"""`auraflow-edge serve --ray --replicas 2` on a local Ray cluster (127.0.0.1 only), CPU replicas:
requests spread over both, images equal to the Pipeline run directly, and a replica process killed
during load is replaced while the other requests succeed."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_util import free_port, wait_healthy

pytestmark = pytest.mark.slow
SIZE = dict(height=64, width=64)


@pytest.fixture(scope="module")
def ray_server(tiny_dir, tmp_path_factory):
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "auraflow-edge")
    cmd = [exe, "--quiet", "serve", str(tiny_dir), "--ray", "--replicas", "2", "--port", str(port)]
    cmd += ["--device", "cpu", "--precision", "fp32"]
    # Not the repo root as the working folder: Ray puts it on the workers' sys.path.
    cwd = tmp_path_factory.mktemp("ray")
    log = open(cwd / "server.log", "w+")  # noqa: SIM115 - read back at the end
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 240, proc)  # one replica is up: under load the second may take longer
        seen, end = set(), time.monotonic() + 240
        while len(seen) < 2 and time.monotonic() < end and proc.poll() is None:
            seen.add(httpx.get(f"{url}/health", timeout=30).headers.get("x-auraflow-replica"))
            time.sleep(0.2)
        assert len(seen) == 2, f"only {seen} of 2 replicas answered within 240 s"
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # run_on_ray shuts Serve and the local cluster down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        text = log.read()
        log.close()
        assert proc.returncode == 0, text[-3000:]


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    from auraflow_edge.engine.runtime.pipeline import Pipeline

    return Pipeline.load(tiny_dir, device="cpu", precision="fp32", progress=False, keep_resident=True)


@pytest.fixture
def one_thread():
    """A replica has one CPU (Ray runs its torch on one thread); torch's CPU sums differ in the last
    bit between thread counts, so the reference runs on one thread too."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def generate(url, prompt, seed, steps=2):
    body = {"prompt": prompt, "size": "64x64", "steps": steps, "seed": seed}
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)


def check_image(r, pipe, prompt, seed, steps=2):
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))) as im:
        got = np.asarray(im.convert("RGB"))
    want = pipe.generate(prompt, steps=steps, seed=seed, **SIZE).image
    np.testing.assert_array_equal(got, np.asarray(want))


def concurrently(fn, args):
    out = [None] * len(args)

    def run(i):
        try:
            out[i] = fn(*args[i])
        except httpx.HTTPError as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    return threads, out


def replica_pid(header: str) -> int:
    return int(header.rsplit(":", 1)[1])  # "<replica id>@<host>:<pid>"


def test_requests_spread_over_two_replicas_with_equal_images(ray_server, pipe, one_thread):
    jobs = [(ray_server, f"a cat number {i}", 10 + i, 6) for i in range(8)]  # long enough to overlap
    threads, out = concurrently(generate, jobs)
    for t in threads:
        t.join()
    replicas = {r.headers["x-auraflow-replica"] for r in out}
    assert len(replicas) == 2, replicas
    for r, (_, prompt, seed, steps) in zip(out, jobs):
        check_image(r, pipe, prompt, seed, steps)


def test_killed_replica_is_replaced_and_the_other_requests_succeed(ray_server, pipe, one_thread):
    seen = {httpx.get(f"{ray_server}/health").headers["x-auraflow-replica"] for _ in range(12)}
    assert len(seen) == 2, seen
    victim = sorted(seen)[0]
    jobs = [(ray_server, f"a dog number {i}", 50 + i, 4) for i in range(8)]
    threads, out = concurrently(generate, jobs)
    time.sleep(0.5)  # load is on both replicas
    os.kill(replica_pid(victim), signal.SIGKILL)
    for t in threads:
        t.join()
    ok = [(r, j) for r, j in zip(out, jobs) if isinstance(r, httpx.Response) and r.status_code == 200]
    for r, j in ok:  # every answer that came back is right; those of the victim may fail
        check_image(r, pipe, j[1], j[2], 4)
    survivors = [r for r, _ in ok if r.headers["x-auraflow-replica"] != victim]
    assert survivors, "no request succeeded on the surviving replica"
    failed = [r for r in out if not (isinstance(r, httpx.Response) and r.status_code == 200)]
    assert all(isinstance(r, httpx.Response) and r.status_code >= 500 for r in failed), failed
    # Serve starts a replacement; then the next requests all succeed, on two live replicas
    end, fresh = time.monotonic() + 120, set()
    while time.monotonic() < end and not fresh:
        h = httpx.get(f"{ray_server}/health", timeout=10)
        if h.status_code == 200 and h.headers["x-auraflow-replica"] not in seen:
            fresh.add(h.headers["x-auraflow-replica"])
        time.sleep(0.2)
    assert fresh, "the killed replica was not replaced within 120 s"
    threads, out = concurrently(generate, [(ray_server, f"after {i}", 90 + i) for i in range(6)])
    for t in threads:
        t.join()
    for i, r in enumerate(out):
        check_image(r, pipe, f"after {i}", 90 + i)
    assert victim not in {r.headers["x-auraflow-replica"] for r in out}


def test_application_builder_for_serve_run(tiny_dir, tmp_path, monkeypatch):
    """`serve run auraflow_edge.engine.serve.ray_app:build_app key=value ...`: the arguments Ray
    hands the builder (strings) become the deployment's options and the replicas' config."""
    pytest.importorskip("ray.serve", reason="the ray extra is not installed")
    from auraflow_edge.engine.errors import UserError
    from auraflow_edge.engine.serve.ray_app import build_app

    monkeypatch.chdir(tiny_dir.parent)
    app = build_app(
        {"model": tiny_dir.name, "replicas": "3", "device": "cpu", "max_steps": "20", "batching": "off"}
    )
    d = app._bound_deployment
    config = d.init_args[0]
    assert d.num_replicas == 3 and d.ray_actor_options["num_gpus"] == 0
    assert config["model"] == str(tiny_dir.resolve())  # relative paths made absolute for the replicas
    assert config["limits"]["max_steps"] == 20 and config["limits"]["max_images"] == 8
    assert config["batching"] is False and config["keep_resident"] is True
    with pytest.raises(UserError, match="unknown argument"):
        build_app({"model": str(tiny_dir), "replica": "2"})
    with pytest.raises(UserError, match="model="):
        build_app({"replicas": "2"})
