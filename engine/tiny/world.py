"""The world the tiny AuraFlow is trained on: one solid shape on a solid background.

Prompt: ``a {color} {shape} {where} on a {background} background``. Eight named colors (object and
background differ), three shapes (circle, square, isosceles triangle pointing up) whose bounding
box side is 0.4 of the image side, five positions for the box centre. Size and position jitter by
up to 5% of that side (10% is allowed; with it the tiny transformer drew squares with rounded
corners that read as circles, see docs/tiny-world.md; the grader reads 10% right too). The renderer
draws at 4x and box-filters down (anti-aliased); everything is deterministic from a seed.
``HELD_OUT`` lists the (color, shape, background) triples that training never sees, so that
adherence on them measures composition rather than memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (240, 130, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# box centre as a fraction of (width, height)
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}
SIDE = 0.4  # bounding-box side / image side
JITTER = 0.05  # size and position jitter, as a fraction of the box side

# 17 of the 168 (color, shape, background) triples (about 10%), drawn once with random.Random(19)
# such that every color, shape and background, and every pair of each held-out triple, still
# occurs in training. Fixed: tests and published numbers rely on it.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("black", "circle", "blue"),
    ("black", "circle", "orange"),
    ("blue", "square", "yellow"),
    ("green", "circle", "black"),
    ("green", "square", "yellow"),
    ("green", "triangle", "yellow"),
    ("orange", "circle", "red"),
    ("purple", "circle", "orange"),
    ("purple", "triangle", "blue"),
    ("red", "square", "orange"),
    ("white", "circle", "purple"),
    ("white", "square", "blue"),
    ("white", "square", "red"),
    ("yellow", "circle", "purple"),
    ("yellow", "circle", "white"),
    ("yellow", "square", "orange"),
    ("yellow", "triangle", "black"),
)
ALL_TRIPLES = tuple((c, s, b) for c in COLORS for s in SHAPES for b in COLORS if b != c)
TRAIN_TRIPLES = tuple(t for t in ALL_TRIPLES if t not in set(HELD_OUT))
ATTRIBUTES = ("color", "shape", "where", "background")


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    where: str
    background: str
    size: float = 1.0  # box side / (SIDE * image side)
    dx: float = 0.0  # box centre offset, in box sides
    dy: float = 0.0

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} {self.where} on a {self.background} background"

    def attributes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


def parse_prompt(text: str) -> Scene | None:
    """The scene a prompt of the world describes (no jitter), or None for any other text."""
    words = text.strip().lower().rstrip(".").split()
    if len(words) < 8 or words[0] != "a" or words[-1] != "background" or words[-4:-2] != ["on", "a"]:
        return None
    color, shape, where, background = words[1], words[2], " ".join(words[3:-4]), words[-2]
    if color not in COLORS or background not in COLORS or color == background:
        return None
    if shape not in SHAPES or where not in POSITIONS:
        return None
    return Scene(color, shape, where, background)


def random_scene(rng: np.random.Generator, split: str = "train", jitter: bool = True) -> Scene:
    """A scene whose triple is in ``split`` ("train", "held_out" or "all"), position uniform."""
    triples = {"train": TRAIN_TRIPLES, "held_out": HELD_OUT, "all": ALL_TRIPLES}[split]
    c, s, b = triples[rng.integers(len(triples))]
    where = list(POSITIONS)[rng.integers(len(POSITIONS))]
    if not jitter:
        return Scene(c, s, where, b)
    size, dx, dy = rng.uniform(-JITTER, JITTER, 3)
    return Scene(c, s, where, b, 1.0 + float(size), float(dx), float(dy))


def scene_set(n: int, split: str, seed: int) -> list[Scene]:
    """``n`` seeded scenes: the evaluation sets are ``scene_set(200, "train", 0)`` (held-in) and
    ``scene_set(n, "held_out", 1)``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return [random_scene(rng, split) for _ in range(n)]


def render(scene: Scene, side: int = 64, supersample: int = 4) -> np.ndarray:
    """(side, side, 3) uint8 sRGB, anti-aliased by drawing at ``supersample`` x and box-filtering."""
    big = side * supersample
    img = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[scene.where]
    box = SIDE * big * scene.size
    cx, cy = fx * big + scene.dx * SIDE * big, fy * big + scene.dy * SIDE * big
    x0, y0, x1, y1 = cx - box / 2, cy - box / 2, cx + box / 2, cy + box / 2
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    return np.asarray(img.resize((side, side), Image.Resampling.BOX))
