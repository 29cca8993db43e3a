#!/usr/bin/env bash
# The GPU check, in one call on a CUDA machine with no package index (README, "GPU check"):
#   bash bench/gpu_wheels.sh          # first, on a machine with the index: wheels -> bench/wheels/
#   bash bench/gpu_check.sh OUT_DIR   # then on the GPU machine, with bench/wheels copied along
# 1. installs the carried wheels the image lacks and this project, offline; stops on failure
# 2. preflight: imports everything the check uses, prints "preflight: ok", then needs a CUDA device
# 3. the kernel tests compiled for the GPU, 4. the TensorRT plugin kernel's launch contract without
# TensorRT (bench/plugin_launch.py), 5. kernel timings vs SDPA and bf16 matmul, 6. the full-size
# 1024x1024 run (2 steps) under an 8 GiB cap vs diffusers bf16.
# Steps 3-6 each run under a timeout and write as they go; a failed step does not stop the next.
# Written to OUT_DIR: gpu_check.log, kernel_tests.xml, plugin_launch.json, gpu_kernels.json,
# gpu_fullsize.json. Expected on an H100/H200: about 4-6 minutes (not measured yet); the timeouts
# bound steps 3-6 at 9.8 minutes.
set -euo pipefail
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels only: the CPU interpreter is the test suite's business
[ $# -eq 1 ] || { echo "usage: bash bench/gpu_check.sh OUT_DIR" >&2; exit 2; }
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.."
WHEELS=bench/wheels

machine() {
  echo "== machine"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader \
      || echo "nvidia-smi failed"
  else
    echo "nvidia-smi: not found"
  fi
  echo "python3: $(command -v python3) ($(python3 --version 2>&1))"
}

install_offline() {
  echo "== install (offline)"
  # Carried wheels, skipping any package the image already has: a second version breaks it.
  local todo
  todo="$(python3 - "$WHEELS" <<'PY'
import importlib.metadata as md
import re
import sys
from pathlib import Path

folder = Path(sys.argv[1])
wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
if not wheels:
    print(f"no wheels in {folder}: nothing carried (bash bench/gpu_wheels.sh makes them)", file=sys.stderr)
for w in wheels:
    name = w.name.split("-")[0]
    try:
        have = md.version(re.sub(r"[-_.]+", "-", name))
    except md.PackageNotFoundError:
        print(w)
        continue
    print(f"{w.name}: {name} {have} is installed already, not replacing it", file=sys.stderr)
PY
)"
  if [ -n "$todo" ]; then
    # shellcheck disable=SC2086  # one wheel path per line, no spaces in wheel names
    python3 -m pip install -q --no-index --no-deps $todo
    echo "installed: $(echo $todo | xargs -n1 basename | tr '\n' ' ')"
  fi
  # The project, unless this very tree is installed already (a developer's venv): editable,
  # without build isolation, which would fetch setuptools from an index.
  if python3 -c "import sys, pathlib, auraflow_edge.engine as e; sys.exit(pathlib.Path(e.__file__).resolve().parent != pathlib.Path('engine').resolve())" 2>/dev/null; then
    echo "auraflow-edge: installed from this tree already"
  else
    python3 -m pip install -q --no-index --no-build-isolation --no-deps -e .
    echo "auraflow-edge: installed (editable) from $(pwd)"
  fi
}

preflight() {
  echo "== preflight"
  python3 - <<'PY'
import importlib
import pkgutil
import sys

import diffusers
import pytest  # noqa: F401
import torch
import transformers
import triton
import triton.testing  # noqa: F401
from diffusers import AuraFlowTransformer2DModel, AutoencoderKL  # noqa: F401
from transformers import UMT5EncoderModel  # noqa: F401

import auraflow_edge.engine
import auraflow_edge.kernels

for pkg in (auraflow_edge.engine, auraflow_edge.kernels):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(m.name)
import auraflow_edge.bench.gpu_fullsize  # noqa: F401  (the bench scripts, and all they import)
import auraflow_edge.bench.gpu_kernels  # noqa: F401
import auraflow_edge.bench.plugin_launch  # noqa: F401

print(
    f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
    f"diffusers {diffusers.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}"
)
print("preflight: ok", flush=True)
# The first CUDA call of the check.
if not torch.cuda.is_available():
    print(f"no CUDA device: torch {torch.__version__} sees no GPU here; the GPU check needs one")
    sys.exit(3)
p = torch.cuda.get_device_properties(0)
print(f"cuda: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
PY
}

FAILED=()
step() {  # step NAME SECONDS COMMAND...: run under a timeout, note a failure, go on
  local name=$1 limit=$2 rc=0
  shift 2
  echo "== $name (timeout ${limit} s)"
  local t0=$SECONDS
  timeout --kill-after=15 "$limit" "$@" || rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    FAILED+=("$name (timed out)")
  elif [ "$rc" -ne 0 ]; then
    FAILED+=("$name (exit $rc)")
  fi
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

main() {
  machine
  install_offline
  preflight
  local xdist=()
  if python3 -c "import xdist" 2>/dev/null; then xdist=(-n 8); fi
  # TRITON_INTERPRET=0: compiled kernels on CUDA tensors (the suite's conftest would otherwise
  # turn the CPU interpreter on); tests/test_kernels.py then runs every case on the GPU.
  step "kernel tests on the GPU" 100 env TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider \
    ${xdist[@]+"${xdist[@]}"} --junitxml="$OUT/kernel_tests.xml" tests/test_kernels.py
  # the TensorRT plugin's kernel launched as TensorRT would (its own uncut PTX under a child timeout)
  step "plugin launch contract" 150 python3 bench/plugin_launch.py --json "$OUT/plugin_launch.json" \
    --uncut-timeout 45
  step "kernel timings" 100 python3 bench/gpu_kernels.py --json "$OUT/gpu_kernels.json"
  step "full size 1024x1024" 240 python3 bench/gpu_fullsize.py --steps 2 --json "$OUT/gpu_fullsize.json"
  if [ ${#FAILED[@]} -ne 0 ]; then
    printf 'gpu check: failed: %s\n' "${FAILED[@]}"
    return 1
  fi
  echo "gpu check: every step passed"
}

main 2>&1 | tee "$OUT/gpu_check.log"
