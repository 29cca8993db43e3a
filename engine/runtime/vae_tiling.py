"""Tiled VAE decode: overlapping latent tiles, decoded one at a time, seams blended linearly.

Peak decoder memory scales with the tile, not the image. The blend weights are linear ramps over
the overlap (separable in y and x), normalised by their sum, so a decoder whose output pixel
depends only on nearby latents gives exactly the untiled image; the SDXL VAE's mid-block attention
is global, so there the result differs slightly (measured and bounded in the tests).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

UPSCALE = 8


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of length ``tile`` covering [0, size) with at least ``overlap`` shared."""
    if tile >= size:
        return [0]
    step = tile - overlap
    n = -(-(size - overlap) // step)  # ceil
    starts = [round(i * (size - tile) / (n - 1)) for i in range(n)] if n > 1 else [0]
    return sorted(set(starts))


def _ramp(length: int, lo_overlap: int, hi_overlap: int) -> np.ndarray:
    w = np.ones(length, np.float32)
    if lo_overlap > 0:
        w[:lo_overlap] = (np.arange(lo_overlap, dtype=np.float32) + 0.5) / lo_overlap
    if hi_overlap > 0:
        w[length - hi_overlap :] = np.minimum(
            w[length - hi_overlap :], (np.arange(hi_overlap, 0, -1, dtype=np.float32) - 0.5) / hi_overlap
        )
    return w


def tiles_for(n_per_side: int, h: int, w: int, overlap: int) -> tuple[int, int]:
    """Latent tile size (th, tw) giving about ``n_per_side`` tiles per side with the overlap."""
    th = min(h, -(-(h + (n_per_side - 1) * overlap) // n_per_side))
    tw = min(w, -(-(w + (n_per_side - 1) * overlap) // n_per_side))
    return th, tw


def decode_tiled(
    decode: Callable[[np.ndarray], np.ndarray],
    z: np.ndarray,
    tiles_per_side: int = 2,
    overlap: int = 8,
) -> np.ndarray:
    """z (1, C, h, w) already divided by the scaling factor -> decoder output (1, 3, 8h, 8w)."""
    _, _, h, w = z.shape
    if tiles_per_side <= 1:
        return decode(z)
    overlap = min(overlap, h // 2, w // 2)
    th, tw = tiles_for(tiles_per_side, h, w, overlap)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    out = np.zeros((1, 3, h * UPSCALE, w * UPSCALE), np.float32)
    wsum = np.zeros((h * UPSCALE, w * UPSCALE), np.float32)
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            tile = decode(np.ascontiguousarray(z[:, :, y0 : y0 + th, x0 : x0 + tw])).astype(np.float32)
            # overlaps with the previous / next tile along each axis, in pixels
            oy0 = (ys[iy - 1] + th - y0) * UPSCALE if iy > 0 else 0
            oy1 = (y0 + th - ys[iy + 1]) * UPSCALE if iy + 1 < len(ys) else 0
            ox0 = (xs[ix - 1] + tw - x0) * UPSCALE if ix > 0 else 0
            ox1 = (x0 + tw - xs[ix + 1]) * UPSCALE if ix + 1 < len(xs) else 0
            wy = _ramp(th * UPSCALE, oy0, oy1)
            wx = _ramp(tw * UPSCALE, ox0, ox1)
            wt = wy[:, None] * wx[None, :]
            py, px = y0 * UPSCALE, x0 * UPSCALE
            out[:, :, py : py + th * UPSCALE, px : px + tw * UPSCALE] += tile * wt
            wsum[py : py + th * UPSCALE, px : px + tw * UPSCALE] += wt
    return out / wsum
