"""The repository root on sys.path must not break dependencies (its kernels/ folder vs HF's `kernels`).

`python -m pytest`, `python -c` and Ray workers started from the root put the root first on
sys.path; transformers imports Hugging Face's `kernels` package, which the root's kernels/ folder
would shadow. These run real processes from the root, as a user would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_in_root(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_pipeline_and_text_encoder_load_from_the_root(tiny_dir):
    pytest.importorskip("kernels", reason="Hugging Face's kernels package is not installed")
    code = f"""
import sys, pathlib
assert sys.path[0] in ("", {str(ROOT)!r}), sys.path[:2]
import kernels
assert pathlib.Path(kernels.__file__).resolve().parent != pathlib.Path({str(ROOT / "kernels")!r}), kernels.__file__
from kernels import CUDAProperties  # what transformers' hub_kernels imports
from diffusers import AuraFlowPipeline
from transformers import UMT5EncoderModel
pipe = AuraFlowPipeline.from_pretrained({str(tiny_dir)!r})
enc = UMT5EncoderModel.from_pretrained({str(tiny_dir / "text_encoder")!r})
import auraflow_edge.kernels.attention  # our own package still imports by its full name
print("loaded", type(pipe).__name__, type(enc).__name__)
"""
    r = _run_in_root(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded AuraFlowPipeline UMT5EncoderModel" in r.stdout


def test_missing_hf_kernels_is_one_clear_line():
    # no site-packages (-S): the root's folder is all `import kernels` can find
    r = _run_in_root("import sys; sys.path.insert(0, ''); import kernels", "-S")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: 'import kernels' found AuraFlow Edge's folder"), r.stderr
    assert "pip install kernels" in last
