"""Writing images: PNG with the generation parameters in a text chunk, written atomically."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ..errors import UserError


def to_uint8(image: np.ndarray) -> np.ndarray:
    """VAE output (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, as diffusers' image processor."""
    x = np.clip(image / 2 + 0.5, 0, 1)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def to_pil(image: np.ndarray) -> Image.Image:
    """(H, W, 3) uint8 -> PIL image."""
    return Image.fromarray(np.ascontiguousarray(image), mode="RGB")


def png_bytes(image: Image.Image, parameters: dict | None = None) -> bytes:
    """The PNG file ``save_png`` writes, as bytes (the server sends these)."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", json.dumps(parameters, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, path: str | Path, parameters: dict | None = None) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"{path}: output must be a .png file")
    if not path.parent.exists():
        raise UserError(f"{path.parent}: output folder does not exist")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(png_bytes(image, parameters))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
