"""`auraflow-edge bench`: latency, memory and fidelity per precision, against diffusers in the same run.

Every configuration runs in a fresh worker process (so its peak RSS is its own), with the same
initial noise. Per precision: text-encode time, per-step transformer time (median over the steps
after the first), VAE decode time, total, peak memory per stage, model bytes on disk and planned
resident; fidelity against the highest precision of the run (transformer-output cosine and
relative L2 at a few steps, image PSNR). Baselines: diffusers AuraFlowPipeline eager in fp32 and
in bf16 (which uses a recent CPU's matrix units), and with optimum-quanto qfloat8 weights where
that package is installed. Ratios ours/baseline (fp32 and bf16) come last.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from auraflow_edge.engine.errors import UserError
from auraflow_edge.engine.runtime.stages import peak_rss

ORDER = ["fp32", "bf16", "fp16", "fp8", "int8", "int4"]


def _record_steps(fn, record_at: set[int], store: dict, times: list):
    def call(latents, context, step):
        t = time.perf_counter()
        v = fn(latents, context, step)
        times.append(time.perf_counter() - t)
        if step in record_at:
            store[f"v{step}"] = v
        return v

    call.prepare, call.close = fn.prepare, fn.close
    return call


def worker_ours(spec: dict) -> dict:
    from auraflow_edge.engine.runtime.pipeline import Pipeline

    pipe = Pipeline.load(
        spec["path"],
        backend=spec["backend"],
        **({"precision": spec["precision"]} if spec["backend"] == "torch" else {}),
    )
    noise = np.load(spec["noise"])
    vel, times = {}, []
    stages = pipe.stages
    real_open = stages._open

    def _open(name, **shape):
        obj = real_open(name, **shape)
        if name == "transformer":
            return _record_steps(obj, set(spec["record_steps"]), vel, times)
        return obj

    stages._open = _open
    t0 = time.perf_counter()
    res = pipe.generate(
        spec["prompt"],
        steps=spec["steps"],
        guidance=spec["guidance"],
        height=spec["height"],
        width=spec["width"],
        noise=noise,
        vae_tiles=1,
    )
    total = time.perf_counter() - t0
    np.savez(spec["out"] + ".npz", image=np.asarray(res.image), **vel)
    st = {s.name: s for s in res.stages}
    disk = (
        sum(p.stat().st_size for p in Path(spec["path"]).rglob("*") if p.is_file())
        if spec["backend"] != "torch"
        else None
    )
    return {
        "text_encode_s": st["text_encoder"].seconds,
        "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "vae_s": st["vae"].seconds,
        "total_s": total,
        "peak_bytes": {k: v.peak_bytes for k, v in st.items()},
        "process_peak_rss": peak_rss(),
        "disk_bytes": disk,
        "resident_bytes": res.plan.stage("transformer").weights,
    }


def worker_diffusers(spec: dict) -> dict:
    import torch
    from diffusers import AuraFlowPipeline

    from auraflow_edge.engine.backends.torch_backend import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec.get("dtype", "fp32")]
    pipe = AuraFlowPipeline.from_pretrained(spec["path"], torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if spec.get("quanto"):
        from optimum.quanto import freeze, qfloat8, quantize

        quantize(pipe.transformer, weights=qfloat8)
        freeze(pipe.transformer)
    vel, times = {}, []
    fwd = pipe.transformer.forward
    record = set(spec["record_steps"])

    def timed(*a, **k):
        t = time.perf_counter()
        out = fwd(*a, **k)
        times.append(time.perf_counter() - t)
        step = len(times) - 1
        if step in record:
            vel[f"v{step}"] = out[0].float().numpy() if isinstance(out, tuple) else out.sample.float().numpy()
        return out

    pipe.transformer.forward = timed
    t0 = time.perf_counter()
    img = pipe(
        spec["prompt"],
        num_inference_steps=spec["steps"],
        guidance_scale=spec["guidance"],
        height=spec["height"],
        width=spec["width"],
        latents=torch.from_numpy(np.load(spec["noise"])),
        output_type="pil",
    ).images[0]
    total = time.perf_counter() - t0
    np.savez(spec["out"] + ".npz", image=np.asarray(img), **vel)
    return {
        "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "total_s": total,
        "process_peak_rss": peak_rss(),
    }


def _run_worker(kind: str, spec: dict) -> dict:
    code = (
        "import json, sys\nfrom auraflow_edge.bench import harness as b\n"
        f"print(json.dumps(b.worker_{kind}(json.loads(sys.argv[1]))))"
    )
    r = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _fidelity(ref: dict, other: dict, steps: list[int]) -> dict:
    out = {}
    for s in steps:
        a, b = ref[f"v{s}"].astype(np.float64), other[f"v{s}"].astype(np.float64)
        out[f"step{s}_cos"] = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
        out[f"step{s}_rel_l2"] = float(np.linalg.norm(a - b) / np.linalg.norm(a))
    mse = np.mean((ref["image"].astype(np.float64) - other["image"].astype(np.float64)) ** 2)
    out["image_psnr_db"] = 99.0 if mse == 0 else float(10 * np.log10(255**2 / mse))
    return out


def run_bench(
    model: str,
    precisions: list[str],
    steps: int,
    height: int,
    width: int,
    backend: str,
    workdir: Path,
    json_out: Path | None,
    plot: Path | None,
    baseline: bool = True,
    prompt: str = "a photo of a cat",
    quiet: bool = False,
) -> dict:
    from auraflow_edge.engine.runtime.noise import initial_noise

    say = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    unknown = [p for p in precisions if p not in ORDER]
    if unknown:
        raise UserError(f"unknown precision(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    workdir.mkdir(parents=True, exist_ok=True)
    noise_path = workdir / "noise.npy"
    np.save(noise_path, initial_noise(0, height, width))
    record = sorted({0, steps // 2, steps - 1})
    base = dict(
        prompt=prompt,
        steps=steps,
        guidance=3.5,
        height=height,
        width=width,
        noise=str(noise_path),
        record_steps=record,
    )
    rows = {p: _run_ours(model, p, backend, workdir, height, width, base, say) for p in precisions}
    baselines = _run_baselines(model, workdir, base, say) if baseline else {}
    ok = [p for p in sorted(rows, key=ORDER.index) if "error" not in rows[p]]
    ref_name = ok[0] if ok else None
    if ref_name:
        ref = dict(np.load(workdir / f"ours-{ref_name}.npz"))
        for p in ok:
            rows[p]["fidelity_vs_" + ref_name] = _fidelity(
                ref, dict(np.load(workdir / f"ours-{p}.npz")), record
            )
        for name, b in baselines.items():
            if "error" not in b:
                other = dict(np.load(workdir / f"{BASELINE_FILES[name]}.npz"))
                b["fidelity_vs_" + ref_name] = _fidelity(ref, other, record)
    result = {
        "model": model,
        "backend": backend,
        "steps": steps,
        "height": height,
        "width": width,
        "machine": _machine(),
        "reference_precision": ref_name,
        "precisions": rows,
        "baselines": baselines,
    }
    for name in BASELINE_DTYPES:
        d = baselines.get(name, {})
        if d and "error" not in d:
            result[f"ratios_vs_{name.replace(' ', '_')}"] = {
                p: {
                    "step_time": r["step_s"] / d["step_s"],
                    "peak_rss": r["process_peak_rss"] / d["process_peak_rss"],
                }
                for p, r in rows.items()
                if "error" not in r
            }
    grid = workdir / "grid.png"
    _grid(workdir, ok, baselines, grid)
    result["grid"] = str(grid)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=1) + "\n")
        (json_out.parent / (json_out.stem + "_grid.png")).write_bytes(grid.read_bytes())
    if plot:
        _plot(result, plot)
    return result


BASELINE_DTYPES = {"diffusers fp32": "fp32", "diffusers bf16": "bf16"}
# where each baseline's worker saves its velocities and image (workdir / name + ".npz")
BASELINE_FILES = {
    "diffusers fp32": "diffusers-fp32",
    "diffusers bf16": "diffusers-bf16",
    "diffusers+quanto qfloat8": "quanto",
}


def _run_ours(model, precision, backend, workdir: Path, height, width, base: dict, say) -> dict:
    path = model
    if backend == "onnxruntime":
        from auraflow_edge.export.build import build_engine

        say(f"building the {precision} engine")
        out = workdir / f"engine-{precision}"
        path = str(build_engine(model, out, precision=precision, height=height, width=width, quiet=True))
    say(f"running ours {precision} ({backend})")
    spec = {
        **base,
        "path": path,
        "backend": backend,
        "precision": precision,
        "out": str(workdir / f"ours-{precision}"),
    }
    return _run_worker("ours", spec)


def _run_baselines(model, workdir: Path, base: dict, say) -> dict:
    """diffusers eager in fp32 and bf16, and with quanto qfloat8 weights (fp32 activations)."""
    out = {}
    for name, dtype in BASELINE_DTYPES.items():
        say(f"running {name} (eager)")
        spec = {**base, "path": model, "dtype": dtype, "out": str(workdir / BASELINE_FILES[name])}
        out[name] = _run_worker("diffusers", spec)
    name = "diffusers+quanto qfloat8"
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        out[name] = {"error": "optimum-quanto not installed"}
        return out
    say("running diffusers + quanto qfloat8")
    spec = {**base, "path": model, "quanto": True, "out": str(workdir / BASELINE_FILES[name])}
    out[name] = _run_worker("diffusers", spec)
    return out


def _machine() -> str:
    import os

    from auraflow_edge.engine.backends.cpu import describe_cpu
    from auraflow_edge.engine.backends.ort_int8 import int8_encoding

    return f"{describe_cpu()}, {os.cpu_count()} cores; ONNX Runtime int8 weights: {int8_encoding()}"


def _grid(workdir: Path, precisions, baselines, out: Path) -> None:
    from PIL import Image, ImageDraw

    tiles = [(f"ours {p}", workdir / f"ours-{p}.npz") for p in precisions]
    tiles += [(n, workdir / f"{BASELINE_FILES[n]}.npz") for n, b in baselines.items() if "error" not in b]
    imgs = [(n, Image.fromarray(np.load(f)["image"])) for n, f in tiles if f.exists()]
    if not imgs:
        return
    w, h = imgs[0][1].size
    canvas = Image.new("RGB", (w * len(imgs), h + 16), "white")
    d = ImageDraw.Draw(canvas)
    for i, (n, im) in enumerate(imgs):
        canvas.paste(im, (i * w, 16))
        d.text((i * w + 2, 2), n, fill="black")
    canvas.save(out)


def _plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p for p, r in result["precisions"].items() if "error" not in r]
    step = [result["precisions"][p]["step_s"] for p in names]
    mem = [result["precisions"][p]["process_peak_rss"] / 2**20 for p in names]
    labels = [f"ours {p}" for p in names]
    for n, b in result["baselines"].items():
        if "error" not in b:
            labels.append(n)
            step.append(b["step_s"])
            mem.append(b["process_peak_rss"] / 2**20)
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].bar(labels, step)
    ax[0].set_ylabel("transformer s / step (median)")
    ax[1].bar(labels, mem, color="tab:orange")
    ax[1].set_ylabel("peak RSS (MiB)")
    for a in ax:
        a.tick_params(axis="x", rotation=45)
    fig.suptitle(f"{result['height']}x{result['width']}, {result['steps']} steps, {result['backend']}")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def print_summary(result: dict) -> None:
    print(
        f"{'config':<26} {'TE s':>6} {'s/step':>8} {'VAE s':>6} {'total s':>8} {'peak RSS':>10} {'disk':>9} {'cos':>8} {'PSNR':>6}"
    )
    ref = result["reference_precision"]

    def line(name, r):
        if "error" in r:
            print(f"{name:<26} error: {r['error']}")
            return
        f = r.get(f"fidelity_vs_{ref}", {})
        cos = min((v for k, v in f.items() if k.endswith("_cos")), default=float("nan"))
        disk = f"{r['disk_bytes'] / 2**20:.0f}M" if r.get("disk_bytes") else "-"
        te = f"{r['text_encode_s']:.2f}" if "text_encode_s" in r else "-"
        vae = f"{r['vae_s']:.2f}" if "vae_s" in r else "-"
        print(
            f"{name:<26} {te:>6} {r['step_s']:8.3f} {vae:>6} {r['total_s']:8.2f} {r['process_peak_rss'] / 2**20:8.0f}M "
            f"{disk:>9} {cos:8.5f} {f.get('image_psnr_db', float('nan')):6.1f}"
        )

    for p, r in result["precisions"].items():
        line(f"ours {p}", r)
    for n, b in result["baselines"].items():
        line(n, b)
    for name in BASELINE_DTYPES:
        for p, r in result.get(f"ratios_vs_{name.replace(' ', '_')}", {}).items():
            print(f"ours {p} / {name}: step time {r['step_time']:.2f}x, peak RSS {r['peak_rss']:.2f}x")
