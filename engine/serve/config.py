"""A server's configuration as plain data (it travels to Ray replicas), and what it builds: the
loaded pipeline and the app's ``ServeOptions``."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .requests import Limits


def default_model_name(model: str) -> str:
    p = Path(model)
    return p.name if p.exists() else model  # a hub id names itself


def load_pipeline(config: dict, progress: bool = True):
    """``Pipeline.load`` with the options of ``generate`` (so images equal the CLI's)."""
    from ..runtime.pipeline import Pipeline

    opts = {}
    if config["backend"] in ("auto", "torch"):
        opts["precision"] = config["precision"]
    if config.get("lora"):
        from ..model.lora import parse_lora_arg

        opts["loras"] = [parse_lora_arg(x) for x in config["lora"]]
    if config["generate_options"].get("vram_budget"):
        opts["vram_budget"] = config["generate_options"]["vram_budget"]
    pipe = Pipeline.load(
        config["model"],
        backend=config["backend"],
        device=config["device"],
        components=config["components"],
        revision=config["revision"],
        progress=progress,
        keep_resident=config["keep_resident"],
        **opts,
    )
    if config["keep_resident"]:  # load the three stages now, not in the first client's request
        h, w = pipe.default_size()
        pipe.generate("warm-up", steps=1, height=h, width=w, **config["generate_options"])
    return pipe


def serve_options(config: dict, replica: str = ""):
    from .app import ServeOptions

    return ServeOptions(
        model_name=config["model_name"],
        limits=Limits(**config["limits"]),
        batching=config["batching"],
        replica=replica,
        keep_images=config["keep_images"],
        generate_options=config["generate_options"],
    )


def missing_extra(extra: str, e: ImportError) -> UserError:
    return UserError(f"{e.name or e} is not installed: `pip install 'auraflow-edge[{extra}]'`")
