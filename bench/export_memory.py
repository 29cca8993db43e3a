"""Peak RSS of the streamed transformer export, per precision, on a random checkpoint of real shapes.

    python bench/export_memory.py --config v0.3 --workdir /data/af --precisions int8,int4,fp8,fp16

Writes a random full-size v0.3 transformer (13.7 GB bf16, one tensor at a time) unless it exists,
then exports it once per precision in a fresh subprocess that reports its own peak RSS. A naive
export (diffusers from_pretrained + dynamo export with weights) needs over 27 GB in fp32 and
13.6 GB in bf16 (measured, shared/MEASURED.md). Results go to bench/results/export_memory.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import sys, json, time
from pathlib import Path
from auraflow_edge.engine.model.checkpoint import open_model
from auraflow_edge.export.onnx_folder import export_transformer, policies
src, out, precision, h, w = sys.argv[1:6]
t0 = time.perf_counter()
pol = policies(precision, "onnxruntime" if precision != "bf16" else "tensorrt", 64)["transformer"]
info = export_transformer(open_model(src), Path(out), pol, int(h), int(w))
from auraflow_edge.engine.runtime.stages import peak_rss
peak = peak_rss()  # VmHWM: this process only (ru_maxrss would include the parent's pages at fork)
print(json.dumps({"peak_rss": peak, "seconds": time.perf_counter() - t0,
                  "weight_bytes": info["transformer"]["weight_bytes"],
                  "modulation_bytes": info["modulation"]["weight_bytes"]}))
"""


def export_peak(src: Path, out: Path, precision: str, height: int = 1024, width: int = 1024) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(out), precision, str(height), str(width)],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="v0.3")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--precisions", default="int8,int4,fp8,fp16")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "export_memory.json"))
    args = ap.parse_args()
    from auraflow_edge.engine.model.config import PRESETS
    from auraflow_edge.engine.tiny.random_model import write_random_transformer

    cfg = PRESETS[args.config]
    work = Path(args.workdir)
    src = work / "transformer"
    if not (src / "config.json").exists():
        t = time.perf_counter()
        print(f"writing a random {args.config} transformer to {src} ...", flush=True)
        write_random_transformer(src, cfg, "bf16")
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    ckpt = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    rows = []
    print(f"{'precision':>9} {'peak RSS':>10} {'time':>7} {'graph weights':>14} {'modulation':>11}")
    for p in args.precisions.split(","):
        out = work / f"export-{p}"
        shutil.rmtree(out, ignore_errors=True)
        r = export_peak(src, out, p)
        rows.append({"precision": p, **r})
        print(
            f"{p:>9} {r['peak_rss'] / 2**30:8.2f} GiB {r['seconds']:6.0f}s {r['weight_bytes'] / 2**30:11.2f} GiB "
            f"{r['modulation_bytes'] / 2**30:8.2f} GiB",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
    res = {
        "machine": "2-core x86_64 CPU, 24 GB RAM (no GPU)",
        "config": args.config,
        "checkpoint_bytes": ckpt,
        "target_peak_rss_bytes": 3 * 10**9,
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"checkpoint {ckpt / 2**30:.1f} GiB; target peak RSS <= 3 GB; wrote {args.json}")


if __name__ == "__main__":
    main()
