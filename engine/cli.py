"""`auraflow-edge`: a thin CLI, one function per subcommand.

Heavy stacks (torch, onnxruntime, tensorrt) are imported inside the branch that needs them, so
``--help`` and the ONNX Runtime path never import torch. Errors become one line on stderr and a
non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .errors import UserError


def _log(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--seed", type=int, default=0, help="numpy PCG64 seed for the initial latents")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--noise", help="float32 .npy of shape (1, 4, H/8, W/8) used as the initial latents")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"])
    p.add_argument(
        "--precision", default="fp32", help="torch backend: fp32 | bf16 | fp16 | int8 | fp8 | int4"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--components", help="pipeline folder with tokenizer/text_encoder/vae for a single file")
    p.add_argument(
        "--vram-budget", help="device memory budget, e.g. 8GiB (default: what the device has free)"
    )
    p.add_argument(
        "--vae-tiles", type=int, help="decode the VAE in N x N tiles (default: as the plan decides)"
    )
    p.add_argument("--memory-report", action="store_true", help="print planned vs measured peak per stage")
    p.add_argument("-o", "--output", default="out.png")


def cmd_generate(args) -> int:
    from .image import save_png
    from .pipeline import Pipeline

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: output must be a .png file")
    if not out.parent.exists():
        raise UserError(f"{out.parent}: output folder does not exist")
    opts = {}
    if args.backend in ("auto", "torch") and args.precision:
        opts["precision"] = args.precision
    pipe = Pipeline.load(
        args.model, backend=args.backend, device=args.device, components=args.components, **opts
    )
    res = pipe.generate(
        args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        height=args.height,
        width=args.width,
        noise=args.noise,
        progress=not args.quiet,
        vram_budget=args.vram_budget,
        vae_tiles=args.vae_tiles,
    )
    save_png(res.image, out, res.parameters)
    if args.memory_report:
        print(memory_report(res))
    for s in res.stages:
        peak = f", peak {s.peak_bytes / 2**20:.0f} MiB" if s.peak_bytes else ""
        _log(args, f"{s.name}: {s.seconds:.2f} s{peak}")
    _log(args, f"wrote {out}")
    return 0


def memory_report(res) -> str:
    from .planner import fmt_bytes

    names = {"vae": "vae_decode"}
    lines = [f"{'stage':<14} {'planned':>12} {'measured':>12} {'measured/planned':>17}"]
    for s in res.stages:
        planned = res.plan.baseline + res.plan.stage(names.get(s.name, s.name)).peak
        lines.append(
            f"{s.name:<14} {fmt_bytes(planned):>12} {fmt_bytes(s.peak_bytes or 0):>12} {(s.peak_bytes or 0) / planned:>17.3f}"
        )
    return "\n".join(lines)


def cmd_plan(args) -> int:
    from .pipeline import Pipeline

    opts = {"precision": args.precision} if args.backend in ("auto", "torch") else {}
    pipe = Pipeline.load(
        args.model, backend=args.backend, device=args.device, components=args.components, **opts
    )
    plan = pipe.plan(args.height, args.width, args.vram_budget, vae_tiles=args.vae_tiles)
    print(plan.table())
    return 0


def cmd_bench(args) -> int:
    from .benchmark import print_summary, run_bench

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="auraflow-edge-bench-"))
    res = run_bench(
        args.model,
        [p.strip() for p in args.precisions.split(",") if p.strip()],
        args.steps,
        args.height,
        args.width,
        args.backend,
        work,
        Path(args.json) if args.json else None,
        Path(args.plot) if args.plot else None,
        baseline=not args.no_baseline,
        quiet=args.quiet,
    )
    print_summary(res)
    return 0


def cmd_demo(args) -> int:
    from .demo import make_tiny_pipeline

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="auraflow-edge-demo-"))
    folder = root / "tiny-auraflow"
    if not (folder / "model_index.json").exists():
        _log(args, f"writing a tiny random AuraFlow pipeline to {folder}")
        make_tiny_pipeline(folder)
    args.model, args.output = str(folder), str(root / "demo.png")
    args.prompt, args.negative_prompt = "a photo of a cat sitting on a red sofa", ""
    args.steps, args.guidance, args.seed = args.steps, 3.5, 0
    args.height = args.width = 128
    args.noise, args.backend, args.precision, args.device, args.components = (
        None,
        "torch",
        "fp32",
        "cpu",
        None,
    )
    args.vram_budget, args.vae_tiles, args.memory_report = None, None, False
    cmd_generate(args)
    print(f"demo image: {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="auraflow-edge", description="Quantized low-memory AuraFlow inference")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    sub = ap.add_subparsers(dest="cmd", required=True)
    # The global flags are accepted after the subcommand too.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    sub.common = common

    g = sub.add_parser("generate", help="text to image", parents=[common])
    g.add_argument(
        "model", help="diffusers folder, single .safetensors file, cached hub id, or engine folder"
    )
    _add_generation_args(g)
    g.set_defaults(fn=cmd_generate)

    bn = sub.add_parser(
        "bench", help="latency, memory and fidelity per precision vs diffusers", parents=[common]
    )
    bn.add_argument("model", help="diffusers AuraFlow folder")
    bn.add_argument("--precisions", default="fp32,fp16,int8,fp8,int4")
    bn.add_argument("--steps", type=int, default=5)
    bn.add_argument("--height", type=int, default=512)
    bn.add_argument("--width", type=int, default=512)
    bn.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    bn.add_argument("--workdir", help="engines, images and velocities (default: a new temp folder)")
    bn.add_argument("--json")
    bn.add_argument("--plot")
    bn.add_argument("--no-baseline", action="store_true", help="skip the diffusers baselines")
    bn.set_defaults(fn=cmd_bench)

    pl = sub.add_parser(
        "plan", help="print the per-stage memory plan for a size and budget", parents=[common]
    )
    pl.add_argument("model")
    pl.add_argument("--height", type=int, default=1024)
    pl.add_argument("--width", type=int, default=1024)
    pl.add_argument("--vram-budget", help="e.g. 8GiB (default: what the device has free)")
    pl.add_argument("--vae-tiles", type=int)
    pl.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"])
    pl.add_argument("--precision", default="fp32")
    pl.add_argument("--device", default="cpu")
    pl.add_argument("--components")
    pl.set_defaults(fn=cmd_plan)

    d = sub.add_parser(
        "demo", help="make a tiny random model locally and generate with it (CPU)", parents=[common]
    )
    d.add_argument("--dir", help="where to write the model and image (default: a new temp folder)")
    d.add_argument("--steps", type=int, default=4)
    d.set_defaults(fn=cmd_demo)

    from . import cli_export

    cli_export.add_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # unexpected: still one line unless --debug
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
