"""`auraflow-edge`: a thin CLI, one function per subcommand.

Heavy stacks (torch, onnxruntime, tensorrt) are imported inside the branch that needs them, so
``--help`` and the ONNX Runtime path never import torch. Errors become one line on stderr and a
non-zero exit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

from ..errors import UserError


def _log(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr)


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to draw")
    src.add_argument(
        "--prompts", metavar="FILE", help="UTF-8 text file, one prompt per line (blank lines skipped)"
    )
    p.add_argument("--negative-prompt", default="", help="what to steer away from (CFG)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt, seeds --seed, --seed+1, ...")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance scale (<= 1: off)")
    p.add_argument("--seed", type=int, default=0, help="numpy PCG64 seed for the initial latents")
    p.add_argument("--height", type=int, help="pixels, multiple of 16 (default: the model's own size)")
    p.add_argument("--width", type=int, help="pixels, multiple of 16 (default: the model's own size)")
    p.add_argument("--noise", help="float32 .npy of shape (1, 4, H/8, W/8) used as the initial latents")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "onnxruntime", "tensorrt"],
        help="auto: onnxruntime for an engine folder, torch for a checkpoint",
    )
    p.add_argument(
        "--precision",
        default="auto",
        help="torch backend: auto | fp32 | bf16 | fp16 | int8 | fp8 | int4 (auto: bf16 when it fits the "
        "budget, else fp8 on sm_89+, else int8; fp32 on the CPU)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (auto: CUDA when present)")
    p.add_argument("--components", help="pipeline folder with tokenizer/text_encoder/vae for a single file")
    p.add_argument(
        "--vram-budget", help="device memory budget, e.g. 8GiB (default: what the device has free)"
    )
    p.add_argument(
        "--vae-tiles", type=int, help="decode the VAE in N x N tiles (default: as the plan decides)"
    )
    p.add_argument("--memory-report", action="store_true", help="print planned vs measured peak per stage")
    p.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="LoRA .safetensors (diffusers/PEFT, kohya, ComfyUI); repeatable; scale default 1 (torch backend)",
    )
    p.add_argument(
        "-o", "--output", default="out.png", help="PNG path; several images: out-0001.png, out-0002.png, ..."
    )


def cmd_generate(args) -> int:
    from ..runtime.image import save_png
    from ..runtime.pipeline import Pipeline, check_jobs

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: output must be a .png file")
    if not out.parent.exists():
        raise UserError(f"{out.parent}: output folder does not exist")
    prompts = [args.prompt] if args.prompts is None else read_prompts(args.prompts)
    if args.num_images < 1:  # named by its flag here; check_jobs words it for the Python API
        raise UserError(f"--num-images must be >= 1, got {args.num_images}")
    check_jobs(prompts, args.num_images, bool(args.noise))  # before the model loads
    n = len(prompts) * args.num_images
    outs = [out] if n == 1 else [out.with_name(f"{out.stem}-{i + 1:04d}.png") for i in range(n)]
    opts = {}
    if args.vram_budget:
        opts["vram_budget"] = args.vram_budget
    if args.backend in ("auto", "torch") and args.precision:
        opts["precision"] = args.precision
    if getattr(args, "lora", None):
        from ..model.lora import parse_lora_arg

        opts["loras"] = [parse_lora_arg(x) for x in args.lora]
    opts.update(revision=getattr(args, "revision", None), progress=not args.quiet)  # demo: no --revision
    pipe = Pipeline.load(
        args.model, backend=args.backend, device=args.device, components=args.components, **opts
    )
    results = pipe.generate_many(
        prompts,
        num_images=args.num_images,
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
        announce=lambda line: _log(args, line),
    )
    for res, path in zip(results, outs):
        save_png(res.image, path, res.parameters)
    res = results[0]
    if args.memory_report:
        print(memory_report(res))
    for s in res.stages:
        peak = f", peak {s.peak_bytes / 2**20:.0f} MiB" if s.peak_bytes else ""
        _log(args, f"{s.name}: {s.seconds:.2f} s{peak}")
    _log(args, f"wrote {outs[0]}" if n == 1 else f"wrote {n} images: {outs[0]} ... {outs[-1]}")
    return 0


def read_prompts(path: str) -> list[str]:
    """One prompt per line, UTF-8; blank lines skipped."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: prompts file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a prompts file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path}: no prompts (one per line)")
    return prompts


def memory_report(res) -> str:
    from ..runtime.planner import fmt_bytes

    names = {"vae": "vae_decode"}
    lines = [f"{'stage':<14} {'planned':>12} {'measured':>12} {'measured/planned':>17}"]
    for s in res.stages:
        planned = res.plan.baseline + res.plan.stage(names.get(s.name, s.name)).peak
        lines.append(
            f"{s.name:<14} {fmt_bytes(planned):>12} {fmt_bytes(s.peak_bytes or 0):>12} {(s.peak_bytes or 0) / planned:>17.3f}"
        )
    return "\n".join(lines)


def cmd_plan(args) -> int:
    from ..runtime.pipeline import Pipeline

    opts = {"precision": args.precision} if args.backend in ("auto", "torch") else {}
    if args.vram_budget:
        opts["vram_budget"] = args.vram_budget
    opts.update(revision=args.revision, progress=not args.quiet)
    pipe = Pipeline.load(
        args.model, backend=args.backend, device=args.device, components=args.components, **opts
    )
    if "auto" in pipe.info:
        _log(args, pipe.info["auto"])
    dh, dw = pipe.default_size()
    plan = pipe.plan(args.height or dh, args.width or dw, args.vram_budget, vae_tiles=args.vae_tiles)
    print(plan.table())
    return 0


def cmd_bench(args) -> int:
    from ...bench.harness import print_summary, run_bench
    from ..model.checkpoint import resolve_model

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="auraflow-edge-bench-"))
    res = run_bench(
        str(resolve_model(args.model, args.revision, progress=not args.quiet)),
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
    if args.adherence:
        from ...bench import adherence

        wanted = [p.strip() for p in args.precisions.split(",")]
        configs = [c for c in adherence.CONFIGS if c[1] == args.backend and c[2] in wanted and not c[3]]
        res["adherence"] = adherence.measure(
            res["model"],
            work / "adherence",
            configs,
            held_in=args.adherence,
            held_out=max(1, args.adherence // 2),
            log=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)),
        )
        print(adherence.table(res["adherence"]))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


def cmd_demo(args) -> int:
    from ..tiny.demo import run

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="auraflow-edge-demo-"))
    if not root.is_dir():
        raise UserError(f"{root}: folder does not exist")
    out = run(root, args.prompt, steps=args.steps, guidance=args.guidance, seed=args.seed)
    print(f"demo image: {out}")
    return 0


def cmd_serve(args) -> int:
    from ..serve.launch import run

    return run(args)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default, where it has a real one."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("auraflow-edge")
    except md.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand and option with its help text: declarations, not logic, kept in one place
    so `--help` and this file read the same."""
    ap = argparse.ArgumentParser(
        prog="auraflow-edge", description="Quantized low-memory AuraFlow inference", formatter_class=_Help
    )
    ap.add_argument("--version", action="version", version=f"auraflow-edge {_version()}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: _add_parser(*a, formatter_class=_Help, **k)
    # The global flags are accepted after the subcommand too.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output")
    sub.common = common

    g = sub.add_parser("generate", help="text to image", parents=[common])
    g.add_argument(
        "model",
        help="diffusers folder, single .safetensors file, hub id (downloaded when not cached), or engine folder",
    )
    _add_generation_args(g)
    g.add_argument("--revision", help="hub ids: branch, tag or commit hash (default: main)")
    g.set_defaults(fn=cmd_generate)

    bn = sub.add_parser(
        "bench", help="latency, memory and fidelity per precision vs diffusers", parents=[common]
    )
    bn.add_argument("model", help="diffusers AuraFlow folder or hub id")
    bn.add_argument("--revision", help="hub ids: branch, tag or commit hash (default: main)")
    bn.add_argument("--precisions", default="fp32,fp16,int8,fp8,int4", help="comma-separated")
    bn.add_argument("--steps", type=int, default=5, help="sampling steps per run")
    bn.add_argument("--height", type=int, default=512, help="pixels")
    bn.add_argument("--width", type=int, default=512, help="pixels")
    bn.add_argument(
        "--backend", default="onnxruntime", choices=["onnxruntime", "torch"], help="ours: runtime"
    )
    bn.add_argument("--workdir", help="engines, images and velocities (default: a new temp folder)")
    bn.add_argument("--json", help="write the results here")
    bn.add_argument("--plot", help="write a latency / memory / fidelity plot (PNG) here")
    bn.add_argument("--no-baseline", action="store_true", help="skip the diffusers baselines")
    bn.add_argument(
        "--adherence",
        type=int,
        metavar="N",
        help="shapes-world model (the folder `demo` writes): also grade N held-in and N/2 held-out "
        "prompts per precision (64x64, 20 steps)",
    )
    bn.set_defaults(fn=cmd_bench)

    pl = sub.add_parser(
        "plan", help="print the per-stage memory plan for a size and budget", parents=[common]
    )
    pl.add_argument("model", help="diffusers folder, single .safetensors file, hub id, or engine folder")
    pl.add_argument("--height", type=int, help="pixels (default: the model's own size)")
    pl.add_argument("--width", type=int, help="pixels (default: the model's own size)")
    pl.add_argument("--vram-budget", help="e.g. 8GiB (default: what the device has free)")
    pl.add_argument("--vae-tiles", type=int, help="force N x N VAE tiles (default: as the plan decides)")
    pl.add_argument(
        "--backend", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"], help="runtime"
    )
    pl.add_argument(
        "--precision", default="auto", help="torch backend: auto | fp32 | bf16 | fp16 | int8 | fp8 | int4"
    )
    pl.add_argument("--device", default="auto", help="auto | cpu | cuda")
    pl.add_argument("--components", help="pipeline folder with tokenizer/text_encoder/vae for a single file")
    pl.add_argument("--revision", help="hub ids: branch, tag or commit hash (default: main)")
    pl.set_defaults(fn=cmd_plan)

    d = sub.add_parser(
        "demo",
        help="draw prompts of the shapes world with the shipped trained tiny AuraFlow (CPU)",
        parents=[common],
    )
    d.add_argument("--dir", help="where to write the model and the image (default: a new temp folder)")
    d.add_argument(
        "--prompt",
        action="append",
        help="draw this instead of the default prompts of the world; repeatable "
        "(the world: 'a {color} {shape} {where} on a {color} background')",
    )
    d.add_argument("--steps", type=int, default=20, help="sampling steps")
    d.add_argument("--guidance", type=float, default=3.5, help="classifier-free guidance scale")
    d.add_argument("--seed", type=int, default=0, help="seed of the first image; then +1 each")
    d.set_defaults(fn=cmd_demo)

    sv = sub.add_parser(
        "serve",
        help="keep the model loaded behind the OpenAI Images and A1111 APIs and a web page (optionally on Ray)",
        parents=[common],
    )
    from ..serve.launch import add_arguments

    add_arguments(sv)
    sv.set_defaults(fn=cmd_serve)

    from . import export as cli_export

    cli_export.add_commands(sub)
    from . import hub as cli_hub

    cli_hub.add_commands(sub)
    return ap


def _warn_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.debug:
        warnings.showwarning = _warn_line  # one line each, no source lines
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
