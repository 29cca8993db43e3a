"""The CLI: demo, generate, and bad input as one line on stderr with a non-zero exit and no output file."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import png_parameters as read_parameters
from PIL import Image

from auraflow_edge.engine.cli.main import main


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "auraflow_edge.engine.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_draws_the_world_with_the_trained_model(tmp_path):
    r = run_cli("demo", "--dir", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # --quiet
    assert f"model: {tmp_path / 'tiny-world'}" in r.stdout
    img = tmp_path / "demo.png"
    assert f"demo image: {img}" in r.stdout
    assert r.stdout.count("grader read: ") == 4
    assert Image.open(img).size == (4 * 128, 128 + 14)
    r = run_cli("demo", "--dir", str(tmp_path), "--prompt", "a photo of a cat", "--steps", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "(not a prompt of the world)" in r.stdout and Image.open(img).size == (128, 142)


def test_generate_with_noise_file(tiny_dir, tiny_noise, reference_image, tmp_path, capsys):
    n = tmp_path / "noise.npy"
    np.save(n, tiny_noise)
    out = tmp_path / "o.png"
    rc = main(
        [
            "generate",
            str(tiny_dir),
            "--prompt",
            "a photo of a cat",
            "--negative-prompt",
            "blurry",
            "--steps",
            "4",
            "--height",
            "64",
            "--width",
            "96",
            "--noise",
            str(n),
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    img = np.asarray(Image.open(out))
    assert np.abs(img.astype(int) - reference_image[0].astype(int)).max() <= 1
    assert read_parameters(out)["guidance"] == 3.5
    err = capsys.readouterr().err
    assert "sampling" in err and "wrote" in err  # progress shown without --quiet


def _bad_folder(tiny_dir, tmp_path, what):
    d = tmp_path / what
    shutil.copytree(tiny_dir, d)
    if what == "missing":
        (d / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    elif what == "truncated":
        f = d / "vae" / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif what == "unknown":
        (d / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    elif what == "no_tokenizer":
        shutil.rmtree(d / "tokenizer")
    return d


BAD = [
    (["--height", "72"], "multiple of 16"),
    (["--width", "304"], "positional grid"),  # tiny grid is 16x16 patches = 256 px
    (["--steps", "0"], "steps"),
    (["--guidance", "nan"], "guidance"),
    (["--noise", "/nonexistent.npy"], "noise file not found"),
    (["-o", "/nonexistent-dir/x.png"], "does not exist"),
    (["-o", "x.jpg"], ".png"),
]


@pytest.mark.parametrize("extra,msg", BAD)
def test_bad_arguments(tiny_dir, tmp_path, extra, msg, capsys):
    args = ["generate", str(tiny_dir), "--prompt", "x", "--steps", "1", "--height", "64", "--width", "64"]
    args += ["-o", str(tmp_path / "o.png")] if "-o" not in extra else []
    rc = main(args + extra)
    err = capsys.readouterr().err
    assert rc != 0
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize(
    "what,msg",
    [
        ("missing", "no safetensors"),
        ("truncated", "truncated"),
        ("unknown", "unknown model type"),
        ("no_tokenizer", "tokenizer"),
    ],
)
def test_bad_model_folders(tiny_dir, tmp_path, what, msg, capsys):
    d = _bad_folder(tiny_dir, tmp_path, what)
    out = tmp_path / "o.png"
    rc = main(
        [
            "generate",
            str(d),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--height",
            "64",
            "--width",
            "64",
            "-o",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc != 0 and msg in err and err.count("\n") == 1, err
    assert not out.exists()


def test_wrong_noise_shape(tiny_dir, tmp_path, capsys):
    n = tmp_path / "n.npy"
    np.save(n, np.zeros((1, 4, 8, 8), np.float32))
    rc = main(
        [
            "generate",
            str(tiny_dir),
            "--prompt",
            "x",
            "--height",
            "64",
            "--width",
            "96",
            "--noise",
            str(n),
            "-o",
            str(tmp_path / "o.png"),
        ]
    )
    assert rc != 0 and "expected (1, 4, 8, 12)" in capsys.readouterr().err


def test_debug_shows_traceback(tiny_dir, tmp_path):
    r = run_cli(
        "--debug", "generate", str(tiny_dir), "--prompt", "x", "--height", "72", "-o", str(tmp_path / "o.png")
    )
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_every_option_explains_itself(capsys):
    """Each option of each subcommand has help text; defaults are shown; --version works."""
    import argparse

    from auraflow_edge.engine.cli.main import build_parser

    ap = build_parser()
    missing = []

    def walk(p, path):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, path + [name])
            elif not a.help:
                missing.append((" ".join(path), a.option_strings or a.dest))

    walk(ap, [])
    assert not missing, missing
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 50)" in out and "(default: auto)" in out and "(default: 0)" in out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("auraflow-edge ")
