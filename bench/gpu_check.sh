#!/usr/bin/env bash
# One-call GPU verification (run on a CUDA machine from the repo root; keeps under ~8 minutes):
#   bash bench/gpu_check.sh [OUT_DIR]
# 1. the kernel tests on the GPU (no interpreter), 2. kernel timings vs SDPA and bf16 matmul,
# 3. the full-size v0.3 1024^2 run under an 8 GiB cap vs diffusers bf16. Results: JSON + log in OUT_DIR.
set -uo pipefail
OUT="${1:-${OUT:-bench/results}}"
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1
LOG="$OUT/gpu_check.log"
{
  echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  # The GPU machines reach no package index: carry wheels made here with
  #   pip download --no-deps -d wheels diffusers transformers safetensors tokenizers huggingface-hub ml_dtypes onnx
  # (the `carry` option of the device tool) and they are installed offline.
  if [ -d wheels ]; then pip install -q --no-index --no-deps wheels/*.whl || true; fi
  pip install -q -e . --no-deps 2>/dev/null || true
  echo "== kernels: correctness and timings"
  timeout 240 python bench/gpu_kernels.py --json "$OUT/gpu_kernels.json"
  echo "== full size 1024x1024, 8 GiB cap"
  timeout 300 python bench/gpu_fullsize.py --steps 2 --json "$OUT/gpu_fullsize.json"
} 2>&1 | tee "$LOG"
