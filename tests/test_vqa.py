"""The synthetic VQA of the micro-world: answers agree with the pixels, seeds split train / held-out."""

from __future__ import annotations

import numpy as np
import pytest

from hasten.tiny import gui
from hasten.tiny.vqa import (
    COLORS,
    GUI_QUESTIONS,
    HELD_OUT_SEED,
    PLACES,
    SCENE_QUESTIONS,
    Scene,
    SceneObject,
    gui_sample,
    held_out,
    render_scene,
    samples,
    scene_sample,
)


def _cell_pixels(image, cell: int) -> np.ndarray:
    side = image.size[0] // 3
    row, col = divmod(cell, 3)
    return np.asarray(image)[row * side : (row + 1) * side, col * side : (col + 1) * side].reshape(-1, 3)


def test_samples_are_deterministic_and_the_held_out_split_is_disjoint():
    a, b = scene_sample(5), scene_sample(5)
    assert (a.question, a.answer, a.truth) == (b.question, b.answer, b.truth)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    test = held_out("scene", 10)
    assert all(s.seed >= HELD_OUT_SEED for s in test)
    assert [s.kind for s in test] == list(SCENE_QUESTIONS) * 2  # balanced
    assert [s.kind for s in held_out("gui", 3)] == list(GUI_QUESTIONS)
    assert len({s.question + s.answer for s in samples("scene", 0, 40)}) > 20


@pytest.mark.parametrize("seed", range(12))
def test_answers_are_in_the_pixels(seed):
    colour = scene_sample(seed, kind="color")
    cell = PLACES.index(colour.question.split("at the ")[1].rstrip("?"))
    pixels = _cell_pixels(colour.images[0], cell)
    assert (pixels == COLORS[colour.answer]).all(-1).sum() >= 9  # the named cell holds that colour
    count = scene_sample(seed, kind="count")
    drawn = {name for name, rgb in COLORS.items() if (np.asarray(count.images[0]) == rgb).all(-1).any()}
    assert drawn == {obj.color for obj in count.truth.objects}
    assert count.answer == str(len(count.truth.objects))
    relation = scene_sample(seed, kind="relation")
    scene = relation.truth
    words = relation.question[len("What color is the shape ") : -1]
    rel, ref_shape = words.rsplit(" the ", 1)
    ref = next(o for o in scene.objects if o.shape == ref_shape)
    dr, dc = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}[rel]
    row, col = divmod(ref.cell, 3)
    assert scene.at(3 * (row + dr) + col + dc).color == relation.answer
    assert len({o.shape for o in scene.objects}) == len(scene.objects)  # "the triangle" names one object


@pytest.mark.parametrize("seed", range(6))
def test_a_description_names_each_drawn_object_in_reading_order(seed):
    sample = scene_sample(seed, kind="describe")
    parts = sample.answer.split(" and ")
    objects = sorted(sample.truth.objects, key=lambda obj: obj.cell)
    assert sample.question == "Describe the picture." and len(parts) == len(objects)
    for part, obj in zip(parts, objects):
        size, colour, shape, place = part.removeprefix("a ").split(" ", 3)
        assert (colour, shape, place) == (obj.color, obj.shape, "at the " + PLACES[obj.cell])
        assert size == ("large" if obj.large else "small")
        pixels = _cell_pixels(sample.images[0], obj.cell)  # the named cell holds that colour
        assert (pixels == COLORS[colour]).all(-1).sum() >= 9
    assert "describe" not in SCENE_QUESTIONS  # asked by name only: random draws stay as they were


def test_the_code_is_drawn_in_its_cell_and_changes_with_the_answer():
    one = Scene((SceneObject("circle", "red", 0, True),), code="18", code_cell=4)
    other = Scene((SceneObject("circle", "red", 0, True),), code="70", code_cell=4)
    a, b = render_scene(one), render_scene(other)
    ink = (_cell_pixels(a, 4) == (20, 20, 20)).all(-1)
    assert 10 <= ink.sum() <= 35  # a 7 x 5 label, in the code's cell only
    assert not (np.asarray(a) == (20, 20, 20)).all(-1).sum() > ink.sum()
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert scene_sample(3, kind="code").answer == scene_sample(3, kind="code").truth.code


@pytest.mark.parametrize("seed", range(6))
def test_gui_questions_are_about_an_earlier_screenshot(seed):
    for kind in GUI_QUESTIONS:
        sample = gui_sample(seed, kind=kind, steps=3)
        index = int(sample.question.split("screenshot ")[1].split(",")[0]) - 1
        assert 0 <= index < 2  # never the current (last) screenshot
        state = sample.truth[index]
        expected = {
            "menu": "yes" if state.menu_open else "no",
            "check": "yes" if state.checked else "no",
            "row": "none" if state.selected_row < 0 else str(state.selected_row + 1),
        }[kind]
        assert sample.answer == expected
        assert len(sample.images) == 3 and sample.images[0].size == (64, 48)


def test_gui_states_replay_the_trajectory():
    shots, _ = gui.trajectory(steps=4, size=(80, 60), seed=3)
    for shot, state in zip(shots, gui.states(4, seed=3)):
        assert np.array_equal(np.asarray(shot), np.asarray(gui.render(state, (80, 60))))


def test_bad_inputs():
    with pytest.raises(ValueError, match="kind"):
        scene_sample(0, kind="size")
    with pytest.raises(ValueError, match="kind"):
        gui_sample(0, kind="color")
    with pytest.raises(ValueError, match="steps"):
        gui_sample(0, steps=1)
    with pytest.raises(ValueError, match="size"):
        render_scene(scene_sample(0).truth, size=12)
    with pytest.raises(ValueError, match="task"):
        list(samples("video", 0, 1))
