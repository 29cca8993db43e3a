"""`auraflow-edge serve` in one process: the OpenAI Images API through the real `openai` client,
the A1111 API over plain HTTP, /health, /metrics, the queue (stage-major batches, disconnects,
limits) and bad input. References are independent: `auraflow-edge generate` in a subprocess and
the Pipeline API called directly."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_util import ThreadServer

from auraflow_edge.engine.cli.main import build_parser, main
from auraflow_edge.engine.serve.app import create_app
from auraflow_edge.engine.serve.config import load_pipeline, serve_options
from auraflow_edge.engine.serve.launch import config_from_args

SIZE = dict(height=64, width=64)


class GatedPipe:
    """The real pipeline, with a gate the tests close to hold the worker and a log of batches."""

    def __init__(self, pipe):
        self._pipe, self.gate, self.calls = pipe, threading.Event(), []
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate_many(self, prompts, **kw):
        self.calls.append((list(prompts), list(kw["seeds"])))
        assert self.gate.wait(60), "gate never opened"
        return self._pipe.generate_many(prompts, **kw)


@pytest.fixture(scope="module")
def served(tiny_dir):
    args = build_parser().parse_args(
        ["serve", str(tiny_dir), "--device", "cpu", "--precision", "fp32", "--max-images", "4"]
        + ["--max-queue", "8", "--max-steps", "20", "--max-side", "256", "--max-body", "100000"]
        + ["--max-prompt", "2000", "--model-name", "tiny"]
    )
    config = config_from_args(args)
    pipe = GatedPipe(load_pipeline(config, progress=False))
    options = serve_options(config)
    options.disconnect_poll = 0.05
    app = create_app(pipe, options)
    srv = ThreadServer(app)
    yield srv.url, pipe, app.state.server
    srv.stop()


def decode(b64: str) -> tuple[np.ndarray, dict]:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    return np.asarray(im.convert("RGB")), json.loads(im.text["parameters"])


def reference(pipe, prompt, seeds, negative="", steps=2, guidance=3.5, **size):
    """The Pipeline API called directly, one image per seed."""
    out = []
    for s in seeds:
        r = pipe._pipe.generate(
            prompt, negative_prompt=negative, steps=steps, guidance=guidance, seed=s, **size
        )
        out.append((np.asarray(r.image), r.parameters))
    return out


def openai_client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_client_images_equal_the_cli(served, tiny_dir, tmp_path):
    url, pipe, _ = served
    extra = {"negative_prompt": "blurry", "steps": 3, "guidance": 4.0, "seed": 7}
    res = openai_client(url).images.generate(
        model="tiny", prompt="a photo of a cat", n=2, size="64x48", extra_body=extra
    )
    assert len(res.data) == 2 and res.created > 0
    out = tmp_path / "cli.png"  # the CLI's own code path, in this process (no second torch start-up)
    cli = [
        "--quiet",
        "generate",
        str(tiny_dir),
        "--prompt",
        "a photo of a cat",
        "--negative-prompt",
        "blurry",
    ]
    cli += ["--steps", "3", "--guidance", "4.0", "--seed", "7", "--num-images", "2", "--width", "64"]
    cli += ["--height", "48", "--device", "cpu", "--precision", "fp32", "-o", str(out)]
    assert main(cli) == 0
    for i, item in enumerate(res.data):
        png = base64.b64decode(item.b64_json)
        cli_png = (tmp_path / f"cli-{i + 1:04d}.png").read_bytes()
        with Image.open(io.BytesIO(cli_png)) as c:
            cli_pixels, cli_params = np.asarray(c.convert("RGB")), json.loads(c.text["parameters"])
        pixels, params = decode(item.b64_json)
        assert params == cli_params and params["seed"] == 7 + i
        np.testing.assert_array_equal(pixels, cli_pixels)
        assert png == cli_png  # the same PNG, parameters chunk included


def test_openai_url_format_and_models(served):
    url, pipe, _ = served
    client = openai_client(url)
    assert [m.id for m in client.models.list()] == ["tiny"]
    res = client.images.generate(
        prompt="a red sofa", size="64x64", response_format="url", extra_body={"steps": 2, "seed": 3}
    )
    png = httpx.get(res.data[0].url, timeout=10)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as im:
        ((want, params),) = reference(pipe, "a red sofa", [3], **SIZE)
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), want)
        assert json.loads(im.text["parameters"]) == params


def test_a1111_txt2img_reports_seeds(served):
    url, pipe, _ = served
    body = {"prompt": "a bowl of ramen", "negative_prompt": "dark", "steps": 2, "cfg_scale": 5.0, "seed": -1}
    body |= {"width": 64, "height": 64, "batch_size": 2, "n_iter": 1, "sampler_name": "Euler a"}
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    info = json.loads(out["info"])
    seed = info["seed"]
    assert info["all_seeds"] == [seed, seed + 1] and out["parameters"]["seed"] == seed
    assert info["ignored"] == ["sampler_name"]
    want = reference(pipe, "a bowl of ramen", [seed, seed + 1], "dark", 2, 5.0, **SIZE)
    for b64, (pixels, params) in zip(out["images"], want):
        got, got_params = decode(b64)
        np.testing.assert_array_equal(got, pixels)
        assert got_params == params
    models = httpx.get(f"{url}/sdapi/v1/sd-models").json()
    assert models[0]["model_name"] == "tiny"
    prog = httpx.get(f"{url}/sdapi/v1/progress").json()
    assert prog["progress"] == 0.0 and prog["state"]["job_count"] == 0


def test_health_and_metrics(served):
    url, _, _ = served
    h = httpx.get(f"{url}/health")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.headers["x-auraflow-replica"]
    httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 1})
    text = httpx.get(f"{url}/metrics").text
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)*\})? -?[0-9.e+]+$')
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line
    for name in ("auraflow_requests_total", "auraflow_images_total", "auraflow_queue_images"):
        assert f"\n{name}" in text
    assert re.search(r'auraflow_requests_total\{api="openai",status="200"\} [1-9]', text)
    assert re.search(r"auraflow_step_seconds_count [1-9]", text)


BAD = [
    # (path, body as bytes or JSON, status, words the message must contain)
    ("/v1/images/generations", b'{"prompt": "a cat", ', 400, "not valid JSON"),
    ("/v1/images/generations", b"\xff\xfe{}", 400, "not valid JSON"),
    ("/v1/images/generations", [1, 2], 400, "JSON object"),
    ("/v1/images/generations", {"prompt": "a cat", "size": "100x100"}, 400, "multiple of 16"),
    ("/v1/images/generations", {"prompt": "a cat", "size": "bananas"}, 400, "WIDTHxHEIGHT"),
    ("/v1/images/generations", {"prompt": "a cat", "size": "4096x4096"}, 400, "limit"),
    ("/v1/images/generations", {"prompt": "a cat", "n": 0}, 400, "n must be between 1 and 4"),
    ("/v1/images/generations", {"prompt": "a cat", "n": 10**6}, 400, "n must be between 1 and 4"),
    ("/v1/images/generations", {"prompt": "a cat", "n": "2"}, 400, "n must be an integer"),
    ("/v1/images/generations", {"prompt": "a cat", "steps": -1}, 400, "steps must be between"),
    ("/v1/images/generations", {"prompt": "a cat", "steps": 10**4}, 400, "steps must be between"),
    ("/v1/images/generations", {"prompt": "a cat", "guidance": -2}, 400, "guidance must be"),
    ("/v1/images/generations", b'{"prompt": "a cat", "guidance": NaN}', 400, "finite"),
    ("/v1/images/generations", {"prompt": "a cat" * 1000}, 400, "at most 2000"),
    ("/v1/images/generations", {"prompt": "x" * 10_000_000}, 413, "larger than"),
    ("/v1/images/generations", {"prompt": 123}, 400, "prompt must be a string"),
    ("/v1/images/generations", {"prompt": "   "}, 400, "empty"),
    ("/v1/images/generations", {"size": "64x64"}, 400, "prompt is required"),
    ("/v1/images/generations", {"prompt": "a cat", "model": "dall-e-3"}, 404, "does not exist"),
    ("/v1/images/generations", {"prompt": "a cat", "seed": "abc"}, 400, "seed must be an integer"),
    ("/v1/images/generations", {"prompt": "a cat", "seed": -5}, 400, "seed must be between"),
    ("/v1/images/generations", {"prompt": "a cat", "seed": 2**70}, 400, "seed must be between"),
    ("/v1/images/generations", {"prompt": "a cat", "response_format": "jpeg"}, 400, "response_format"),
    ("/v1/images/generations", {"prompt": "a cat", "temperature": 1}, 400, "unrecognized"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "width": "wide"}, 400, "width must be an integer"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "batch_size": 3, "n_iter": 3}, 400, "at most 4"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "cfg_scale": True}, 400, "cfg_scale must be a number"),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "width": 64, "height": 72}, 400, "multiple of 16"),
    ("/sdapi/v1/nonsense", {}, 404, "no such endpoint"),
]


def _message(r: httpx.Response) -> str:
    body = r.json()
    if r.request.url.path.startswith("/v1/"):
        assert set(body["error"]) == {"message", "type", "param", "code"}
        return body["error"]["message"]
    return body.get("detail") or ""


@pytest.mark.parametrize("path,body,status,words", BAD, ids=[f"{i:02d}" for i in range(len(BAD))])
def test_bad_request_is_a_clear_4xx(served, caplog, path, body, status, words):
    url, _, _ = served
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{url}{path}", content=data, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    msg = _message(r)
    assert words in msg and "Traceback" not in r.text
    assert not [rec for rec in caplog.records if rec.levelname in ("ERROR", "CRITICAL")]


def test_more_bad_requests_then_normal_service(served):
    url, pipe, _ = served
    # a body without Content-Length (chunked) past the limit, and a wrong method
    chunks = (b"x" * 50_000 for _ in range(4))
    r = httpx.post(f"{url}/v1/images/generations", content=chunks, timeout=30)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/images/generations").status_code == 405
    # and the server still answers normally
    res = openai_client(url).images.generate(prompt="a cat", size="64x64", extra_body={"steps": 2, "seed": 1})
    pixels, _ = decode(res.data[0].b64_json)
    np.testing.assert_array_equal(pixels, reference(pipe, "a cat", [1], **SIZE)[0][0])


def test_eight_concurrent_requests(served):
    url, pipe, _ = served
    results = [None] * 8

    def call(i):
        body = {"prompt": f"a cat number {i}", "size": "64x64", "steps": 2, "seed": 100 + i}
        results[i] = httpx.post(f"{url}/v1/images/generations", json=body, timeout=120)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(results):
        assert r.status_code == 200, r.text
        pixels, params = decode(r.json()["data"][0]["b64_json"])
        ((want, want_params),) = reference(pipe, f"a cat number {i}", [100 + i], **SIZE)
        np.testing.assert_array_equal(pixels, want)
        assert params == want_params


def _post_async(url, body, out, key, timeout=120):
    def run():
        try:
            out[key] = httpx.post(url, json=body, timeout=timeout)
        except httpx.HTTPError as e:
            out[key] = e

    t = threading.Thread(target=run)
    t.start()
    return t


def _wait(cond, timeout=30):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


def test_compatible_requests_run_stage_major_as_one_batch(served):
    url, pipe, server = served
    out, gen = {}, f"{url}/v1/images/generations"
    pipe.gate.clear()
    pipe.calls.clear()
    try:
        threads = [_post_async(gen, {"prompt": "first", "size": "64x64", "steps": 2, "seed": 1}, out, "a")]
        _wait(lambda: len(pipe.calls) == 1)  # the worker holds "first"; the rest queue up
        threads.append(
            _post_async(gen, {"prompt": "b", "size": "64x64", "steps": 2, "seed": 5, "n": 2}, out, "b")
        )
        _wait(lambda: server.batcher.progress().queued_images == 2)
        threads.append(_post_async(gen, {"prompt": "c", "size": "64x48", "steps": 2, "seed": 9}, out, "c"))
        _wait(lambda: server.batcher.progress().queued_images == 3)
        threads.append(_post_async(gen, {"prompt": "d", "size": "64x64", "steps": 2, "seed": 7}, out, "d"))
        _wait(lambda: server.batcher.progress().queued_images == 4)
        prog = httpx.get(f"{url}/sdapi/v1/progress").json()
        assert prog["state"]["job_count"] == 1 and prog["state"]["queued_images"] == 4
    finally:
        pipe.gate.set()
    for t in threads:
        t.join()
    # b and d share size and settings: one call, b's two seeds then d's; c (another size) alone
    assert pipe.calls == [(["first"], [1]), (["b", "b", "d"], [5, 6, 7]), (["c"], [9])]
    for key, prompt, seeds, size in (
        ("b", "b", [5, 6], SIZE),
        ("d", "d", [7], SIZE),
        ("c", "c", [9], dict(height=48, width=64)),
    ):
        assert out[key].status_code == 200
        for item, (want, params) in zip(out[key].json()["data"], reference(pipe, prompt, seeds, **size)):
            got, got_params = decode(item["b64_json"])
            np.testing.assert_array_equal(got, want)
            assert got_params == params


def test_disconnected_client_gives_its_place_up_and_full_queue_is_503(served):
    url, pipe, server = served
    out, gen = {}, f"{url}/v1/images/generations"
    cancelled = server.metrics.cancelled.value()
    pipe.gate.clear()
    pipe.calls.clear()
    try:
        threads = [_post_async(gen, {"prompt": "held", "size": "64x64", "steps": 1, "seed": 1}, out, "held")]
        _wait(lambda: len(pipe.calls) == 1)
        # a client that gives up after 0.5 s while queued
        threads.append(
            _post_async(gen, {"prompt": "gone", "size": "64x64", "steps": 1, "n": 2}, out, "gone", 0.5)
        )
        _wait(lambda: isinstance(out.get("gone"), httpx.TimeoutException))
        _wait(lambda: server.metrics.cancelled.value() == cancelled + 1)
        assert server.batcher.progress().queued_images == 0
        # fill the queue (limit 8 images), then one more is refused with 503
        threads.append(_post_async(gen, {"prompt": "q", "size": "64x64", "steps": 1, "n": 4}, out, "q1"))
        threads.append(_post_async(gen, {"prompt": "q", "size": "64x48", "steps": 1, "n": 4}, out, "q2"))
        _wait(lambda: server.batcher.progress().queued_images == 8)
        r = httpx.post(gen, json={"prompt": "one too many", "size": "64x64", "steps": 1}, timeout=10)
        assert r.status_code == 503 and "busy" in r.json()["error"]["message"] and r.headers["retry-after"]
    finally:
        pipe.gate.set()
    for t in threads:
        t.join()
    assert all(out[k].status_code == 200 for k in ("held", "q1", "q2"))
    assert "gone" not in [p for call in pipe.calls for p in call[0]]


def test_running_batch_stops_when_its_client_leaves(served):
    url, pipe, server = served
    out, abandoned = {}, server.metrics.abandoned.value()
    pipe.gate.clear()
    pipe.calls.clear()
    try:
        body = {"prompt": "nobody waits", "size": "64x64", "steps": 20, "seed": 1}
        t = _post_async(f"{url}/v1/images/generations", body, out, "left", 0.5)
        _wait(lambda: len(pipe.calls) == 1)  # taken by the worker, held at the gate
        t.join()
        assert isinstance(out["left"], httpx.TimeoutException)
        time.sleep(0.3)  # the server notices the disconnect
    finally:
        pipe.gate.set()
    _wait(lambda: server.metrics.abandoned.value() == abandoned + 1)  # stopped at its first step
    assert server.batcher.progress().running is False


def test_memory_steady_over_50_requests(served):
    from auraflow_edge.engine.runtime.stages import current_rss

    url, _, _ = served
    with httpx.Client(timeout=60) as c:

        def one(i):
            body = {"prompt": f"memory {i}", "size": "64x64", "steps": 1, "seed": i}
            fmt = "url" if i % 2 else "b64_json"
            r = c.post(f"{url}/v1/images/generations", json=body | {"response_format": fmt})
            assert r.status_code == 200

        for i in range(10):  # warm-up: allocator pools, image store
            one(i)
        before = current_rss()
        for i in range(10, 60):
            one(i)
        after = current_rss()
    assert after - before < 40 * 2**20, f"RSS grew {(after - before) / 2**20:.1f} MiB over 50 requests"
