"""Load time of the full-size int8 transformer on the torch backend: from a torch engine folder
(quantized once by `build --backend torch`) vs quantize-at-load from the bf16 checkpoint, same run:

    python bench/torch_engine_load.py --workdir /data/af --json bench/results/cpu_torch_engine_load.json

Writes a random full-size v0.3 transformer (13.7 GB bf16) unless it exists, builds the engine (the
text encoder / VAE / tokenizer of the tiny demo model stand in for the real ones: only the
transformer is timed), then loads the transformer each way in a fresh process, twice each,
alternating, and reports every time and the medians. CPU, float32 for the unquantized parts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import sys, time, json, torch
from auraflow_edge.engine.model.checkpoint import open_model
from auraflow_edge.engine.backends.torch_quant import QuantTorchTransformer
from auraflow_edge.engine.runtime.stages import peak_rss
kind, path = sys.argv[1:3]
t0 = time.perf_counter()
if kind == "engine":
    from auraflow_edge.engine.runtime.manifest import Manifest
    from auraflow_edge.engine.backends.torch_backend import _engine_model
    m = Manifest.load(path)
    tr = QuantTorchTransformer(_engine_model(m), "int8", torch.device("cpu"), torch.float32, engine=m)
else:
    tr = QuantTorchTransformer(open_model(path), "int8", torch.device("cpu"), torch.float32)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss": peak_rss()}))
"""


def _load(kind: str, path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{kind} load failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from auraflow_edge.engine.backends.cpu import describe_cpu
    from auraflow_edge.engine.model.config import AURAFLOW_V03
    from auraflow_edge.engine.tiny.random_model import make_tiny_pipeline, write_random_transformer
    from auraflow_edge.export.build import build_engine

    w = args.workdir
    src = w / "v03-transformer"
    if not (src / "config.json").exists():
        print("writing a random full-size v0.3 transformer (13.7 GB)", flush=True)
        write_random_transformer(src, AURAFLOW_V03)
    tiny = w / "tiny"
    if not (tiny / "model_index.json").exists():
        make_tiny_pipeline(tiny)
    t0 = time.perf_counter()
    eng = build_engine(str(src), w / "torch-int8", backend="torch", precision="int8", components=str(tiny))
    build_s = time.perf_counter() - t0
    runs = {"engine": [], "quantize_at_load": []}
    for _ in range(args.repeats):
        runs["engine"].append(_load("engine", eng))
        runs["quantize_at_load"].append(_load("checkpoint", src))
        print(runs, flush=True)
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    res = {
        "machine": f"{describe_cpu()}, {os.cpu_count()} cores",
        "model": "v0.3 transformer, random bf16 weights",
        "build_s": build_s,
        "engine_transformer_bytes": (eng / "transformer.safetensors").stat().st_size,
        "checkpoint_bytes": sum(f.stat().st_size for f in src.glob("*.safetensors")),
        "runs": runs,
        "median_s": med,
        "speedup": med["quantize_at_load"] / med["engine"],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
