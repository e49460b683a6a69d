"""The micro-world's judge: an attribute classifier for generated scenes (our "CLIP score").

:class:`AttributeClassifier` looks at an image of a :mod:`hasten.tiny.scenes` scene (any size; it
is resized to 72 x 72) and predicts, for each cell of the 3 x 3 grid, which shape, colour and size
it holds (class 0: the cell is empty). It is trained only on rendered scenes
(:func:`train_classifier`, ``hasten tiny train classifier``) with noise and blur augmentation, and
ships under ``hasten/tiny/weights/classifier``; no generator is ever trained against it.

:func:`prompt_accuracy` is the fidelity number the benchmarks report: the fraction of the objects
a caption asks for that the classifier finds with the right shape and colour in the right cell.

Examples
--------
>>> from hasten.tiny import scenes
>>> from hasten.tiny.classifier import load_classifier, prompt_accuracy
>>> classifier = load_classifier()
>>> test = scenes.batch(scenes.HELD_OUT_SEEDS[:8], 64, 64)
>>> prompt_accuracy(test.images, test.scenes, classifier) >= 0.9
True
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from tqdm.auto import tqdm

from . import scenes
from .trained import load_checkpoint, save_checkpoint, step_generator

__all__ = ["AttributeClassifier", "evaluate", "load_classifier", "prompt_accuracy", "train_classifier"]

INPUT_SIZE = 72
"""Images are resized (bilinear, anti-aliased) to ``INPUT_SIZE x INPUT_SIZE`` before classification."""

_HEADS = {"shape": len(scenes.SHAPES) + 1, "colour": len(scenes.COLOURS) + 1, "size": len(scenes.SIZES) + 1}


class AttributeClassifier(ModelMixin, ConfigMixin):
    """A small CNN: image -> per-cell logits for shape, colour and size (class 0 = empty).

    The image is resized to 72 x 72; three stride-2 stages give a 9 x 9 feature map, i.e. 3 x 3
    features per grid cell; each cell's features are max- and mean-pooled and one head, shared by
    the nine cells, classifies them (so every object trains the same head, wherever it is).

    Parameters
    ----------
    channels : tuple of int
        Channels of the three stages.
    hidden : int
        Width of the shared per-cell hidden layer.

    Examples
    --------
    >>> model = AttributeClassifier()
    >>> logits = model(torch.rand(2, 3, 40, 56))
    >>> logits["shape"].shape
    torch.Size([2, 9, 8])
    """

    @register_to_config
    def __init__(self, channels: tuple[int, ...] = (32, 64, 96), hidden: int = 128):
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"`channels` must name 3 stages (72 -> 9 x 9 features); got {channels!r}")
        layers, previous = [], 3
        for width in channels:  # each stage: a stride-2 convolution, then a 3 x 3 one
            layers += [
                torch.nn.Conv2d(previous, width, 3, stride=2, padding=1),
                torch.nn.GELU(),
                torch.nn.Conv2d(width, width, 3, padding=1),
                torch.nn.GELU(),
            ]
            previous = width
        self.features = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(2 * previous, hidden)
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, count) for name, count in _HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images`` ``(B, 3, H, W)`` in ``[0, 1]`` -> ``{"shape", "colour", "size"}`` logits ``(B, 9, C)``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"`images` must be (B, 3, H, W) in [0, 1]; got shape {tuple(images.shape)}")
        features = self.features(_resize(images.to(self.dtype)) * 2.0 - 1.0)  # (B, C, 9, 9)
        pooled = torch.cat([F.max_pool2d(features, 3), F.avg_pool2d(features, 3)], dim=1)  # (B, 2C, 3, 3)
        x = F.gelu(self.fc(pooled.flatten(2).transpose(1, 2)))  # (B, 9 cells row-major, hidden)
        return {name: head(x) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-cell class indices ``(B, 9)`` (see :func:`hasten.tiny.scenes.cell_labels`)."""
        return {name: logits.argmax(-1) for name, logits in self(images).items()}


def _resize(images: torch.Tensor) -> torch.Tensor:
    if images.shape[-2:] == (INPUT_SIZE, INPUT_SIZE):
        return images
    return F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)


def load_classifier(folder: str | pathlib.Path | None = None) -> AttributeClassifier:
    """The shipped classifier (or the one saved in ``folder``), loaded with ``from_pretrained``, in eval mode.

    Examples
    --------
    >>> load_classifier().training
    False
    """
    from .trained import path

    return AttributeClassifier.from_pretrained(folder if folder is not None else path("classifier")).eval()


def _as_images(images) -> torch.Tensor:
    if isinstance(images, np.ndarray) or (isinstance(images, (list, tuple)) and isinstance(images[0], np.ndarray)):
        array = np.stack(images) if isinstance(images, (list, tuple)) else images
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"`images` as arrays must be (B, H, W, 3); got shape {array.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()
        return tensor / 255.0 if array.dtype == np.uint8 else tensor
    if isinstance(images, (list, tuple)):
        images = torch.stack(list(images))
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError("`images` must be a (B, 3, H, W) tensor in [0, 1], a (B, H, W, 3) array or a list of either")
    return images.float()


def evaluate(
    images, scene_list: Sequence[scenes.Scene], classifier: AttributeClassifier | None = None, batch_size: int = 64
) -> dict[str, float]:
    """Per-attribute accuracies of ``images`` against the scenes they were asked to show.

    Returns
    -------
    dict
        ``object`` (shape and colour right in the object's cell: :func:`prompt_accuracy`),
        ``shape``, ``colour``, ``size`` (per object), ``empty`` (cells the caption leaves empty
        that the classifier finds empty), ``scene`` (every object and empty cell right).
    """
    images = _as_images(images)
    if len(images) != len(scene_list):
        raise ValueError(f"`images` ({len(images)}) and `scenes` ({len(scene_list)}) must have the same length")
    classifier = classifier or load_classifier()
    predictions = {name: [] for name in _HEADS}
    for start in range(0, len(images), batch_size):
        chunk = classifier.predict(images[start : start + batch_size])
        for name in _HEADS:
            predictions[name].append(chunk[name])
    predicted = {name: torch.cat(parts) for name, parts in predictions.items()}
    counts = {"object": 0, "shape": 0, "colour": 0, "size": 0, "empty": 0, "scene": 0}
    objects = empties = 0
    for index, scene in enumerate(scene_list):
        truth = scenes.cell_labels(scene)
        right = {name: predicted[name][index] == truth[name] for name in _HEADS}
        occupied = truth["shape"] > 0
        objects += int(occupied.sum())
        empties += int((~occupied).sum())
        counts["object"] += int((right["shape"] & right["colour"] & occupied).sum())
        for name in _HEADS:
            counts[name] += int((right[name] & occupied).sum())
        counts["empty"] += int(((predicted["shape"][index] == 0) & ~occupied).sum())
        counts["scene"] += int(bool((right["shape"] & right["colour"]).all()))
    return {
        "object": counts["object"] / max(objects, 1),
        "shape": counts["shape"] / max(objects, 1),
        "colour": counts["colour"] / max(objects, 1),
        "size": counts["size"] / max(objects, 1),
        "empty": counts["empty"] / max(empties, 1),
        "scene": counts["scene"] / max(len(scene_list), 1),
    }


def prompt_accuracy(images, scene_list: Sequence[scenes.Scene], classifier: AttributeClassifier | None = None) -> float:
    """Fraction of the requested objects the classifier finds with the right shape and colour in
    the right grid cell (the ``object`` entry of :func:`evaluate`).

    Parameters
    ----------
    images : tensor ``(B, 3, H, W)`` in [0, 1], uint8 array ``(B, H, W, 3)``, or a list of either
        Any size; each is resized to 72 x 72.
    scene_list : sequence of Scene
        The scenes whose captions prompted the images.
    classifier : AttributeClassifier, optional
        Default: the shipped one.

    Examples
    --------
    >>> from hasten.tiny import scenes
    >>> test = scenes.batch(scenes.HELD_OUT_SEEDS[:4], 96, 96)
    >>> prompt_accuracy(test.images, test.scenes) > prompt_accuracy(test.images.flip(-1), test.scenes)
    True
    """
    return evaluate(images, scene_list, classifier)["object"]


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

DEFAULT_STEPS = 2000
"""Default optimiser steps of :func:`train_classifier` (batch 32; the shipped weights: 2000 steps, about
40 minutes on one thread of a busy 2-core CPU)."""

_SIZES = (48, 64, 80, 96)


def _training_batch(seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = step_generator(seed, step)
    side = _SIZES[int(torch.randint(len(_SIZES), (1,), generator=generator))]
    aspect = float(torch.empty(1).uniform_(0.75, 1.33, generator=generator))
    height, width = side, max(24, int(round(side * aspect / 4)) * 4)
    seeds = torch.randint(0, scenes.TRAIN_SEEDS.stop, (batch_size,), generator=generator).tolist()
    textures = bool(torch.rand(1, generator=generator) < 0.3)
    out = scenes.batch(seeds, height, width, textures=textures)
    images = out.images
    # Augmentation: the generator's outputs are slightly blurred and noisy renders.
    if float(torch.rand(1, generator=generator)) < 0.5:
        sigma = float(torch.empty(1).uniform_(0.3, 0.9, generator=generator))
        radius = 2
        kernel = torch.exp(-(torch.arange(-radius, radius + 1).float() ** 2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        images = F.conv2d(
            F.pad(images, (radius,) * 4, mode="replicate"), kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3
        )
        images = F.conv2d(images, kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    noise = float(torch.empty(1).uniform_(0.0, 0.06, generator=generator))
    images = (images + noise * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    labels = [scenes.cell_labels(scene) for scene in out.scenes]
    return images, {name: torch.stack([label[name] for label in labels]) for name in _HEADS}


def train_classifier(
    out: str | pathlib.Path,
    *,
    steps: int | None = None,
    seed: int = 0,
    resume: bool = False,
    progress: bool = True,
    batch_size: int = 32,
) -> pathlib.Path:
    """Train :class:`AttributeClassifier` on rendered training scenes; save it in ``out / "model"``.

    Seeded and resumable (see :mod:`hasten.tiny.trained`): step ``k`` always sees the same batch,
    and ``out / "checkpoint.pt"`` holds the model, the optimiser and the step.

    Parameters
    ----------
    out : path
        Run folder.
    steps : int, optional
        Optimiser steps (default :data:`DEFAULT_STEPS`).
    seed : int, default 0
    resume : bool, default False
        Continue from the checkpoint in ``out``.
    progress : bool, default True
        Show a tqdm bar.
    batch_size : int, default 32

    Returns
    -------
    pathlib.Path
        ``out / "model"``, loadable with ``AttributeClassifier.from_pretrained``.

    Examples
    --------
    >>> import tempfile
    >>> folder = train_classifier(tempfile.mkdtemp(), steps=2, batch_size=4, progress=False)
    >>> AttributeClassifier.from_pretrained(folder).config.hidden
    128
    """
    out = pathlib.Path(out)
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1; got {steps}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttributeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    # Warm-up, then halve every 1000 steps: independent of `steps`, so a run extended with --resume
    # equals one that was asked for the longer run from the start.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 100) * 0.5 ** (step / 1000)
    )
    start = 0
    if resume and (state := load_checkpoint(out)) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start = state["step"]
    model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="classifier", disable=not progress)
    for step in bar:
        images, labels = _training_batch(seed, step, batch_size)
        logits = model(images)
        loss = sum(F.cross_entropy(logits[name].flatten(0, 1), labels[name].flatten()) for name in _HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 200 == 0 or step + 1 == steps:
            save_checkpoint(
                out,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "step": step + 1,
                },
            )
    model.eval()
    model.save_pretrained(out / "model")
    return out / "model"
