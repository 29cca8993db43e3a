"""Reads a world image back into its attributes, with fixed rules and no learned parts.

Background: median of the border pixels, to the nearest named color. Object: pixels far from the
background; its color is their median, to the nearest named color other than the background; the
mask is then refined to the pixels nearer that color than the background (the half-way line, so an
anti-aliased edge counts half). Position: the centre of the mask's bounding box, to the nearest of
the five (the box centre, not the centroid: a triangle's centroid sits a sixth of its height below
its box centre). Shape: the fill ratio of the mask in its bounding box (square 1, circle pi/4,
triangle 1/2).
"""

from __future__ import annotations

import numpy as np

from .world import ATTRIBUTES, COLORS, POSITIONS, Scene

_NAMES = list(COLORS)
_RGB = np.array([COLORS[n] for n in _NAMES], np.float64)  # (8, 3)
MIN_OBJECT_DISTANCE = 40.0  # RGB distance from the background that surely is not background
MIN_FILL = {"triangle": 0.0, "circle": 0.64, "square": 0.9}  # fill ratio thresholds, ascending


def nearest_color(rgb, exclude: str | None = None) -> str:
    d = np.linalg.norm(_RGB - np.asarray(rgb, np.float64), axis=1)
    if exclude is not None:
        d[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(d))]


def read_image(image) -> dict[str, str | None]:
    """Attributes read from an (H, W, 3) uint8 image; None for any that cannot be read (no object)."""
    img = np.asarray(image, np.float64)[..., :3]
    h, w = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = nearest_color(np.median(border, axis=0))
    bg = _RGB[_NAMES.index(background)]
    far = np.linalg.norm(img - bg, axis=-1) > MIN_OBJECT_DISTANCE
    out: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    out["background"] = background
    if far.sum() < 4:
        return out
    color = nearest_color(np.median(img[far], axis=0), exclude=background)
    fg = _RGB[_NAMES.index(color)]
    # position along background -> object color; > 0.5 is object
    t = ((img - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
    mask = t > 0.5
    # rows / columns with at least 2 object pixels: a stray pixel does not stretch the box
    rows, cols = np.flatnonzero(mask.sum(1) >= 2), np.flatnonzero(mask.sum(0) >= 2)
    if len(rows) == 0 or len(cols) == 0:
        return out
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    fill = mask[y0:y1, x0:x1].sum() / ((y1 - y0) * (x1 - x0))
    shape = [s for s, lo in MIN_FILL.items() if fill >= lo][-1]
    cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
    where = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    out.update(color=color, shape=shape, where=where)
    return out


def grade(scene: Scene, image) -> dict[str, bool]:
    """Per attribute: did the image show what the scene asked for."""
    got = read_image(image)
    return {a: got[a] == getattr(scene, a) for a in ATTRIBUTES}


def accuracy(grades: list[dict[str, bool]]) -> dict[str, float]:
    """Fraction with every attribute right ("all") and per attribute."""
    n = max(len(grades), 1)
    acc = {"all": sum(all(g.values()) for g in grades) / n}
    acc.update({a: sum(g[a] for g in grades) / n for a in ATTRIBUTES})
    return acc
