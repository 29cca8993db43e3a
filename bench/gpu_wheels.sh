#!/usr/bin/env bash
# Before a GPU check, on a machine with the package index: download the wheels the GPU machine
# lacks into bench/wheels/ (ignored by git), for its Python 3.12 on manylinux x86_64. Copy that
# folder along with the tree (a device call carries it); bench/gpu_check.sh installs it offline.
#
# Only diffusers (pure Python, about 5 MB): the GPU image (its package list as read on 2026-11-17) has
# every other package the check imports, and a second version of one it has breaks the install.
# diffusers 0.42.1 requires filelock, huggingface-hub>=1.32,<3 (the image: 1.33), numpy, Pillow,
# regex, requests, safetensors>=0.8 (the image: 0.8.0), all there, and importlib_metadata, which it
# imports only on Python < 3.8. Our own dependencies (numpy, safetensors, tokenizers, pillow, onnx,
# onnxruntime, ml_dtypes, tqdm) are there too. gpu_check.sh skips any carried wheel whose package
# is installed already. The version is the one the CPU test suite runs against.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=bench/wheels
WANT=(diffusers==0.42.1)

rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$DEST" \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "${WANT[@]}"
ls -l "$DEST"
total=$(du -sk "$DEST" | cut -f1)
echo "bench/wheels: ${total} KiB (a device call carries at most 64 MiB, the tree included)"
if [ "$total" -gt $((48 * 1024)) ]; then
  echo "bench/wheels is over 48 MiB: leave room for the tree" >&2
  exit 1
fi
