"""ONNX Runtime int8 weight encodings (s8, u8 + zero point 128) on the mid-size model, same run:

    python bench/int8_encodings.py --json bench/results/cpu_int8_encodings.json [--steps 5]

Per encoding, measured on this CPU: transformer step time (CFG batch 2, 512x512, median after a
warm-up) and its ratio to diffusers' fp32 AuraFlowTransformer2DModel on the same inputs; transformer
output rel L2 vs the fp32 engine; image PSNR vs the fp32 engine. For the CPUs this one is not,
emulated over the same layers and activations (ort_int8): saturated int16 pairs and the worst layer
error on an x86-64 CPU without VNNI, for each encoding. The runtime picks s8 where MLAS multiplies
it exactly (VNNI, AMX, ARM64) and u8 elsewhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from auraflow_edge.bench.mlas_emulator import emulate_matmul, encode_for
from auraflow_edge.engine.backends.cpu import describe_cpu
from auraflow_edge.engine.backends.ort_backend import _session
from auraflow_edge.engine.backends.ort_int8 import int8_encoding
from auraflow_edge.engine.model.config import AuraFlowConfig
from auraflow_edge.engine.runtime.manifest import Manifest
from auraflow_edge.engine.runtime.modulation import ModulationTable
from auraflow_edge.engine.runtime.noise import initial_noise
from auraflow_edge.engine.runtime.pipeline import Pipeline
from auraflow_edge.engine.runtime.positions import PositionTable
from auraflow_edge.engine.tiny.random_model import make_tiny_pipeline
from auraflow_edge.export.build import build_engine

SIDE = 512


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def transformer_inputs(m: Manifest) -> dict:
    """One CFG-batch call of the transformer at SIDE x SIDE, as the pipeline feeds it."""
    rng = np.random.default_rng(0)
    cfg = AuraFlowConfig(**m["transformer_config"])
    x = rng.standard_normal((2, 4, SIDE // 8, SIDE // 8), dtype=np.float32)
    c = rng.standard_normal((2, 256, cfg.joint_attention_dim), dtype=np.float32)
    c[:, 40:] = 0  # a short prompt: pad positions are zero, as the pipeline makes them
    mod = ModulationTable(cfg, m.path("modulation.safetensors"))(np.array([0.7], np.float32))
    pos = PositionTable(cfg, m.path("positions.safetensors"))(SIDE // 8, SIDE // 8)
    return {"latents": x, "context": c, "modulation": mod, "pos": pos}


def _diffusers_step(model_dir: Path, feed: dict, repeats: int) -> float:
    import torch
    from diffusers import AuraFlowTransformer2DModel

    tr = AuraFlowTransformer2DModel.from_pretrained(model_dir / "transformer").eval()
    x, c = torch.from_numpy(feed["latents"]), torch.from_numpy(feed["context"])
    t = torch.full((2,), 0.7)
    with torch.no_grad():
        return _median_time(lambda: tr(hidden_states=x, encoder_hidden_states=c, timestep=t), repeats)


def _emulate_avx2(m: Manifest, feed: dict, rows: int) -> dict:
    """Saturated pairs and worst layer error (vs exact integer sums) an x86-64 CPU without VNNI
    would see, per encoding."""
    import onnxruntime as ort

    model = onnx.load(str(m.path("transformer.onnx")))
    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(n.input[0] for n in nodes))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    acts = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    rng = np.random.default_rng(0)
    out = {e: {"saturated_pairs": 0, "pairs": 0, "worst_layer_rel_l2": 0.0} for e in ("s8", "u8")}
    for n in nodes:
        a = acts[n.input[0]].reshape(-1, acts[n.input[0]].shape[-1])
        # the activation scale comes from the whole tensor; the product is emulated on sampled rows
        b = numpy_helper.to_array(inits[n.input[1]])
        s = numpy_helper.to_array(inits[n.input[2]])
        pick = np.sort(rng.choice(a.shape[0], min(rows, a.shape[0]), replace=False))
        for enc, r in out.items():
            qb, zp = encode_for(b, enc)
            # there, u8 x s8 goes through vpmaddubsw (saturating int16 pairs), u8 x u8 through vpmaddwd
            got, clipped = _rows(a, pick, qb, zp, s, enc == "s8")
            exact, _ = _rows(a, pick, qb, zp, s, False)
            r["saturated_pairs"] += clipped
            r["pairs"] += len(pick) * (b.shape[0] // 2) * b.shape[1]
            err = float(np.linalg.norm(got - exact) / max(np.linalg.norm(exact), 1e-30))
            r["worst_layer_rel_l2"] = max(r["worst_layer_rel_l2"], err)
    return out


def _rows(a, pick, qb, zp, s, saturating):
    """Emulate only the picked rows, with the activation quantization of the whole tensor."""
    lo, hi = min(float(a.min()), 0.0), max(float(a.max()), 0.0)
    sub = np.concatenate([a[pick], np.array([[lo] * a.shape[1], [hi] * a.shape[1]], np.float32)])
    y, clipped = emulate_matmul(sub, qb, zp, s, saturating)
    if saturating:  # pairs of the two range rows appended above are not the model's
        _, extra = emulate_matmul(sub[-2:], qb, zp, s, True)
        clipped -= extra
    return y[:-2], clipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=48, help="activation rows emulated per layer")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="afe-int8-"))
    model = make_tiny_pipeline(work / "mid", size="mid")
    eng = {
        p: build_engine(str(model), work / f"engine-{p}", precision=p, height=SIDE, width=SIDE, quiet=True)
        for p in ("fp32", "int8")
    }
    m8 = Manifest.load(eng["int8"])
    feed = transformer_inputs(m8)
    res: dict = {
        "machine": describe_cpu(),
        "chosen_here": int8_encoding(),
        "model": "mid (hidden 768, 2 joint + 6 single blocks)",
        "size": f"{SIDE}x{SIDE}",
        "steps": args.steps,
        "encodings": {},
    }

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")

    ref_sess = _session(Manifest.load(eng["fp32"]).path("transformer.onnx"), "cpu", None)
    ref_out = ref_sess.run(None, feed)[0].astype(np.float64)
    res["fp32_engine_step_s"] = _median_time(lambda: ref_sess.run(None, feed), args.repeats)
    res["diffusers_fp32_step_s"] = _diffusers_step(model, feed, args.repeats)
    save()
    gen = dict(prompt="a photo of a cat", steps=args.steps, height=SIDE, width=SIDE)
    noise = initial_noise(0, SIDE, SIDE)
    ref_img = np.asarray(Pipeline.load(eng["fp32"]).generate(**gen, noise=noise).image, np.float64)
    for enc in ("s8", "u8"):
        sess = _session(m8.path("transformer.onnx"), "cpu", None, enc)
        out = sess.run(None, feed)[0].astype(np.float64)
        step = _median_time(lambda: sess.run(None, feed), args.repeats)
        img = np.asarray(Pipeline.load(eng["int8"], int8_weights=enc).generate(**gen, noise=noise).image)
        mse = np.mean((img.astype(np.float64) - ref_img) ** 2)
        res["encodings"][enc] = {
            "step_s": step,
            "step_vs_diffusers_fp32": step / res["diffusers_fp32_step_s"],
            "rel_l2_vs_fp32_engine": float(np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out)),
            "image_psnr_vs_fp32_engine_db": 99.0 if mse == 0 else float(10 * np.log10(255**2 / mse)),
        }
        save()
        print(enc, res["encodings"][enc], flush=True)
    res["emulated_x86_without_vnni"] = _emulate_avx2(m8, feed, args.rows)
    save()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
