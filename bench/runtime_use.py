"""One engine for every size, and many images per load, on the mid-size model (same run):

    python bench/runtime_use.py --json bench/results/cpu_runtime_use.json

1. Step time of the shape-agnostic ONNX Runtime transformer (the engine's graph: spatial sizes
   dynamic, positional crop as an input) vs the same weights traced at one static size, median of
   alternating runs on identical inputs, per precision. Target: dynamic within 3% of static.
2. Four images in one call (each stage loaded once) vs four separate calls (each loads every
   stage again), wall time, ONNX Runtime int8 engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from auraflow_edge.engine.backends.cpu import describe_cpu
from auraflow_edge.engine.backends.ort_backend import _session
from auraflow_edge.engine.model.checkpoint import open_model
from auraflow_edge.engine.model.config import AuraFlowConfig
from auraflow_edge.engine.runtime.manifest import Manifest
from auraflow_edge.engine.runtime.modulation import ModulationTable
from auraflow_edge.engine.runtime.pipeline import Pipeline
from auraflow_edge.engine.runtime.positions import PositionTable
from auraflow_edge.export.build import build_engine
from auraflow_edge.export.components import trace_transformer
from auraflow_edge.export.onnx_export import save_model, stream_weights
from auraflow_edge.export.onnx_folder import policies


def _static_copy(model: Path, engine: Path, precision: str, side: int) -> Path:
    """The engine's transformer traced with every size fixed, same weights and inputs."""
    mf = open_model(model)
    out = engine.parent / f"static-{precision}-{side}"
    out.mkdir(exist_ok=True)
    proto, rn = trace_transformer(mf.transformer_cfg, side, side, "fp32", dynamic_size=False)
    pol = policies(precision, "onnxruntime", 64)["transformer"]
    stream_weights(proto, lambda n: mf.weights.read(rn(n)), pol, out / "transformer.onnx.data")
    save_model(proto, out / "transformer.onnx")
    return out / "transformer.onnx"


def _feed(m: Manifest, side: int) -> dict:
    cfg = AuraFlowConfig(**m["transformer_config"])
    rng = np.random.default_rng(0)
    c = rng.standard_normal((2, 256, cfg.joint_attention_dim), dtype=np.float32)
    c[:, 40:] = 0
    return {
        "latents": rng.standard_normal((2, 4, side // 8, side // 8), dtype=np.float32),
        "context": c,
        "modulation": ModulationTable(cfg, m.path("modulation.safetensors"))(np.array([0.7], np.float32)),
        "pos": PositionTable(cfg, m.path("positions.safetensors"))(side // 8, side // 8),
    }


def dynamic_vs_static(model: Path, work: Path, precision: str, side: int, repeats: int) -> dict:
    eng = build_engine(str(model), work / f"engine-{precision}", precision=precision, quiet=True)
    m = Manifest.load(eng)
    feed = _feed(m, side)
    dyn = _session(m.path("transformer.onnx"), "cpu", None)
    sta = _session(_static_copy(model, eng, precision, side), "cpu", None)
    a = dyn.run(None, feed)[0]
    b = sta.run(None, feed)[0]
    times = {"dynamic": [], "static": []}
    for _ in range(repeats):  # alternating, so drift in machine load hits both alike
        for name, s in (("dynamic", dyn), ("static", sta)):
            t = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "side": side,
        "dynamic_step_s": med["dynamic"],
        "static_step_s": med["static"],
        "ratio": med["dynamic"] / med["static"],
        "within_3pct": med["dynamic"] <= 1.03 * med["static"],
        "max_abs_diff": float(np.abs(a - b).max()),
    }


def many_images(engine: Path, n: int, side: int, steps: int) -> dict:
    gen = dict(steps=steps, height=side, width=side)
    t = time.perf_counter()
    Pipeline.load(engine).generate_many("a photo of a cat", num_images=n, **gen)
    one_call = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(n):
        Pipeline.load(engine).generate("a photo of a cat", seed=i, **gen)
    separate = time.perf_counter() - t
    return {
        "images": n,
        "side": side,
        "steps": steps,
        "one_call_s": one_call,
        "separate_calls_s": separate,
        "speedup": separate / one_call,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    from auraflow_edge.engine.tiny.random_model import make_tiny_pipeline

    work = args.workdir or Path(tempfile.mkdtemp(prefix="afe-use-"))
    model = work / "mid"
    if not (model / "model_index.json").exists():
        make_tiny_pipeline(model, size="mid")
    res: dict = {"machine": f"{describe_cpu()}, {os.cpu_count()} cores", "model": "mid (hidden 768)"}

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")

    res["dynamic_vs_static"] = {}
    for p in ("int8", "fp32"):
        res["dynamic_vs_static"][p] = dynamic_vs_static(model, work, p, args.side, args.repeats)
        save()
        print(p, res["dynamic_vs_static"][p], flush=True)
    res["many_images"] = many_images(work / "engine-int8", 4, 256, 4)
    save()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
