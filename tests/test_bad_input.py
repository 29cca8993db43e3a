"""Bad input, part two (part one: test_cli.py, test_export.py, test_hub.py): each case is one clear
line on stderr, a non-zero exit, and nothing half-written."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from auraflow_edge.engine.cli.main import main

GEN = ["--steps", "1", "--height", "64", "--width", "64"]


def _one_line_error(capsys, rc, msg):
    err = capsys.readouterr().err
    assert rc != 0, err
    assert msg in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _generate(model, out, *extra):
    return main(["generate", str(model), "--prompt", "a cat", *GEN, "-o", str(out), *extra])


def _with_header(tiny_dir, tmp_path, edit):
    """A copy of the tiny model whose VAE safetensors header went through ``edit``: it returns the
    new header (JSON-encoded here) or raw bytes for the length field."""
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    f = d / "vae" / "diffusion_pytorch_model.safetensors"
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    new = edit(header)
    if isinstance(new, bytes):  # a new length field, same header
        f.write_bytes(new + raw[8:])
    else:
        new = json.dumps(new).encode()
        f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
    return d


def _first_tensor(h):
    return next(k for k in h if k != "__metadata__")


FUZZ = [
    ("length field past the end", lambda h: struct.pack("<Q", 1 << 40), "not a safetensors file"),
    (
        "unknown dtype",
        lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "dtype": "F7"}},
        "unsupported dtype 'F7'",
    ),
    (
        "offsets past the end",
        lambda h: {
            **h,
            _first_tensor(h): {**h[_first_tensor(h)], "data_offsets": [10**9, 10**9 + 4 * _n(h)]},
        },
        "truncated",
    ),
    (
        "offsets that do not hold the shape",
        lambda h: {**h, _first_tensor(h): {**h[_first_tensor(h)], "shape": [7, 7, 7, 7]}},
        "malformed header entry",
    ),
    ("header not an object", lambda h: [1, 2], "not a JSON object"),
]


def _n(h):
    n = 1
    for d in h[_first_tensor(h)]["shape"]:
        n *= d
    return n


@pytest.mark.parametrize("name,edit,msg", FUZZ, ids=[f[0] for f in FUZZ])
def test_fuzzed_safetensors_headers(tiny_dir, tmp_path, capsys, name, edit, msg):
    d = _with_header(tiny_dir, tmp_path, edit)
    out = tmp_path / "o.png"
    _one_line_error(capsys, _generate(d, out), msg)
    assert not out.exists()


def test_tampered_manifest(engines, tmp_path, capsys):
    e = tmp_path / "e"
    shutil.copytree(engines["int8"], e)
    m = json.loads((e / "manifest.json").read_text())
    m["files"]["transformer.onnx.data"]["size"] += 1  # edited by hand
    (e / "manifest.json").write_text(json.dumps(m))
    _one_line_error(capsys, _generate(e, tmp_path / "o.png"), "damaged")
    (e / "manifest.json").write_text("{ not json")
    _one_line_error(capsys, _generate(e, tmp_path / "o.png"), "manifest")
    assert not list(tmp_path.glob("*.png"))


def test_onnx_swapped_between_engines(engines, tmp_path, capsys):
    e = tmp_path / "e"
    shutil.copytree(engines["int8"], e)
    shutil.copy(engines["fp16"] / "transformer.onnx", e / "transformer.onnx")
    _one_line_error(capsys, main(["inspect", str(e), "--verify"]), "transformer.onnx")
    _one_line_error(capsys, _generate(e, tmp_path / "o.png"), "transformer.onnx")


def _build_cmd(tiny_dir, out):
    return [sys.executable, "-m", "auraflow_edge.engine.cli.main", "build", str(tiny_dir), "-o", str(out)]


def test_second_build_refused_then_first_killed_and_rebuilt(tiny_dir, tmp_path, capsys):
    """Two builds into one folder: the second refuses (lock). The first killed with SIGKILL: no
    engine under the real name; the next build removes its leftovers and completes."""
    out = tmp_path / "eng"
    p = subprocess.Popen(_build_cmd(tiny_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.time()
        while not list(tmp_path.glob(".eng.build-*/transformer.onnx*")) and time.time() - t0 < 240:
            assert p.poll() is None, p.stderr.read()
            time.sleep(0.05)
        _one_line_error(capsys, main(["build", str(tiny_dir), "-o", str(out)]), "another build is writing")
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert not out.exists()  # never a half-written engine under the real name
    assert list(tmp_path.glob(".eng.build-*"))  # the killed build's leftovers ...
    assert main(["build", str(tiny_dir), "-o", str(out), "--quiet"]) == 0
    assert not list(tmp_path.glob(".eng.*"))  # ... removed by the next build, and its lock gone
    assert main(["inspect", str(out), "--verify"]) == 0


@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()[:80]})")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_full_disk_during_build(tiny_dir, small_disk, capsys):
    out = small_disk / "eng"
    _one_line_error(capsys, main(["build", str(tiny_dir), "-o", str(out), "--quiet"]), "disk full")
    assert not out.exists() and os.listdir(small_disk) == []  # temp folder and lock removed


def test_prompt_longer_than_the_window_is_truncated_with_a_warning(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o.png"
    long = " ".join(["a red cat on a sofa"] * 80)  # far more than 256 tokens
    assert main(["generate", str(tiny_dir), "--prompt", long, *GEN, "-o", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert (
        err.startswith("warning: prompt truncated to the text encoder's 256 tokens") and err.count("\n") == 1
    )
    assert out.exists()


def test_empty_prompt(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o.png"
    rc = main(["generate", str(tiny_dir), "--prompt", "  ", *GEN, "-o", str(out)])
    _one_line_error(capsys, rc, "empty prompt")
    assert not out.exists()


@pytest.mark.parametrize(
    "content,msg",
    [(b"a cat\n\xff\xfe bad bytes\n", "not UTF-8"), (b"\n  \n", "no prompts"), (None, "not found")],
    ids=["non-utf8", "blank", "missing"],
)
def test_bad_prompts_file(tiny_dir, tmp_path, capsys, content, msg):
    f = tmp_path / "prompts.txt"
    if content is not None:
        f.write_bytes(content)
    rc = main(["generate", str(tiny_dir), "--prompts", str(f), *GEN, "-o", str(tmp_path / "o.png")])
    _one_line_error(capsys, rc, msg)
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "extra,msg",
    [(["--num-images", "0"], "--num-images"), (["--num-images", "2", "--noise", "n.npy"], "--noise")],
    ids=["zero-images", "noise-for-two"],
)
def test_bad_image_counts(tiny_dir, tmp_path, capsys, extra, msg):
    extra = [str(tmp_path / x) if x.endswith(".npy") else x for x in extra]
    _one_line_error(capsys, _generate(tiny_dir, tmp_path / "o.png", *extra), msg)
    assert not list(tmp_path.glob("*.png"))
