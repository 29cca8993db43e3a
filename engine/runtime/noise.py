"""Initial latents: the documented seeded generator, or a user's .npy (to reproduce a diffusers run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError


def initial_noise(seed: int, height: int, width: int, channels: int = 4) -> np.ndarray:
    """Documented generator: numpy PCG64 standard normal, float32, shape (1, C, H/8, W/8)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.standard_normal((1, channels, height // 8, width // 8), dtype=np.float32)


def load_noise(path: str | Path, height: int, width: int) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: noise file not found") from None
    except ValueError as e:
        raise UserError(f"{path}: not a plain .npy array ({e})") from None
    want = (1, 4, height // 8, width // 8)
    if a.shape != want:
        raise UserError(f"{path}: noise has shape {a.shape}, expected {want} for {width}x{height}")
    if not np.isfinite(a).all():
        raise UserError(f"{path}: noise contains non-finite values")
    return a.astype(np.float32)
