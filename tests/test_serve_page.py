"""The page at / in a real headless Chromium (Debian's package, driven by Playwright), served by
`auraflow-edge serve` started as a user would: type a prompt, press Generate, get the image."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from serve_util import free_port, wait_healthy

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "auraflow-edge")  # this venv's console script
    cmd = [exe, "--quiet", "serve", str(tiny_dir)]
    cmd += ["--port", str(port), "--device", "cpu", "--precision", "fp32", "--max-images", "2"]
    cwd = tmp_path_factory.mktemp("page")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 180, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # uvicorn shuts down cleanly on SIGTERM
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        assert "Traceback" not in out, out


def test_page_generates_an_image_in_chromium(server, tiny_dir):
    if not os.path.exists(CHROMIUM):
        # a system browser is not a pip dependency; CI installs it (.ci/run), so there this runs
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` to run the page test")
    from playwright.sync_api import sync_playwright

    from auraflow_edge.engine.runtime.pipeline import Pipeline

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            seen = []
            page.on("request", lambda r: seen.append(r.url))
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server)
            assert page.input_value("#width") == "256"  # the model's own size, from the server
            page.fill("#prompt", "a watercolor painting of mountains")
            page.fill("#negative", "blurry")
            page.fill("#width", "64")
            page.fill("#height", "48")
            page.fill("#steps", "3")
            page.fill("#guidance", "4")
            page.fill("#seed", "11")
            page.click("#generate")
            page.wait_for_selector("#gallery figure img", timeout=60_000)
            caption = page.inner_text("#gallery figcaption")
            href = page.get_attribute("#gallery figure a", "href")
            download = page.get_attribute("#gallery figure a", "download")
            size = page.evaluate(
                "() => { const i = document.querySelector('#gallery img'); return [i.naturalWidth, i.naturalHeight]; }"
            )
            # a bad value shows the server's message on the page
            page.fill("#width", "1024")  # the form accepts it; the server refuses it
            page.click("#generate")
            page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
            error = page.inner_text("#error")
        finally:
            browser.close()
    assert not errors, errors
    assert size == [64, 48]
    assert "seed 11" in caption and "mountains" in caption and "blurry" in caption
    assert download == "auraflow-11.png"
    assert any("/sdapi/v1/progress" in u for u in seen)  # the progress bar polled
    assert "exceeds the positional grid" in error
    # the downloaded PNG is the Pipeline's image for the same parameters, with them inside
    with Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))) as im:
        got, params = np.asarray(im.convert("RGB")), json.loads(im.text["parameters"])
    pipe = Pipeline.load(tiny_dir, device="cpu", precision="fp32", progress=False)
    want = pipe.generate(
        "a watercolor painting of mountains",
        negative_prompt="blurry",
        steps=3,
        guidance=4.0,
        seed=11,
        height=48,
        width=64,
    )
    np.testing.assert_array_equal(got, np.asarray(want.image))
    assert params == want.parameters
