"""`auraflow-edge serve`: its options, loading the pipeline once, and running uvicorn or Ray Serve.

Nothing here imports fastapi, uvicorn or ray at module level, so ``auraflow-edge --help`` needs
neither the serve nor the ray extra.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

from ..errors import UserError
from .config import default_model_name, load_pipeline, missing_extra, serve_options
from .requests import Limits


def add_arguments(p) -> None:
    p.add_argument("model", help="diffusers folder, single .safetensors file, hub id, or engine folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--model-name", help="the id clients see in /v1/models (default: the model's folder name)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "onnxruntime", "tensorrt"],
        help="auto: the engine folder's own backend, torch for a checkpoint",
    )
    p.add_argument(
        "--precision", default="auto", help="torch backend: auto | fp32 | bf16 | fp16 | int8 | fp8 | int4"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--components", help="pipeline folder with tokenizer/text_encoder/vae for a single file")
    p.add_argument("--revision", help="hub ids: branch, tag or commit hash (default: main)")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="LoRA .safetensors; repeatable")
    p.add_argument(
        "--vram-budget", help="device memory budget, e.g. 8GiB (default: what the device has free)"
    )
    p.add_argument(
        "--vae-tiles", type=int, help="decode the VAE in N x N tiles (default: as the plan decides)"
    )
    p.add_argument(
        "--swap-stages",
        action="store_true",
        help="load text encoder, transformer and VAE one at a time for each batch, as `generate` does "
        "(least memory, slower); default: all three stay loaded",
    )
    d = Limits()
    p.add_argument("--max-images", type=int, default=d.max_images, help="images per request")
    p.add_argument("--max-side", type=int, default=d.max_side, help="pixels, width and height each")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="sampling steps per request")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="images waiting; past it: 503")
    p.add_argument("--max-body", type=int, default=d.max_body, help="request body bytes; past it: 413")
    p.add_argument("--max-prompt", type=int, default=d.max_prompt, help="characters per prompt")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="images in one stage-major batch")
    p.add_argument("--no-batching", action="store_true", help="run each request alone (to measure batching)")
    p.add_argument(
        "--keep-images", type=int, default=64, help="response_format=url: the last N stay downloadable"
    )
    r = p.add_argument_group("Ray Serve (pip install 'auraflow-edge[ray]')")
    r.add_argument("--ray", action="store_true", help="serve through Ray Serve's HTTP proxy")
    r.add_argument(
        "--replicas", type=int, default=1, help="model replicas (one per GPU where there are GPUs)"
    )
    r.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")


def config_from_args(args) -> dict:
    """Everything a replica needs to load and serve, as plain data (it travels to Ray workers)."""
    limits = Limits(
        args.max_images,
        args.max_side,
        args.max_steps,
        args.max_queue,
        args.max_body,
        args.max_prompt,
        args.max_batch,
    )
    for name, v in asdict(limits).items():
        if v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.vae_tiles is not None and args.vae_tiles < 1:
        raise UserError(f"--vae-tiles must be >= 1, got {args.vae_tiles}")
    return {
        "model": args.model,
        "model_name": args.model_name or default_model_name(args.model),
        "backend": args.backend,
        "precision": args.precision,
        "device": args.device,
        "components": args.components,
        "revision": args.revision,
        "lora": list(args.lora or []),
        "keep_resident": not args.swap_stages,
        "generate_options": {
            k: v
            for k, v in (("vram_budget", args.vram_budget), ("vae_tiles", args.vae_tiles))
            if v is not None
        },
        "limits": asdict(limits),
        "batching": not args.no_batching,
        "keep_images": args.keep_images,
    }


def run(args) -> int:
    config = config_from_args(args)
    if args.ray:
        from .ray_app import run_on_ray

        return run_on_ray(config, args.replicas, args.ray_address, args.host, args.port, quiet=args.quiet)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise missing_extra("serve", e) from None
    pipe = load_pipeline(config, progress=not args.quiet)
    app = create_app(pipe, serve_options(config))
    if not args.quiet:
        print(f"serving {config['model_name']} on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0
