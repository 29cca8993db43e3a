"""Cost of a LoRA per denoising step on the torch backend, per precision: side branch vs merged.

    python bench/lora_cost.py --precisions fp32,bf16,int8,int4 --ranks 16,64 --json /tmp/lora_cost.json

Random mid-size AuraFlow (hidden 768 = 3 x 256, 2 joint + 6 single blocks), one transformer call at
CFG batch 2 with the modulation passed in (as the runtime does), a LoRA on every attention and
feed-forward linear. Per precision: the median step without LoRA and with side branches, measured
alternately. Quantized precisions always run LoRAs as branches (a switch installs new factors;
quantizations during it are counted). Float precisions load with the LoRAs merged (the step costs
what the base step costs) and use branches only after a switch on a resident model; the
alternative timed for them is switching by merging (unmerge a, merge b: a GEMM and a
read-modify-write per weight), with the drift that unmerging leaves in the weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import zlib
from pathlib import Path

import numpy as np
import torch


def _paired_times(fn, off, on, repeats: int) -> tuple[float, float]:
    """Median time of ``fn`` without and with the branches, measured alternately (a shared machine's
    load drifts; pairs see the same load)."""
    off()
    fn()  # warm-up
    on()
    fn()
    ts_off, ts_on = [], []
    for _ in range(repeats):
        for switch, ts in ((off, ts_off), (on, ts_on)):
            switch()
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return statistics.median(ts_off), statistics.median(ts_on)


def _targets(cfg) -> dict[str, tuple[int, int]]:
    """Every attention and feed-forward linear weight -> (out, in)."""
    from auraflow_edge.engine.model.transformer import AuraFlowTransformer

    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in AuraFlowTransformer(cfg).named_parameters()}
    return {n: s for n, s in shapes.items() if len(s) == 2 and "transformer_blocks" in n and "norm1" not in n}


def _gflop(targets: dict, tokens: int, rank: int | None) -> float:
    """Per step at CFG batch 2: the linears' FLOPs (rank None) or those of rank-``rank`` branches.
    Joint blocks run image-token and context-token linears separately; single blocks run both."""
    total = 0
    for n, (o, i) in targets.items():
        rows = 2 * (
            tokens + 264 if n.startswith("single_") else 264 if "add_" in n or "ff_context" in n else tokens
        )
        total += 2 * rows * (o * i if rank is None else rank * (o + i))
    return total / 1e9


def _random_lora(targets: dict, rank: int, seed: int):
    from auraflow_edge.engine.model.lora import LoraFile, LoraLayer, LoraSet

    rng = np.random.default_rng(seed)
    layers = {
        n: LoraLayer(
            rng.standard_normal((rank, i), dtype=np.float32) * 0.02,
            rng.standard_normal((o, rank), dtype=np.float32) * 0.02,
        )
        for n, (o, i) in targets.items()
    }
    return LoraSet([LoraFile(Path(f"random-r{rank}"), 1.0, "", "random", layers)])


def main() -> None:
    """One measurement script: build, time and print per precision and rank in order (a benchmark's
    linear sequence, kept whole so the printed table and the code read the same)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--height", type=int, default=512)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    from auraflow_edge.engine.backends import torch_quant
    from auraflow_edge.engine.model.config import AuraFlowConfig
    from auraflow_edge.engine.model.lora import install_branches, remove_branches
    from auraflow_edge.engine.model.spec import FLOAT_PRECISIONS, torch_dtype
    from auraflow_edge.engine.model.transformer import AuraFlowTransformer

    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = AuraFlowConfig(
        num_mmdit_layers=2,
        num_single_dit_layers=6,
        num_attention_heads=3,
        joint_attention_dim=256,
        caption_projection_dim=768,
        pos_embed_max_size=4096,
    )
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in AuraFlowTransformer(cfg).named_parameters()}
    targets = _targets(cfg)

    def weight(name):
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        return torch.randn(shapes[name], generator=g) * (0.02 if len(shapes[name]) > 1 else 0.1)

    tokens = (args.height // 16) * (args.width // 16)
    x = torch.randn(2, 4, args.height // 8, args.width // 8)
    ctx = torch.randn(2, 256, cfg.joint_attention_dim)
    mod = torch.randn(1, cfg.num_modulations, cfg.hidden) * 0.1
    lin_gflop = _gflop(targets, tokens, None)
    rows = []
    print(f"mid-size AuraFlow, {args.width}x{args.height}, CFG batch 2, {len(targets)} targeted linears")
    print(f"{'precision':>9} {'rank':>4} {'base s/step':>11} {'branch s/step':>13} {'overhead':>8} "
          f"{'branch GFLOP':>12} {'switch s':>8} {'merge+unmerge s':>15} {'unmerge drift':>13}")  # fmt: skip
    for prec in args.precisions.split(","):
        if prec in FLOAT_PRECISIONS:
            dtype = torch_dtype(prec)
            with torch.device("meta"):
                model = AuraFlowTransformer(cfg)
            model = model.to_empty(device=dev)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(weight(n))
            model = model.to(dtype).eval()
        else:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
            model = torch_quant.build_quantized_transformer(
                cfg, prec, dev, dtype, lambda n: weight(n).to(dev)
            )
        xi, ci, mi = x.to(dev, dtype), ctx.to(dev, dtype), mod.to(dev, dtype)

        def step():
            with torch.no_grad():
                model(xi, ci, modulation=mi)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        for rank in (int(r) for r in args.ranks.split(",")):
            a, b = _random_lora(targets, rank, 1), _random_lora(targets, rank, 2)
            base, branch = _paired_times(
                step,
                lambda: remove_branches(model),
                lambda: install_branches(model, a, dtype, dev),
                args.repeats,
            )
            calls = []
            real_q = torch_quant.quantize_weight
            torch_quant.quantize_weight = lambda *a_, **k: calls.append(1) or real_q(*a_, **k)
            t = time.perf_counter()
            install_branches(model, b, dtype, dev)  # the switch
            switch = time.perf_counter() - t
            torch_quant.quantize_weight = real_q
            remove_branches(model)
            row = {"precision": prec, "rank": rank, "base_s": base, "branch_s": branch, "switch_s": switch,
                   "branch_gflop": _gflop(targets, tokens, rank), "linear_gflop": lin_gflop,
                   "quantize_calls_in_switch": len(calls)}  # fmt: skip
            if prec in FLOAT_PRECISIONS:
                # the alternative: merge into the weights (switch = unmerge a, merge b)
                with torch.no_grad():
                    w0 = {n: model.get_submodule(n[:-7]).weight.detach().clone() for n in targets}
                    for n in targets:
                        fa = a.factors(n)
                        w = model.get_submodule(n[:-7]).weight
                        w += torch.from_numpy(fa[1] @ fa[0]).to(dev, dtype)
                    t = time.perf_counter()
                    for n in targets:
                        w = model.get_submodule(n[:-7]).weight
                        fa, fb = a.factors(n), b.factors(n)
                        w -= torch.from_numpy(fa[1]).to(dev, dtype) @ torch.from_numpy(fa[0]).to(dev, dtype)
                        w += torch.from_numpy(fb[1]).to(dev, dtype) @ torch.from_numpy(fb[0]).to(dev, dtype)
                    row["merge_switch_s"] = time.perf_counter() - t
                    drift = 0.0
                    for n in targets:
                        w = model.get_submodule(n[:-7]).weight
                        fb = b.factors(n)
                        w -= torch.from_numpy(fb[1]).to(dev, dtype) @ torch.from_numpy(fb[0]).to(dev, dtype)
                        drift = max(
                            drift,
                            ((w.float() - w0[n].float()).abs().max() / w0[n].float().abs().max()).item(),
                        )
                        w.copy_(w0[n])
                    row["unmerge_drift_rel"] = drift
            rows.append(row)
            print(f"{prec:>9} {rank:>4} {base:>11.3f} {branch:>13.3f} {100 * (branch / base - 1):>7.1f}% "
                  f"{row['branch_gflop']:>12.2f} {switch:>8.3f} {row.get('merge_switch_s', float('nan')):>15.3f} "
                  f"{row.get('unmerge_drift_rel', float('nan')):>13.2e}", flush=True)  # fmt: skip
    print(f"linear GFLOP per step (targeted linears, no LoRA): {lin_gflop:.1f}")
    from auraflow_edge.engine.model.config import AURAFLOW_V03

    full = _targets(AURAFLOW_V03)
    shares = {
        r: _gflop(full, 4096, r) / _gflop(full, 4096, None) for r in (int(r) for r in args.ranks.split(","))
    }
    print("full-size v0.3 at 1024x1024: branch FLOPs = " + ", ".join(f"{100 * v:.1f}% (rank {r})" for r, v in shares.items())
          + " of the targeted linears' FLOPs")  # fmt: skip
    if args.json:
        res = {
            "machine": f"{args.device}",
            "size": "mid",
            "height": args.height,
            "width": args.width,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
