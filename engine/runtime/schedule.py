"""Flow-matching sigmas, bit-exact to diffusers' FlowMatchEulerDiscreteScheduler (numpy only).

diffusers computes ``sigma_min`` at construction as shift(1/1000) in float32, builds the inference
timesteps with a float64 linspace down to 1000*sigma_min and shifts them again: the last sigma is
shifted twice. We reproduce that on purpose (``double_shift_last=True``) for parity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError

NUM_TRAIN_TIMESTEPS = 1000


def _shift(s, shift):
    return shift * s / (1 + (shift - 1) * s)


@dataclass(frozen=True)
class Schedule:
    sigmas: np.ndarray  # (N+1,) float32, last is 0
    timesteps: np.ndarray  # (N,) float32, what the transformer receives (t/1000)

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def flow_match_schedule(steps: int, shift: float = 1.73, double_shift_last: bool = True) -> Schedule:
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"steps must be an integer >= 1, got {steps!r}")
    n = NUM_TRAIN_TIMESTEPS
    train = np.linspace(1, n, n, dtype=np.float32)[::-1] / np.float32(n)
    train = _shift(train, float(shift)).astype(np.float32)  # python scalar: cast like torch
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    if not double_shift_last:
        sigma_min = float(np.float32(1.0 / n))
    t = np.linspace(sigma_max * n, sigma_min * n, steps)  # float64, as diffusers
    sig = _shift(t / n, shift).astype(np.float32)
    timesteps = (sig * np.float32(n)).astype(np.float32)
    sigmas = np.concatenate([sig, np.zeros(1, np.float32)])
    return Schedule(sigmas=sigmas, timesteps=(timesteps / np.float32(n)).astype(np.float32))
