"""CLI subcommands for engine folders: build, inspect, refit."""

from __future__ import annotations

import shlex
import sys


def cmd_build(args) -> int:
    from ...export.build import build_engine

    out = build_engine(
        args.model,
        args.output,
        backend=args.backend,
        precision=args.precision,
        height=args.height,
        width=args.width,
        int4_block=args.int4_block,
        ort_int8=args.ort_int8,
        act_quant=args.act_quant,
        calibration_prompts=args.calibration_prompts,
        loras=_loras(args),
        components=args.components,
        revision=args.revision,
        force=args.force,
        quiet=args.quiet,
        command="auraflow-edge " + shlex.join(sys.argv[1:]),
        **_trt_options(args),
    )
    print(out)
    return 0


def _loras(args) -> list[tuple[str, float]]:
    from ..model.lora import parse_lora_arg

    return [parse_lora_arg(x) for x in args.lora or []]


def cmd_refit(args) -> int:
    from ...export.tensorrt_refit import refit_engine

    refit_engine(
        args.engine,
        _loras(args),
        model=args.model,
        components=args.components,
        quiet=args.quiet,
        command="auraflow-edge " + shlex.join(sys.argv[1:]),
    )
    return 0


def _trt_options(args) -> dict:
    opts = dict(
        shapes=args.shapes,
        vram_budget=args.vram_budget,
        timing_cache=args.timing_cache,
        dynamic_shapes=args.dynamic_shapes,
        hardware_compat=args.hardware_compat,
        attention_plugin=args.attention_plugin,
        refittable=args.refittable,
    )
    if args.backend != "tensorrt":
        given = [k for k, v in opts.items() if v not in (None, False, "none")]
        if given:
            from ..errors import UserError

            raise UserError(
                f"{', '.join('--' + g.replace('_', '-') for g in given)} only apply to --backend tensorrt"
            )
        return {}
    return opts


def cmd_inspect(args) -> int:
    from ..runtime.manifest import Manifest
    from ..runtime.planner import fmt_bytes

    m = Manifest.load(args.engine, verify=args.verify)
    rows = [
        ("backend", m["backend"]),
        ("precision", m["precision"]),
        ("build key", m["build_key"]),
        ("source", m["source"]["model"]),
        ("opset", str(m["opset"])),
        ("shift", str(m["scheduler"]["shift"])),
        ("tools", ", ".join(f"{k} {v}" for k, v in m["tools"].items())),
        ("command", m.get("command", "")),
    ]
    for name, c in m["components"].items():
        desc = c.get("file", c.get("dir", ""))
        if "weight_bytes" in c:
            desc += f"  weights {fmt_bytes(c['weight_bytes'])}"
        if "height" in c:
            desc += f"  {c['width']}x{c['height']}  batch {c['batch']}  {c['dtype']}"
        rows.append((name, desc))
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print()
    print(f"{'file':<36} {'size':>10}  sha256")
    for rel, e in m["files"].items():
        print(f"{rel:<36} {fmt_bytes(e['size']):>10}  {e['sha256'][:16]}")
    if args.verify:
        print("all checksums verified")
    return 0


def add_commands(sub) -> None:
    common = sub.common
    b = sub.add_parser("build", help="export a model to an engine folder", parents=[common])
    b.add_argument("model", help="diffusers folder, single .safetensors file or hub id")
    b.add_argument("-o", "--output", required=True, help="engine folder to write")
    b.add_argument("--revision", help="hub ids: branch, tag or commit hash (default: main)")
    b.add_argument(
        "--backend",
        default="onnxruntime",
        choices=["onnxruntime", "tensorrt", "torch"],
        help="runtime the engine is for (torch: quantized once, int8 / fp8 / int4, for the torch backend)",
    )
    b.add_argument("--precision", default="int8", help="fp32 | fp16 | bf16 | fp8 | int8 | int4")
    b.add_argument(
        "--height",
        type=int,
        help="TensorRT profile / calibration size in pixels (default: the model's own size); "
        "ONNX Runtime engines serve every size",
    )
    b.add_argument("--width", type=int, help="as --height")
    b.add_argument("--int4-block", type=int, default=64, help="input channels per int4 scale")
    b.add_argument(
        "--ort-int8",
        default="dynamic",
        choices=["dynamic", "nbits"],
        help="ONNX Runtime int8 kernel: dynamic (fastest, per-tensor activations) or nbits (more accurate)",
    )
    b.add_argument("--components", help="pipeline folder with text_encoder/vae/tokenizer for a single file")
    b.add_argument("--force", action="store_true", help="replace an existing engine folder")
    b.add_argument(
        "--lora",
        action="append",
        metavar="FILE[:SCALE]",
        help="merge a LoRA into the weights before quantization; repeatable; scale default 1",
    )
    b.add_argument(
        "--act-quant",
        choices=["int8", "fp8"],
        help="W8A8: also quantize activations (static scales from calibration, SmoothQuant), as Q/DQ pairs",
    )
    b.add_argument(
        "--calibration-prompts", type=int, default=8, help="built-in calibration prompts to use (1-8)"
    )
    t = b.add_argument_group("TensorRT")
    t.add_argument(
        "--shapes", help="WxH[,WxH...]: one optimization profile per shape set (default: --width x --height)"
    )
    t.add_argument("--vram-budget", help="build with weight streaming when the weights do not fit, e.g. 8GiB")
    t.add_argument("--timing-cache", help="timing cache file, read and updated")
    t.add_argument(
        "--dynamic-shapes", action="store_true", help="one dynamic profile (256 px to the model's max)"
    )
    t.add_argument(
        "--hardware-compat",
        default="none",
        choices=["none", "ampere+", "same-cc"],
        help="engines that run on other GPUs too (ampere+ caps kernels at 48 KiB shared memory)",
    )
    t.add_argument(
        "--attention-plugin", action="store_true", help="fused qk-norm attention as a TensorRT plugin"
    )
    t.add_argument(
        "--refittable",
        action="store_true",
        help="transformer weights swappable later by `auraflow-edge refit`",
    )
    b.set_defaults(fn=cmd_build)

    r = sub.add_parser(
        "refit", help="swap the LoRAs of a --refittable TensorRT engine folder, no rebuild", parents=[common]
    )
    r.add_argument("engine", help="TensorRT engine folder built with --refittable")
    r.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="repeatable; none: the base model")
    r.add_argument("--model", help="the base model the engine was built from (default: as the manifest says)")
    r.add_argument("--components", help="pipeline folder with text_encoder/vae/tokenizer for a single file")
    r.set_defaults(fn=cmd_refit)

    i = sub.add_parser("inspect", help="print an engine folder's manifest", parents=[common])
    i.add_argument("engine", help="engine folder")
    i.add_argument("--verify", action="store_true", help="check every file's sha256")
    i.set_defaults(fn=cmd_inspect)
