"""Prompt adherence of the trained tiny AuraFlow per backend and precision, read by the grader (issue 19).

    python -P -m auraflow_edge.bench.adherence [--json bench/results/tiny_adherence.json] [--held-in 200 --held-out 100]

On seeded prompts of the world (held-in: ``scene_set(n, "train", 0)``, held-out:
``scene_set(n, "held_out", 1)``; image i gets noise seed i), every configuration of ``CONFIGS``
(64x64, 20 steps) draws the same images from the shipped model's fp32 pipeline folder; the grader
reads them. Reported per configuration: the fraction with every attribute right and per
attribute, held-in and held-out apart, and the image PSNR against the first configuration (the
highest precision, torch fp32). ``auraflow-edge bench --adherence N`` runs the same measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from auraflow_edge.engine.backends.cpu import describe_cpu
from auraflow_edge.engine.tiny.grader import accuracy, grade
from auraflow_edge.engine.tiny.weights import write_pipeline
from auraflow_edge.engine.tiny.world import scene_set

# (name, backend, precision, engine build options); the first is the reference
CONFIGS: list[tuple[str, str, str, dict]] = [
    ("torch fp32", "torch", "fp32", {}),
    ("torch bf16", "torch", "bf16", {}),
    ("torch int8", "torch", "int8", {}),
    ("torch fp8", "torch", "fp8", {}),
    ("torch int4", "torch", "int4", {}),
    ("onnxruntime fp32", "onnxruntime", "fp32", {}),
    ("onnxruntime fp16", "onnxruntime", "fp16", {}),
    ("onnxruntime int8", "onnxruntime", "int8", {}),
    ("onnxruntime int8 w8a8", "onnxruntime", "int8", {"act_quant": "int8"}),
    ("onnxruntime fp8", "onnxruntime", "fp8", {}),
    ("onnxruntime int4", "onnxruntime", "int4", {}),
]
SIDE = 64
STEPS = 20
GUIDANCE = 3.5


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else float(10 * np.log10(255**2 / mse))


def draw(model: str | Path, backend: str, precision: str, prompts: list[str], steps: int, guidance: float):
    """(N, 64, 64, 3) uint8 images, noise seed i for prompt i."""
    from auraflow_edge.engine.runtime.pipeline import Pipeline

    opts = {"precision": precision} if backend == "torch" else {}
    pipe = Pipeline.load(model, backend=backend, progress=False, **opts)
    res = pipe.generate_many(prompts, steps=steps, guidance=guidance, seed=0, height=SIDE, width=SIDE)
    return np.stack([np.asarray(r.image) for r in res])


def measure(
    model: str | Path,
    workdir: str | Path,
    configs=CONFIGS,
    held_in: int = 200,
    held_out: int = 100,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    log=lambda m: None,
) -> dict:
    from auraflow_edge.export.build import build_engine

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    splits = {"held_in": scene_set(held_in, "train", 0), "held_out": scene_set(held_out, "held_out", 1)}
    scenes = splits["held_in"] + splits["held_out"]
    prompts = [s.prompt for s in scenes]
    rows, ref = {}, None
    for name, backend, precision, build in configs:
        t0 = time.perf_counter()
        path = str(model)
        try:
            if backend != "torch":
                log(f"building {name}")
                folder = workdir / name.replace(" ", "-")
                path = str(
                    build_engine(
                        str(model), folder, precision=precision, height=SIDE, width=SIDE, quiet=True, **build
                    )
                )
            log(f"drawing {len(prompts)} images with {name}")
            images = draw(path, backend, precision, prompts, steps, guidance)
        except Exception as e:  # one configuration failing must not lose the others
            rows[name] = {"error": f"{type(e).__name__}: {e}"}
            log(f"{name}: {rows[name]['error']}")
            continue
        grades = [grade(s, im) for s, im in zip(scenes, images)]
        ref = images if ref is None else ref
        rows[name] = {
            "held_in": accuracy(grades[:held_in]),
            "held_out": accuracy(grades[held_in:]),
            "psnr_db": psnr(images, ref),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        np.save(workdir / f"{name.replace(' ', '-')}.npy", images)
        log(f"{name}: {_line(name, rows[name])}")
    return {
        "model": str(model),
        "side": SIDE,
        "steps": steps,
        "guidance": guidance,
        "held_in_prompts": held_in,
        "held_out_prompts": held_out,
        "reference": configs[0][0],
        "rows": rows,
    }


def random_transformer(model: str | Path, out: Path, seed: int = 0) -> Path:
    """The trained pipeline with its transformer replaced by a freshly initialised one of the same
    configuration (diffusers' own initialisation, seeded): the same graph, random weights."""
    import shutil

    import torch
    from diffusers import AuraFlowTransformer2DModel

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(model, out)
    config = AuraFlowTransformer2DModel.load_config(Path(model) / "transformer")
    torch.manual_seed(seed)
    fresh = AuraFlowTransformer2DModel.from_config(config)
    shutil.rmtree(out / "transformer")
    fresh.save_pretrained(out / "transformer", safe_serialization=True)
    return out


def _line(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name:<24} error: {r['error']}"
    i, o = r["held_in"], r["held_out"]
    per = " ".join(f"{i[a] * 100:5.1f}" for a in ("color", "shape", "where", "background"))
    return f"{name:<24} {i['all'] * 100:6.1f} {o['all'] * 100:7.1f}   {per}   {r['psnr_db']:6.1f}"


def table(result: dict) -> str:
    head = f"{'config':<24} {'all in':>6} {'all out':>7}   {'color':>5} {'shape':>5} {'where':>5} {'bg':>5}   {'PSNR':>6}"
    return "\n".join([head] + [_line(n, r) for n, r in result["rows"].items()])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--held-in", type=int, default=200)
    ap.add_argument("--held-out", type=int, default=100)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--guidance", type=float, default=GUIDANCE)
    ap.add_argument(
        "--configs", help="comma-separated subset of the names, e.g. 'torch fp32,onnxruntime int8'"
    )
    ap.add_argument("--workdir", help="engines and images (default: a new temp folder)")
    ap.add_argument(
        "--random",
        type=int,
        default=60,
        help="also the image PSNR per configuration with the transformer's weights random, on this many prompts (0: skip)",
    )
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tiny-adherence-"))
    model = write_pipeline(work / "tiny-world")
    configs = CONFIGS
    if args.configs:
        want = [c.strip() for c in args.configs.split(",")]
        configs = [c for c in CONFIGS if c[0] in want]
    res = measure(
        model,
        work,
        configs,
        args.held_in,
        args.held_out,
        args.steps,
        args.guidance,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    res["machine"] = f"{describe_cpu()}, {os.cpu_count()} cores"
    print(table(res))
    if args.random:
        # does random-weights error (every earlier fidelity number) under- or over-state trained error?
        rnd = random_transformer(model, work / "tiny-world-random")
        r = measure(
            rnd,
            work / "random",
            configs,
            args.random,
            0,
            args.steps,
            args.guidance,
            log=lambda m: print(m, file=sys.stderr, flush=True),
        )
        res["random_transformer_psnr_db"] = {
            n: row.get("psnr_db", row.get("error")) for n, row in r["rows"].items()
        }
        res["random_transformer_prompts"] = args.random
        print("image PSNR vs " + configs[0][0] + ", trained / random transformer weights:")
        for n, row in res["rows"].items():
            rv = res["random_transformer_psnr_db"][n]
            rv = f"{rv:6.1f}" if isinstance(rv, float) else rv
            print(f"  {n:<24} {row.get('psnr_db', float('nan')):6.1f} {rv}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
