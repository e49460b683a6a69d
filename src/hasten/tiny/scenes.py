"""A seeded procedural world of captioned scenes: the data every trained micro-world shares.

Each scene is 1-4 coloured shapes on a background, one object per cell of a 3 x 3 grid, with a
caption built from the ground truth (``"a red circle at the top left and a small blue square at
the bottom"``). The same generator feeds training and evaluation of the diffusion micro-world
(:mod:`hasten.tiny.trained`), the attribute classifier that judges it, and the VLM / AR
micro-worlds: a seed fully determines a scene, and :data:`HELD_OUT_SEEDS` is the evaluation set,
disjoint from :data:`TRAIN_SEEDS`.

Vocabulary
----------
- shapes (:data:`SHAPES`): circle, square, triangle, star, ring, cross, diamond;
- colours (:data:`COLOURS`): red, green, blue, yellow, purple, orange, cyan, white, pink, brown;
- sizes (:data:`SIZES`): ``small`` (said in the caption) and ``large`` (unmarked);
- positions (:data:`POSITIONS`): the 3 x 3 grid cells, ``"top left"`` ... ``"bottom right"``,
  with ``"top"``, ``"left"``, ``"centre"``, ``"right"``, ``"bottom"`` for the middle cells;
  an object's centre is its cell's centre plus a seeded jitter (default up to 10% of the cell),
  so the centre always lies inside the named cell;
- backgrounds (:data:`BACKGROUNDS`): flat neutral colours, none of them an object colour, and
  with ``textures=True`` darkened grey crops of scikit-image's bundled photos (brick, grass,
  gravel, camera) when scikit-image is installed.

Rendering is anti-aliased (each shape is drawn at 4x resolution with OpenCV and area-averaged
down), at any ``height x width``; object sizes scale with the grid cell. Videos
(:func:`sample_video`) move the same scenes with a known integer displacement per frame: a
camera pan (a window sliding over a larger canvas) or objects moving over a fixed background.

Examples
--------
>>> scene = sample_scene(7, height=48, width=48)
>>> scene.caption  # doctest: +SKIP
'a small green star at the top right and a red ring at the bottom left'
>>> image = scene.render()
>>> image.shape, image.dtype
((48, 48, 3), dtype('uint8'))
>>> sample_scene(7, height=48, width=48) == scene  # deterministic by seed
True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import cv2
import numpy as np
import torch

from .._validation import check_number

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "HELD_OUT_SEEDS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TRAIN_SEEDS",
    "Scene",
    "SceneBatch",
    "SceneObject",
    "SceneVideo",
    "batch",
    "cell_labels",
    "coverage",
    "is_held_out",
    "render",
    "sample_scene",
    "scene_from_caption",
    "sample_video",
    "texture_names",
    "vocabulary",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "diamond")
"""Shape names, in label order (class ``i + 1`` of :func:`cell_labels`; 0 is an empty cell)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 200),
    "orange": (250, 130, 10),
    "cyan": (30, 210, 220),
    "white": (250, 250, 250),
    "pink": (250, 120, 190),
    "brown": (130, 75, 25),
}
"""Object colour names and their RGB values, in label order (class ``i + 1``; 0 is empty)."""

SIZES: dict[str, float] = {"small": 0.24, "large": 0.40}
"""Object sizes: the shape's outer radius as a fraction of the smaller side of a grid cell."""

POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "centre",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
"""The 3 x 3 grid cells, row-major: ``POSITIONS[3 * row + column]``."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "dark gray": (55, 55, 60),
    "gray": (105, 105, 110),
    "slate": (45, 60, 75),
}
"""Flat background colours: neutral and darker than every object colour except brown, which stays
distinguishable by hue."""

_TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel", "camera")

TRAIN_SEEDS: range = range(0, 1_000_000_000)
"""Seeds used for training. Every trainer in :mod:`hasten.tiny` draws its scenes from here."""

HELD_OUT_SEEDS: range = range(1_000_000_000, 1_000_100_000)
"""Seeds reserved for evaluation (100,000 scenes), disjoint from :data:`TRAIN_SEEDS`."""

_SUPERSAMPLE = 4  # each shape is drawn at 4x resolution and area-averaged: anti-aliasing


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One shape of a scene, with its ground truth.

    Attributes
    ----------
    shape, colour, size : str
        Members of :data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`.
    position : str
        The grid cell's name (a member of :data:`POSITIONS`); the centre lies inside that cell.
    centre : tuple of float
        ``(x, y)`` in pixels (``x`` to the right, ``y`` down; pixel ``(i, j)`` covers
        ``[j, j + 1) x [i, i + 1)``).
    radius : float
        Outer radius in pixels.
    bbox : tuple of int
        ``(x0, y0, x1, y1)``: the pixels the shape may cover, ``x1``/``y1`` exclusive, clipped to
        the canvas.
    """

    shape: str
    colour: str
    size: str
    position: str
    centre: tuple[float, float]
    radius: float
    bbox: tuple[int, int, int, int]

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The object's RGB colour."""
        return COLOURS[self.colour]

    @property
    def cell(self) -> int:
        """Index of :attr:`position` in :data:`POSITIONS` (row-major 3 x 3)."""
        return POSITIONS.index(self.position)

    @property
    def noun_phrase(self) -> str:
        """The object without its place, e.g. ``"a small red circle"``."""
        size = "small " if self.size == "small" else ""
        return f"a {size}{self.colour} {self.shape}"

    @property
    def phrase(self) -> str:
        """The caption's words for this object, e.g. ``"a small red circle at the top left"``."""
        where = "in the centre" if self.position == "centre" else f"at the {self.position}"
        return f"{self.noun_phrase} {where}"

    def probe(self) -> tuple[int, int]:
        """A pixel ``(x, y)`` well inside the shape (the centre, or the middle of a ring's band).

        Examples
        --------
        >>> scene = sample_scene(3, height=96, width=96)
        >>> obj = scene.objects[0]
        >>> x, y = obj.probe()
        >>> tuple(scene.render()[y, x]) == obj.rgb
        True
        """
        x, y = self.centre
        if self.shape == "ring":
            x += 0.78 * self.radius
        return int(math.floor(x)), int(math.floor(y))


@dataclasses.dataclass(frozen=True)
class Scene:
    """A generated scene: canvas size, background and objects (ground truth), and its caption.

    Render it with :meth:`render`. Equal seeds and arguments give equal scenes.

    Attributes
    ----------
    seed : int
    height, width : int
    background : str
        A key of :data:`BACKGROUNDS`, or ``"<name> texture"`` for a photo crop.
    objects : tuple of SceneObject
        1-4 objects, each in its own grid cell, in reading order (row by row), as captioned.
    """

    seed: int
    height: int
    width: int
    background: str
    objects: tuple[SceneObject, ...]
    texture_box: tuple[int, int, int, int] | None = None

    @property
    def caption(self) -> str:
        """The objects described in order, joined with ``"and"``.

        Examples
        --------
        >>> sample_scene(0, num_objects=1).caption.startswith("a ")
        True
        """
        return " and ".join(obj.phrase for obj in self.objects)

    @property
    def caption_with_background(self) -> str:
        """:attr:`caption` plus ``" on a <background> background"``."""
        return f"{self.caption} on a {self.background} background"

    def render(self) -> np.ndarray:
        """The scene as an ``(height, width, 3)`` uint8 RGB array (see :func:`render`)."""
        return render(self)


class SceneBatch(NamedTuple):
    """What :func:`batch` returns."""

    images: torch.Tensor
    """``(B, 3, H, W)`` float32 in ``[0, 1]``."""
    scenes: list[Scene]
    captions: list[str]


@dataclasses.dataclass(frozen=True)
class SceneVideo:
    """A short video of one scene with known motion.

    Attributes
    ----------
    frames : numpy.ndarray
        ``(T, H, W, 3)`` uint8.
    scene : Scene
        The scene on the canvas the video is taken from: the frame-0 layout of the objects. For a
        pan the canvas is larger than a frame and frame ``t`` is the window whose top-left corner is
        ``origins[t]``; for moving objects the canvas is the frame.
    motion : str
        ``"pan"`` or ``"objects"``.
    origins : numpy.ndarray
        ``(T, 2)`` int: each frame's top-left corner ``(x, y)`` on the canvas.
    displacement : numpy.ndarray
        ``(T - 1, N, 2)`` int: how far, in frame pixels ``(dx, dy)``, object ``n`` moves in the
        frame between frame ``t`` and ``t + 1``. For a pan every object (and the background) moves
        by minus the camera step.
    background_displacement : numpy.ndarray
        ``(T - 1, 2)`` int: the same for the background (zero when objects move).
    """

    frames: np.ndarray
    scene: Scene
    motion: str
    origins: np.ndarray
    displacement: np.ndarray
    background_displacement: np.ndarray

    def tensor(self) -> torch.Tensor:
        """The frames as ``(T, 3, H, W)`` float32 in ``[0, 1]``."""
        return torch.from_numpy(self.frames).permute(0, 3, 1, 2).float().div(255.0)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def is_held_out(seed: int) -> bool:
    """Whether ``seed`` belongs to the evaluation range :data:`HELD_OUT_SEEDS`.

    Examples
    --------
    >>> is_held_out(12), is_held_out(HELD_OUT_SEEDS[0])
    (False, True)
    """
    return seed in HELD_OUT_SEEDS


def texture_names() -> tuple[str, ...]:
    """The photo textures available as backgrounds: scikit-image's bundled grey photos, or ``()``
    when scikit-image is not installed.

    Examples
    --------
    >>> set(texture_names()) <= {"brick", "grass", "gravel", "camera"}
    True
    """
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return ()
    return _TEXTURES


@functools.lru_cache(maxsize=None)
def _texture(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = image.mean(axis=2)
    return np.ascontiguousarray(image.astype(np.float32) / 255.0)


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 12:
            raise ValueError(f"`{name}` must be an integer >= 12 (pixels, 4 per grid cell at least); got {value!r}")


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative integer; got {seed!r}")
    return int(seed)


def sample_scene(
    seed: int,
    height: int = 64,
    width: int = 64,
    *,
    num_objects: int | None = None,
    max_objects: int = 4,
    textures: bool = False,
    texture_share: float = 0.25,
    jitter: float = 0.1,
    sizes: Sequence[str] | None = None,
) -> Scene:
    """The scene for ``seed``: objects, positions, colours and background, all drawn from ``seed``.

    Parameters
    ----------
    seed : int
        Non-negative; use :data:`TRAIN_SEEDS` for training and :data:`HELD_OUT_SEEDS` for
        evaluation.
    height, width : int, default 64
        Canvas size in pixels (>= 12 each). The layout (cells, jitter, sizes) scales with it, so
        one seed at two sizes gives the same scene scaled.
    num_objects : int, optional
        1 to 4 (at most 9 is possible, 4 is the documented range); default: uniform in
        ``1 .. max_objects``.
    max_objects : int, default 4
        Upper bound of the random object count.
    textures : bool, default False
        Allow photo-texture backgrounds when scikit-image is installed.
    texture_share : float, default 0.25
        With ``textures``, the share of scenes drawn on a photo texture (0 to 1).
    jitter : float, default 0.1
        Largest offset of an object's centre from its cell centre, as a fraction of the cell
        (0 <= jitter < 0.5, so the centre stays in its cell).
    sizes : sequence of str, optional
        The sizes to draw from (default all of :data:`SIZES`).

    Returns
    -------
    Scene

    Examples
    --------
    >>> scene = sample_scene(11, height=60, width=90, num_objects=2)
    >>> len(scene.objects), scene.height, scene.width
    (2, 60, 90)
    >>> all(obj.position in POSITIONS for obj in scene.objects)
    True
    """
    seed = _check_seed(seed)
    _check_size(height, width)
    if not 1 <= max_objects <= 9:
        raise ValueError(f"`max_objects` must be in 1..9; got {max_objects!r}")
    if num_objects is not None and not 1 <= num_objects <= 9:
        raise ValueError(f"`num_objects` must be in 1..9 (or None for random 1..max_objects); got {num_objects!r}")
    check_number(texture_share, "texture_share", 0, 1, why="a share of scenes")
    if not 0 <= jitter < 0.5:
        raise ValueError(f"`jitter` must be in [0, 0.5) (a fraction of a grid cell); got {jitter!r}")
    size_names = tuple(SIZES) if sizes is None else tuple(sizes)
    if not size_names or any(name not in SIZES for name in size_names):
        raise ValueError(f"`sizes` must be a non-empty subset of {tuple(SIZES)}; got {sizes!r}")
    rng = np.random.default_rng([seed, 0x5CE4E])
    count = int(num_objects) if num_objects is not None else int(rng.integers(1, max_objects + 1))
    cells = np.sort(rng.permutation(9)[:count])  # caption in reading order
    cell_h, cell_w = height / 3.0, width / 3.0
    objects = []
    for cell in cells:
        row, column = divmod(int(cell), 3)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = size_names[int(rng.integers(len(size_names)))]
        dx, dy = rng.uniform(-jitter, jitter, size=2)
        cx = (column + 0.5 + dx) * cell_w
        cy = (row + 0.5 + dy) * cell_h
        radius = SIZES[size] * min(cell_h, cell_w)
        bbox = (
            max(0, int(math.floor(cx - radius))),
            max(0, int(math.floor(cy - radius))),
            min(width, int(math.ceil(cx + radius)) + 1),
            min(height, int(math.ceil(cy + radius)) + 1),
        )
        objects.append(
            SceneObject(shape, colour, size, POSITIONS[int(cell)], (float(cx), float(cy)), float(radius), bbox)
        )
    available = texture_names() if textures else ()
    texture_box = None
    if available and rng.random() < texture_share:
        name = available[int(rng.integers(len(available)))]
        source = _texture(name)
        # A crop with the canvas's aspect ratio, at least a third of the photo's shorter side.
        side = min(source.shape)
        scale = rng.uniform(0.35, 1.0) * side / max(height, width)
        crop_h, crop_w = max(4, int(height * scale)), max(4, int(width * scale))
        y0 = int(rng.integers(0, source.shape[0] - crop_h + 1))
        x0 = int(rng.integers(0, source.shape[1] - crop_w + 1))
        background, texture_box = f"{name} texture", (x0, y0, x0 + crop_w, y0 + crop_h)
    else:
        background = tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return Scene(seed, int(height), int(width), background, tuple(objects), texture_box)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _polygons(shape: str) -> list[tuple[np.ndarray, bool]]:
    """Unit-radius outlines ``(points (K, 2) as (x, y), fill)``; fill False cuts a hole."""

    def ngon(count: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
        angles = phase + 2 * math.pi * np.arange(count) / count
        return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)

    if shape == "circle":
        return [(ngon(64), True)]
    if shape == "ring":
        return [(ngon(64), True), (ngon(64, 0.56), False)]
    if shape == "square":
        s = 0.82
        return [(np.array([[-s, -s], [s, -s], [s, s], [-s, s]]), True)]
    if shape == "diamond":
        return [(np.array([[0.0, -1.0], [0.85, 0.0], [0.0, 1.0], [-0.85, 0.0]]), True)]
    if shape == "triangle":
        # Apex up; the centroid sits slightly below the centre so the shape fills its box evenly.
        return [(np.array([[0.0, -1.0], [0.95, 0.75], [-0.95, 0.75]]), True)]
    if shape == "star":
        outer, inner = ngon(5), ngon(5, 0.45, -math.pi / 2 + math.pi / 5)
        return [(np.stack([outer, inner], axis=1).reshape(10, 2), True)]
    if shape == "cross":
        a, b = 0.32, 0.95
        return [
            (
                np.array(
                    [
                        [-a, -b],
                        [a, -b],
                        [a, -a],
                        [b, -a],
                        [b, a],
                        [a, a],
                        [a, b],
                        [-a, b],
                        [-a, a],
                        [-b, a],
                        [-b, -a],
                        [-a, -a],
                    ]
                ),
                True,
            )
        ]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _coverage(
    obj: SceneObject, height: int, width: int, offset: tuple[int, int] = (0, 0)
) -> tuple[np.ndarray, tuple[int, int]]:
    """Anti-aliased coverage in [0, 1] of ``obj`` over its bounding box (shifted by ``offset``
    pixels); returns the box-sized mask and the box's top-left ``(x, y)`` on the canvas."""
    f = _SUPERSAMPLE
    cx, cy = obj.centre[0] + offset[0], obj.centre[1] + offset[1]
    x0, y0 = int(math.floor(cx - obj.radius)) - 1, int(math.floor(cy - obj.radius)) - 1
    size_x = int(math.ceil(cx + obj.radius)) + 2 - x0
    size_y = int(math.ceil(cy + obj.radius)) + 2 - y0
    big = np.zeros((size_y * f, size_x * f), np.uint8)
    for points, fill in _polygons(obj.shape):
        # Supersampled pixel (i, j) has its centre at ((j + 0.5) / f, (i + 0.5) / f) in box pixels.
        xy = (points * obj.radius + [cx - x0, cy - y0]) * f - 0.5
        cv2.fillPoly(big, [np.round(xy * 16).astype(np.int32)], 255 if fill else 0, lineType=cv2.LINE_8, shift=4)
    mask = cv2.resize(big, (size_x, size_y), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    return mask, (x0, y0)


def _background(scene: Scene) -> np.ndarray:
    if scene.texture_box is not None:
        source = _texture(scene.background.removesuffix(" texture"))
        x0, y0, x1, y1 = scene.texture_box
        crop = cv2.resize(source[y0:y1, x0:x1], (scene.width, scene.height), interpolation=cv2.INTER_AREA)
        grey = 15.0 + 95.0 * crop  # darkened: every object colour stands out
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.broadcast_to(np.array(BACKGROUNDS[scene.background], np.float32), (scene.height, scene.width, 3)).copy()


def _paint(canvas: np.ndarray, obj: SceneObject, offset: tuple[int, int] = (0, 0)) -> None:
    mask, (x0, y0) = _coverage(obj, canvas.shape[0], canvas.shape[1], offset)
    h, w = canvas.shape[:2]
    ys, xs = slice(max(0, y0), min(h, y0 + mask.shape[0])), slice(max(0, x0), min(w, x0 + mask.shape[1]))
    if ys.start >= ys.stop or xs.start >= xs.stop:
        return
    alpha = mask[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0, None]
    region = canvas[ys, xs]
    canvas[ys, xs] = region * (1.0 - alpha) + np.array(obj.rgb, np.float32) * alpha


def render(scene: Scene, *, offsets: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """Draw ``scene`` as an ``(H, W, 3)`` uint8 RGB array, anti-aliased.

    Parameters
    ----------
    scene : Scene
    offsets : sequence of (int, int), optional
        Per object, an integer ``(dx, dy)`` shift in pixels (used by :func:`sample_video`).

    Examples
    --------
    >>> scene = sample_scene(5, height=32, width=40)
    >>> render(scene).shape
    (32, 40, 3)
    """
    if offsets is not None and len(offsets) != len(scene.objects):
        raise ValueError(f"`offsets` must give one (dx, dy) per object ({len(scene.objects)}); got {len(offsets)}")
    canvas = _background(scene).astype(np.float32)
    for index, obj in enumerate(scene.objects):
        _paint(canvas, obj, (0, 0) if offsets is None else tuple(int(v) for v in offsets[index]))
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def coverage(scene: Scene) -> np.ndarray:
    """Where ``scene``'s objects are: an ``(H, W)`` float32 map in ``[0, 1]``, per pixel the largest
    anti-aliased coverage of any object (1 inside a shape, 0 on bare background).

    Examples
    --------
    >>> scene = scene_from_caption("a red square at the centre", 48, 48)
    >>> mask = coverage(scene)
    >>> float(mask[24, 24]), float(mask[2, 2])
    (1.0, 0.0)
    """
    out = np.zeros((scene.height, scene.width), np.float32)
    for obj in scene.objects:
        mask, (x0, y0) = _coverage(obj, scene.height, scene.width)
        ys = slice(max(0, y0), min(scene.height, y0 + mask.shape[0]))
        xs = slice(max(0, x0), min(scene.width, x0 + mask.shape[1]))
        if ys.start < ys.stop and xs.start < xs.stop:
            piece = mask[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
            np.maximum(out[ys, xs], piece, out=out[ys, xs])
    return out


# ---------------------------------------------------------------------------------------------
# Batches and labels
# ---------------------------------------------------------------------------------------------


def batch(seeds: Sequence[int], height: int = 64, width: int = 64, **kwargs) -> SceneBatch:
    """Render the scenes of ``seeds`` as one tensor batch.

    Parameters
    ----------
    seeds : sequence of int
    height, width : int, default 64
    **kwargs
        Passed to :func:`sample_scene` (``num_objects``, ``textures``, ...).

    Returns
    -------
    SceneBatch
        ``images`` ``(B, 3, H, W)`` float32 in ``[0, 1]``, the scenes, and their captions.

    Examples
    --------
    >>> out = batch(range(4), height=24, width=24)
    >>> out.images.shape, len(out.captions)
    (torch.Size([4, 3, 24, 24]), 4)
    """
    if len(seeds) == 0:
        raise ValueError("`seeds` must name at least one scene")
    scenes = [sample_scene(int(seed), height, width, **kwargs) for seed in seeds]
    images = np.stack([scene.render() for scene in scenes])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    return SceneBatch(tensor, scenes, [scene.caption for scene in scenes])


def cell_labels(scene: Scene) -> dict[str, torch.Tensor]:
    """Per grid cell (row-major 3 x 3) the class of what it holds: 0 for an empty cell, else
    ``1 + index`` in :data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`.

    Returns
    -------
    dict
        ``{"shape": (9,), "colour": (9,), "size": (9,)}`` int64 tensors.

    Examples
    --------
    >>> labels = cell_labels(sample_scene(2, num_objects=1))
    >>> int((labels["shape"] > 0).sum())
    1
    """
    out = {name: torch.zeros(9, dtype=torch.int64) for name in ("shape", "colour", "size")}
    for obj in scene.objects:
        out["shape"][obj.cell] = SHAPES.index(obj.shape) + 1
        out["colour"][obj.cell] = tuple(COLOURS).index(obj.colour) + 1
        out["size"][obj.cell] = tuple(SIZES).index(obj.size) + 1
    return out


def scene_from_caption(caption: str, height: int = 64, width: int = 64, background: str = "black") -> Scene:
    """The ground truth a caption asks for: each object at its cell's centre (no jitter).

    Accepts what :attr:`Scene.caption` and :attr:`Scene.caption_with_background` write (objects
    joined by ``" and "``, each ``"a [small] <colour> <shape> at the <position>"`` or ``"... in
    the centre"``, optionally ending in ``" on a <background> background"``), so any prompt in the
    micro-world's language can be judged by :func:`hasten.tiny.classifier.prompt_accuracy`.

    Raises
    ------
    ValueError
        If ``caption`` is not in that language (the message names the phrase), or two objects
        share a cell.

    Examples
    --------
    >>> scene = scene_from_caption("a red circle at the top left and a small blue square at the bottom")
    >>> [(obj.colour, obj.shape, obj.size, obj.position) for obj in scene.objects]
    [('red', 'circle', 'large', 'top left'), ('blue', 'square', 'small', 'bottom')]
    >>> scene_from_caption(scene.caption) == scene
    True
    """
    _check_size(height, width)
    text = " ".join(str(caption).lower().split())
    if " on a " in text and text.endswith(" background"):
        text, _, rest = text.partition(" on a ")
        background = rest.removesuffix(" background")
        if background not in BACKGROUNDS:
            raise ValueError(f"`caption`: unknown background {background!r}; expected one of {tuple(BACKGROUNDS)}")
    elif background not in BACKGROUNDS:
        raise ValueError(f"`background` must be one of {tuple(BACKGROUNDS)}; got {background!r}")
    cell_h, cell_w = height / 3.0, width / 3.0
    objects, used = [], set()
    for phrase in text.split(" and "):
        words = phrase.split()
        size = "large"
        if words[:2] == ["a", "small"]:
            size, words = "small", ["a", *words[2:]]
        if len(words) < 5 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
            raise ValueError(
                f"`caption`: cannot read {phrase!r}; expected 'a [small] <colour> <shape> at the "
                f"<position>' with colours {tuple(COLOURS)} and shapes {SHAPES}"
            )
        place = " ".join(words[3:])
        position = "centre" if place == "in the centre" else place.removeprefix("at the ")
        if position not in POSITIONS or (position != "centre" and not place.startswith("at the ")):
            raise ValueError(
                f"`caption`: unknown position in {phrase!r}; expected 'at the <position>' with "
                f"positions {POSITIONS} ('in the centre' for the middle)"
            )
        cell = POSITIONS.index(position)
        if cell in used:
            raise ValueError(f"`caption`: two objects at the {position}; each cell holds one object")
        used.add(cell)
        row, column = divmod(cell, 3)
        cx, cy = (column + 0.5) * cell_w, (row + 0.5) * cell_h
        radius = SIZES[size] * min(cell_h, cell_w)
        bbox = (
            max(0, int(math.floor(cx - radius))),
            max(0, int(math.floor(cy - radius))),
            min(width, int(math.ceil(cx + radius)) + 1),
            min(height, int(math.ceil(cy + radius)) + 1),
        )
        objects.append(SceneObject(words[2], words[1], size, position, (cx, cy), radius, bbox))
    return Scene(-1, int(height), int(width), background, tuple(objects))


def vocabulary() -> list[str]:
    """Every word a caption (with or without its background) can contain, sorted.

    Examples
    --------
    >>> {"a", "and", "red", "circle", "top", "left"} <= set(vocabulary())
    True
    """
    words = {"a", "and", "at", "the", "in", "on", "background", "small", "texture"}
    words |= set(SHAPES) | set(COLOURS) | set(_TEXTURES)
    for name in (*POSITIONS, *BACKGROUNDS):
        words |= set(name.split())
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# Videos
# ---------------------------------------------------------------------------------------------


def sample_video(
    seed: int,
    height: int = 64,
    width: int = 64,
    frames: int = 8,
    *,
    motion: str | None = None,
    max_speed: int = 2,
    **kwargs,
) -> SceneVideo:
    """A ``frames``-long video of the scene for ``seed``, with known integer motion per frame.

    Parameters
    ----------
    seed : int
    height, width : int, default 64
        Frame size.
    frames : int, default 8
        Number of frames (>= 2).
    motion : {"pan", "objects"}, optional
        ``"pan"``: the camera slides at a constant seeded velocity over a larger canvas (the scene
        is generated on that canvas); ``"objects"``: each object moves at its own constant seeded
        velocity over a fixed background and may leave the frame. Default: drawn from the seed.
    max_speed : int, default 2
        Largest speed per axis in pixels per frame (>= 1).
    **kwargs
        Passed to :func:`sample_scene`.

    Returns
    -------
    SceneVideo

    Examples
    --------
    >>> video = sample_video(4, height=32, width=32, frames=5, motion="pan")
    >>> video.frames.shape, video.displacement.shape[0]
    ((5, 32, 32, 3), 4)
    >>> bool((video.displacement == video.background_displacement[:, None]).all())
    True
    """
    seed = _check_seed(seed)
    _check_size(height, width)
    if not isinstance(frames, int) or frames < 2:
        raise ValueError(f"`frames` must be an integer >= 2; got {frames!r}")
    if motion not in (None, "pan", "objects"):
        raise ValueError(f"`motion` must be 'pan', 'objects' or None (drawn from the seed); got {motion!r}")
    if not isinstance(max_speed, int) or max_speed < 1:
        raise ValueError(f"`max_speed` must be an integer >= 1 (pixels per frame); got {max_speed!r}")
    rng = np.random.default_rng([seed, 0xF11E])
    if motion is None:
        motion = ("pan", "objects")[int(rng.integers(2))]
    if motion == "pan":
        velocity = np.zeros(2, np.int64)
        while not velocity.any():
            velocity = rng.integers(-max_speed, max_speed + 1, size=2)
        travel = np.abs(velocity) * (frames - 1)
        scene = sample_scene(seed, height + int(travel[1]), width + int(travel[0]), **kwargs)
        canvas = scene.render()
        start = np.where(velocity < 0, travel, 0)
        origins = np.stack([start + velocity * t for t in range(frames)]).astype(np.int64)
        clip = np.stack([canvas[y : y + height, x : x + width] for x, y in origins])
        step = np.repeat(-velocity[None], frames - 1, axis=0)
        displacement = np.repeat(step[:, None], len(scene.objects), axis=1)
        return SceneVideo(clip, scene, "pan", origins, displacement, step)
    scene = sample_scene(seed, height, width, **kwargs)
    velocities = np.zeros((len(scene.objects), 2), np.int64)
    for index in range(len(scene.objects)):
        while not velocities[index].any():
            velocities[index] = rng.integers(-max_speed, max_speed + 1, size=2)
    clip = np.stack([render(scene, offsets=[tuple(v * t) for v in velocities]) for t in range(frames)])
    origins = np.zeros((frames, 2), np.int64)
    displacement = np.repeat(velocities[None], frames - 1, axis=0)
    return SceneVideo(clip, scene, "objects", origins, displacement, np.zeros((frames - 1, 2), np.int64))
