"""Limits and the checks every generation request passes before it is queued.

Both APIs turn their body into the same ``Job``; each check raises ``BadRequest`` with a sentence
the client can act on and the name of the offending field.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..errors import UserError
from .batcher import Job, Settings

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    max_images: int = 8  # per request (OpenAI n, A1111 batch_size * n_iter)
    max_side: int = 2048  # pixels, each of width and height
    max_steps: int = 150
    max_queue: int = 64  # images waiting; past it: 503
    max_body: int = 1 << 20  # bytes of request body; past it: 413
    max_prompt: int = 10_000  # characters
    max_batch: int = 8  # images in one stage-major generate_many call


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def _type(v) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object", type(None): "null"}.get(
        type(v), type(v).__name__
    )


def integer(body: dict, key: str, default, lo: int, hi: int | None = None, what: str | None = None) -> int:
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadRequest(f"{key} must be an integer, got {_type(v)}", key, code="invalid_type")
    if v < lo or (hi is not None and v > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise BadRequest(f"{key} must be {rng}{what or ''}, got {v}", key, code="out_of_range")
    return v


def number(body: dict, key: str, default: float, lo: float = 0.0) -> float:
    v = body.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadRequest(f"{key} must be a number, got {_type(v)}", key, code="invalid_type")
    if not math.isfinite(v) or v < lo:
        raise BadRequest(f"{key} must be a finite number >= {lo:g}, got {v}", key, code="out_of_range")
    return float(v)


def text(body: dict, key: str, limits: Limits, required: bool = False) -> str:
    v = body.get(key)
    if v is None:
        if required:
            raise BadRequest(f"{key} is required: describe the image to draw", key, code="missing")
        return ""
    if not isinstance(v, str):
        raise BadRequest(f"{key} must be a string, got {_type(v)}", key, code="invalid_type")
    if len(v) > limits.max_prompt:
        raise BadRequest(
            f"{key} is {len(v)} characters; this server takes at most {limits.max_prompt}",
            key,
            code="too_long",
        )
    if required and not v.strip():
        raise BadRequest(f"{key} is empty: describe the image to draw", key, code="empty")
    return v


def seed(body: dict, key: str, default=None) -> int:
    """-1 or absent: a random seed (reported back); otherwise 0 <= seed <= 2**63 - 1."""
    v = body.get(key, default)
    if v is None or (v == -1 and not isinstance(v, bool)):
        return random.randrange(2**32)
    return integer(body, key, None, 0, MAX_SEED, " (or -1 for a random seed)")


def check_shape(pipe, limits: Limits, height: int, width: int, param: str) -> None:
    """Size checks of the pipeline itself (multiple of 16, positional grid, engine profile) and ours."""
    for name, v in (("width", width), ("height", height)):
        if v > limits.max_side:
            raise BadRequest(
                f"{name} {v} is larger than this server's limit of {limits.max_side} px",
                param,
                code="too_large",
            )
    from ..model.config import check_latent_size, check_size

    try:
        check_size(height, width)
        check_latent_size(pipe.cfg, height // 8, width // 8)
        pipe.stages.check_shape(height, width)
    except UserError as e:
        raise BadRequest(str(e), param, code="invalid_size") from None


def make_job(
    pipe,
    limits: Limits,
    prompt: str,
    negative_prompt: str,
    steps: int,
    guidance: float,
    height: int,
    width: int,
    seed: int,
    images: int,
) -> Job:
    if seed + images - 1 > MAX_SEED:
        raise BadRequest(f"seed {seed} + {images} images passes the largest seed {MAX_SEED}", "seed")
    return Job(
        prompt, [seed + i for i in range(images)], Settings(negative_prompt, steps, guidance, height, width)
    )
