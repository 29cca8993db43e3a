"""The shapes world: prompts, held-out triples, renderer geometry, and the grader on the renderer."""

import numpy as np
import pytest

from auraflow_edge.engine.tiny import grader, world
from auraflow_edge.engine.tiny.world import COLORS, HELD_OUT, POSITIONS, SHAPES, Scene


def test_held_out_triples_are_a_tenth_and_each_part_is_seen_in_training():
    assert len(world.ALL_TRIPLES) == 8 * 7 * 3
    assert len(set(HELD_OUT)) == len(HELD_OUT) == 17
    train = set(world.TRAIN_TRIPLES)
    assert set(HELD_OUT) <= set(world.ALL_TRIPLES) and not set(HELD_OUT) & train
    for c, s, b in HELD_OUT:
        assert c != b
        assert any((c2, s2) == (c, s) for c2, s2, _ in train)
        assert any((s2, b2) == (s, b) for _, s2, b2 in train)
        assert any((c2, b2) == (c, b) for c2, _, b2 in train)
    rng = np.random.default_rng(0)
    assert all(
        (sc.color, sc.shape, sc.background) in train for sc in (world.random_scene(rng) for _ in range(500))
    )


def test_prompt_round_trip():
    s = Scene("purple", "triangle", "at the bottom", "yellow", 1.07, 0.05, -0.1)
    assert s.prompt == "a purple triangle at the bottom on a yellow background"
    assert world.parse_prompt(s.prompt) == Scene("purple", "triangle", "at the bottom", "yellow")
    assert world.parse_prompt("A red circle in the center on a black background.").color == "red"
    for other in (
        "a photo of a cat",
        "a red circle in the center on a red background",
        "a red blob on the left on a blue background",
    ):
        assert world.parse_prompt(other) is None


def test_scene_sets_are_seeded_and_split():
    a, b = world.scene_set(50, "held_out", 1), world.scene_set(50, "held_out", 1)
    assert a == b and a != world.scene_set(50, "held_out", 2)
    assert all((s.color, s.shape, s.background) in HELD_OUT for s in a)
    assert all(abs(s.size - 1) <= 0.1 and abs(s.dx) <= 0.1 and abs(s.dy) <= 0.1 for s in a)


@pytest.mark.parametrize("shape,area", [("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)])
def test_render_geometry_and_antialiasing(shape, area):
    """Coverage-weighted area and centre against the analytic shape, in float64."""
    side, size, dx, dy = 64, 1.05, 0.08, -0.06
    s = Scene("white", shape, "on the right", "black", size, dx, dy)
    img = world.render(s, side).astype(np.float64)
    assert img.shape == (side, side, 3)
    cover = (img[..., 0] - 20) / (245 - 20)  # 0 background .. 1 object
    box = 0.4 * side * size
    assert cover.sum() == pytest.approx(area * box**2, rel=0.02)
    assert ((cover > 0.05) & (cover < 0.95)).sum() > 20  # anti-aliased edge
    ys, xs = np.nonzero(cover > 0.5)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    assert cx == pytest.approx(side * (0.75 + dx * 0.4), abs=1.0)  # offsets are in unjittered box sides
    assert cy == pytest.approx(side * (0.5 + dy * 0.4), abs=1.0)
    np.testing.assert_array_equal(world.render(s, side), world.render(s, side))


def test_grader_reads_every_unjittered_scene():
    for c in COLORS:
        for b in COLORS:
            if b == c:
                continue
            for sh in SHAPES:
                for w in POSITIONS:
                    s = Scene(c, sh, w, b)
                    assert grader.read_image(world.render(s)) == s.attributes(), s


@pytest.mark.parametrize("jitter", [world.JITTER, 0.1])  # the world's, and the most the issue allows
def test_grader_reads_jittered_scenes_all_right(monkeypatch, jitter):
    monkeypatch.setattr(world, "JITTER", jitter)
    scenes = world.scene_set(400, "all", 7)
    assert max(abs(s.size - 1) for s in scenes) > 0.9 * jitter
    grades = [grader.grade(s, world.render(s)) for s in scenes]
    assert grader.accuracy(grades) == {
        "all": 1.0,
        "color": 1.0,
        "shape": 1.0,
        "where": 1.0,
        "background": 1.0,
    }


def test_grader_notices_wrong_images():
    s = Scene("red", "circle", "on the left", "blue")
    moved = world.render(Scene("red", "circle", "on the right", "blue"))
    assert grader.grade(s, moved) == {"color": True, "shape": True, "where": False, "background": True}
    other = world.render(Scene("orange", "triangle", "on the left", "green"))
    assert grader.grade(s, other) == {"color": False, "shape": False, "where": True, "background": False}
    empty = np.full((64, 64, 3), COLORS["blue"], np.uint8)
    assert grader.read_image(empty) == {"color": None, "shape": None, "where": None, "background": "blue"}
    assert grader.accuracy([grader.grade(s, moved), grader.grade(s, world.render(s))])["all"] == 0.5
