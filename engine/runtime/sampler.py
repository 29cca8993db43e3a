"""Euler flow sampler with classifier-free guidance, in numpy float32.

The transformer is any callable ``model(latents, context, step) -> velocity`` taking and returning
float32 numpy arrays; ``step`` is the step index into the schedule (backends with a folded
modulation look their table row up by it, others read ``schedule.timesteps[step]``). Every backend
exposes that call, so this loop never branches on the backend.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import UserError
from .schedule import Schedule

Transformer = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def denoise(
    model: Transformer,
    latents: np.ndarray,
    context: np.ndarray,
    schedule: Schedule,
    guidance: float,
    uncond_context: np.ndarray | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """latents (1, C, h, w) float32; context (1, L, D); CFG batch is [uncond, cond]."""
    if not np.isfinite(guidance):
        raise UserError(f"guidance must be a finite number, got {guidance}")
    x = np.ascontiguousarray(latents, dtype=np.float32)
    cfg = uncond_context is not None
    ctx = np.concatenate([uncond_context, context], axis=0) if cfg else context
    g = np.float32(guidance)
    for i in range(schedule.steps):
        inp = np.concatenate([x, x], axis=0) if cfg else x
        v = np.asarray(model(inp, ctx, i), dtype=np.float32)
        if cfg:
            vu, vc = v[: x.shape[0]], v[x.shape[0] :]
            v = vu + g * (vc - vu)
        dt = schedule.sigmas[i + 1] - schedule.sigmas[i]
        x = (x + dt * v).astype(np.float32)
        if progress is not None:
            progress(i + 1, schedule.steps)
    return x
