"""Synthetic visual question answering: scenes and GUI trajectories with questions whose answers
live in small image regions.

Every sample comes from one integer seed, so tests, training and evaluation share the data, and
the held-out split is a seed range training never draws from (:data:`HELD_OUT_SEED` and up).

Scenes (:func:`scene_sample`): a square canvas divided into a 3 x 3 grid of named places
("top left", "top", ..., "bottom right"); 1 to 4 objects with distinct shapes (circle, square,
triangle, cross) in random colours and sizes sit in distinct cells, and half of the scenes also
carry a two-digit code drawn with a 3 x 5 pixel font in a free cell. Question types
(:data:`SCENE_QUESTIONS`):

===========  ==================================================  =====================
type         question                                            answer lives in
===========  ==================================================  =====================
``color``    What color is the shape at the top left?            one cell
``shape``    What shape is at the center?                        one cell
``count``    How many shapes are there?                          every object
``relation`` What color is the shape left of the triangle?       two neighbouring cells
``code``     What is the code?                                   one cell, 7 x 5 pixels
===========  ==================================================  =====================

GUI trajectories (:func:`gui_sample`): ``steps`` screenshots of one agent episode
(:mod:`hasten.tiny.gui`), and a question about an EARLIER screenshot's state (was the menu
open, which row was selected, was the box checked): what a KV-cache compressor such as GUI-KV
must keep while the current screenshot looks different.

These scenes are drawn here rather than by :mod:`hasten.tiny.scenes` on purpose: the questions
need a code label drawn with a pixel font, distinct shapes within a scene (so "the triangle"
names one object) and pixel-exact, non-anti-aliased shapes at 36 px, where three cells of 12 px
are three patch rows of the tiny LLaVA.

Examples
--------
>>> sample = scene_sample(3, kind="color")
>>> sample.images[0].size, sample.question.startswith("What color"), sample.answer in COLORS
((36, 36), True, True)
>>> gui = gui_sample(5)
>>> len(gui.images), gui.answer in ("yes", "no", "none", "1", "2", "3", "4")
(3, True)
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from PIL import Image, ImageDraw

from .._validation import check_int
from .gui import GUIState, render, states

__all__ = [
    "COLORS",
    "GUI_QUESTIONS",
    "HELD_OUT_SEED",
    "OPEN_QUESTIONS",
    "PLACES",
    "SCENE_QUESTIONS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "VQASample",
    "describe",
    "gui_sample",
    "held_out",
    "make_scene",
    "render_scene",
    "samples",
    "scene_sample",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
}
"""Object colours (names are one token each in the tiny tokenizer)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLACES: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
"""The 3 x 3 grid's cells, row-major."""

SCENE_QUESTIONS: tuple[str, ...] = ("color", "shape", "count", "relation", "code")
OPEN_QUESTIONS: tuple[str, ...] = ("describe",)
"""Scene questions with long answers ("Describe the picture." -> every object, in reading order):
what speculative decoding needs. Asked only by name (never drawn when ``kind`` is None)."""
GUI_QUESTIONS: tuple[str, ...] = ("menu", "row", "check")

HELD_OUT_SEED = 1_000_000_000
"""Seeds from here on are the held-out split; training draws seeds below it."""

_BACKGROUND = (235, 235, 235)
_INK = (20, 20, 20)
_RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0), "below": (1, 0)}
# 3 x 5 digit glyphs, one string of 15 bits per digit, row-major.
_DIGITS = (
    "111101101101111",
    "010110010010111",
    "111001111100111",
    "111001111001111",
    "101101111001001",
    "111100111001111",
    "111100111101111",
    "111001001001001",
    "111101111101111",
    "111101111001111",
)


@dataclass(frozen=True)
class SceneObject:
    """One object: ``shape`` and ``color`` names, grid ``cell`` (0..8, row-major), ``large`` or small."""

    shape: str
    color: str
    cell: int
    large: bool

    @property
    def place(self) -> str:
        return PLACES[self.cell]


@dataclass(frozen=True)
class Scene:
    """Ground truth of one scene: its objects, and the code (two digits) with its cell, if any."""

    objects: tuple[SceneObject, ...]
    code: str | None = None
    code_cell: int | None = None

    def at(self, cell: int) -> SceneObject | None:
        return next((o for o in self.objects if o.cell == cell), None)


@dataclass
class VQASample:
    """Images, a question, its answer, the question type and the seed it came from."""

    images: list[Image.Image]
    question: str
    answer: str
    kind: str
    seed: int
    truth: object = field(default=None, repr=False)


def make_scene(rng: random.Random, with_code: bool | None = None, max_objects: int = 4) -> Scene:
    """A random scene: 1 to ``max_objects`` (<= 4) objects with distinct shapes in distinct cells,
    and maybe a code."""
    check_int(max_objects, "max_objects", 1, len(SHAPES))
    count = rng.randint(1, max_objects)
    cells = rng.sample(range(9), count + 1)
    shapes = rng.sample(SHAPES, count)
    objects = tuple(
        SceneObject(shape, rng.choice(tuple(COLORS)), cell, rng.random() < 0.5) for shape, cell in zip(shapes, cells)
    )
    if with_code is None:
        with_code = rng.random() < 0.5
    if not with_code:
        return Scene(objects)
    return Scene(objects, f"{rng.randrange(10)}{rng.randrange(10)}", cells[-1])


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    colour = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif obj.shape == "square":
        draw.rectangle(box, fill=colour)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:  # cross
        w = max(1, (x1 - x0 + 1) // 3)
        draw.rectangle([x0 + w, y0, x1 - w, y1], fill=colour)
        draw.rectangle([x0, y0 + w, x1, y1 - w], fill=colour)


def _draw_code(image: Image.Image, code: str, cell_box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = cell_box
    left = (x0 + x1 + 1) // 2 - 3  # two 3-wide glyphs with a 1-pixel gap: 7 x 5
    top = (y0 + y1 + 1) // 2 - 2
    pixels = image.load()
    for index, digit in enumerate(code):
        glyph = _DIGITS[int(digit)]
        for bit in range(15):
            if glyph[bit] == "1":
                pixels[left + 4 * index + bit % 3, top + bit // 3] = _INK


def render_scene(scene: Scene, size: int = 36) -> Image.Image:
    """``scene`` drawn on a ``size`` x ``size`` canvas (cells of ``size // 3`` pixels)."""
    check_int(size, "size", 24, why="three cells of >= 8 pixels")
    image = Image.new("RGB", (size, size), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size // 3
    for obj in scene.objects:
        row, col = divmod(obj.cell, 3)
        margin = max(1, cell // 8) if obj.large else max(2, cell // 4)
        box = (col * cell + margin, row * cell + margin, (col + 1) * cell - 1 - margin, (row + 1) * cell - 1 - margin)
        _draw_object(draw, obj, box)
    if scene.code is not None:
        row, col = divmod(scene.code_cell, 3)
        _draw_code(image, scene.code, (col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1))
    return image


def _relation(scene: Scene, rng: random.Random) -> tuple[str, SceneObject] | None:
    """A (question, answer object) pair "What color is the shape <rel> the <shape>?", if any exists."""
    options = []
    for ref in scene.objects:
        row, col = divmod(ref.cell, 3)
        for name, (dr, dc) in _RELATIONS.items():
            r, c = row + dr, col + dc
            if 0 <= r < 3 and 0 <= c < 3 and (other := scene.at(3 * r + c)) is not None:
                options.append((f"What color is the shape {name} the {ref.shape}?", other))
    return rng.choice(options) if options else None


def describe(scene: Scene) -> str:
    """Every object of ``scene`` in reading order (row by row), with its size, colour, shape and place.

    Examples
    --------
    >>> describe(Scene((SceneObject("star", "blue", 4, False), SceneObject("circle", "red", 0, True))))
    'a large red circle at the top left and a small blue star at the center'
    """
    return " and ".join(
        f"a {'large' if obj.large else 'small'} {obj.color} {obj.shape} at the {obj.place}"
        for obj in sorted(scene.objects, key=lambda obj: obj.cell)
    )


def scene_sample(seed: int, kind: str | None = None, size: int = 36, max_objects: int = 4) -> VQASample:
    """The scene question of ``seed`` (its type drawn from :data:`SCENE_QUESTIONS` unless ``kind``),
    on a scene of 1 to ``max_objects`` objects (a relation needs 2).

    Examples
    --------
    >>> s = scene_sample(0, kind="count")
    >>> s.answer == str(len(s.truth.objects))
    True
    """
    if kind is not None and kind not in SCENE_QUESTIONS + OPEN_QUESTIONS:
        raise ValueError(f"`kind` must be one of {', '.join(SCENE_QUESTIONS + OPEN_QUESTIONS)} or None; got {kind!r}")
    if kind == "relation" and max_objects < 2:
        raise ValueError("`max_objects` must be >= 2 for a relation question")
    rng = random.Random(seed)
    kind = kind or rng.choice(
        SCENE_QUESTIONS if max_objects >= 2 else tuple(k for k in SCENE_QUESTIONS if k != "relation")
    )
    while True:  # redraw until the scene supports the question (a relation needs two neighbours)
        scene = make_scene(rng, with_code=True if kind == "code" else None, max_objects=max_objects)
        if kind == "color":
            obj = rng.choice(scene.objects)
            question, answer = f"What color is the shape at the {obj.place}?", obj.color
        elif kind == "shape":
            obj = rng.choice(scene.objects)
            question, answer = f"What shape is at the {obj.place}?", obj.shape
        elif kind == "count":
            question, answer = "How many shapes are there?", str(len(scene.objects))
        elif kind == "code":
            question, answer = "What is the code?", scene.code
        elif kind == "describe":
            question, answer = "Describe the picture.", describe(scene)
        else:
            found = _relation(scene, rng)
            if found is None:
                continue
            question, answer = found[0], found[1].color
        return VQASample([render_scene(scene, size)], question, answer, kind, seed, scene)


def gui_sample(seed: int, kind: str | None = None, steps: int = 3, size: tuple[int, int] = (64, 48)) -> VQASample:
    """A GUI question about an earlier screenshot of a ``steps``-screenshot trajectory.

    The question names the screenshot ("In screenshot 1, ..."), never the last (current) one;
    answers: ``yes``/``no`` (menu open, box checked) or the selected row ``1``-``4``/``none``.
    """
    if kind is not None and kind not in GUI_QUESTIONS:
        raise ValueError(f"`kind` must be one of {', '.join(GUI_QUESTIONS)} or None; got {kind!r}")
    check_int(steps, "steps", 2, why="a question needs an earlier screenshot")
    rng = random.Random(seed)
    kind = kind or rng.choice(GUI_QUESTIONS)
    warm_up = rng.randint(3, 8)  # actions before the first screenshot: earlier states vary too
    trajectory = states(warm_up + steps, seed=rng.randrange(2**31))[warm_up:]
    # Drawn at twice the size and downscaled: the widgets' state stays visible, the text blurs.
    images = [render(state, (2 * size[0], 2 * size[1])).resize(size, Image.BILINEAR) for state in trajectory]
    index = rng.randrange(steps - 1)
    state: GUIState = trajectory[index]
    if kind == "menu":
        question, answer = f"In screenshot {index + 1}, is the menu open?", "yes" if state.menu_open else "no"
    elif kind == "check":
        question, answer = f"In screenshot {index + 1}, is the box checked?", "yes" if state.checked else "no"
    else:
        question = f"In screenshot {index + 1}, which row is selected?"
        answer = "none" if state.selected_row < 0 else str(state.selected_row + 1)
    return VQASample(images, question, answer, kind, seed, copy.deepcopy(trajectory))


def samples(task: str, start: int, count: int, kinds: Sequence[str] | None = None, **options) -> Iterator[VQASample]:
    """``count`` samples of ``task`` (``"scene"`` or ``"gui"``) from seeds ``start, start + 1, ...``;
    with ``kinds``, question types cycle through them (a balanced set)."""
    if task not in ("scene", "gui"):
        raise ValueError(f"`task` must be 'scene' or 'gui', got {task!r}")
    make = scene_sample if task == "scene" else gui_sample
    for i in range(count):
        yield make(start + i, kind=None if not kinds else kinds[i % len(kinds)], **options)


def held_out(task: str, count: int, kinds: Sequence[str] | None = None, **options) -> list[VQASample]:
    """The first ``count`` held-out samples of ``task``, question types balanced over ``kinds``
    (default: every type of the task).

    Examples
    --------
    >>> [s.kind for s in held_out("scene", 5)]
    ['color', 'shape', 'count', 'relation', 'code']
    """
    kinds = kinds or (SCENE_QUESTIONS if task == "scene" else GUI_QUESTIONS)
    return list(samples(task, HELD_OUT_SEED, count, kinds, **options))
