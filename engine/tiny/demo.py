"""`auraflow-edge demo`: the shipped trained tiny AuraFlow draws prompts of the shapes world.

Writes the pipeline folder, draws each prompt (64x64, torch fp32 on the CPU), reads every image
back with the grader and writes one grid: each image at 2x, what was asked above it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .grader import read_image
from .world import Scene, parse_prompt

# two held-in and two held-out triples (yellow triangle on black, white square on red)
PROMPTS = [
    "a red circle on the left on a blue background",
    "a green square at the top on a white background",
    "a yellow triangle in the center on a black background",
    "a white square at the bottom on a red background",
]


def describe(read: dict) -> str:
    """The grader's reading as a prompt of the world ("?" where nothing was found)."""
    r = {k: v or "?" for k, v in read.items()}
    return f"a {r['color']} {r['shape']} {r['where']} on a {r['background']} background"


def grid(images: list[np.ndarray], labels: list[str], scale: int = 2):
    from PIL import Image, ImageDraw

    side = images[0].shape[0] * scale
    canvas = Image.new("RGB", (side * len(images), side + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (im, label) in enumerate(zip(images, labels)):
        canvas.paste(Image.fromarray(im).resize((side, side), Image.Resampling.NEAREST), (i * side, 14))
        draw.text((i * side + 2, 1), label, fill="black")
    return canvas


def run(
    root: str | Path,
    prompts: list[str] | None = None,
    steps: int = 20,
    guidance: float = 3.5,
    seed: int = 0,
    say=print,
) -> Path:
    """Draw ``prompts`` (default: PROMPTS) with seeds seed, seed+1, ...; returns the grid's path."""
    from ..runtime.image import save_png
    from ..runtime.pipeline import Pipeline
    from .weights import write_pipeline

    root = Path(root)
    folder = root / "tiny-world"
    if not (folder / "model_index.json").exists():
        write_pipeline(folder)
    say(f"model: {folder}")
    prompts = prompts or PROMPTS
    pipe = Pipeline.load(folder, backend="torch", precision="fp32", device="cpu", progress=False)
    results = pipe.generate_many(prompts, steps=steps, guidance=guidance, seed=seed, height=64, width=64)
    images, labels = [], []
    for p, r in zip(prompts, results):
        img = np.asarray(r.image)
        read = read_image(img)
        asked: Scene | None = parse_prompt(p)
        if asked is None:
            verdict = "(not a prompt of the world)"
        else:
            wrong = [a for a, v in asked.attributes().items() if read[a] != v]
            verdict = "all right" if not wrong else "wrong: " + ", ".join(wrong)
        say(f"{p!r} (seed {r.parameters['seed']}) -> grader read: {describe(read)} [{verdict}]")
        images.append(img)
        labels.append(" ".join(p.split()[1:3]) if asked else p[:14])
    out = save_png(
        grid(images, labels), root / "demo.png", {"prompts": prompts, "steps": steps, "seed": seed}
    )
    return out
