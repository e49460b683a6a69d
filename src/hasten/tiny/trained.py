"""The trained micro-world models: a registry, where their shipped weights live, and how they load.

Unlike the random-weight tiny models (:mod:`hasten.tiny.diffusion`, :mod:`hasten.tiny.vlms`), these
are trained here, on the generated scenes of :mod:`hasten.tiny.scenes`, by one seeded, resumable
command (``hasten tiny train NAME``), and their weights ship inside the package under
``hasten/tiny/weights/<name>/`` (safetensors through ``save_pretrained``). Loading goes through
the real ``from_pretrained`` of the model's library.

:data:`REGISTRY` maps each name to its training function as a lazily imported
``"module:function"`` string; adding a micro-world is one line here plus its module. A training
function has the signature::

    def train(out: pathlib.Path, *, steps: int | None = None, seed: int = 0, resume: bool = False,
              progress: bool = True) -> pathlib.Path

It trains for ``steps`` optimiser steps (``None``: its documented default), draws all randomness
from ``seed`` and the step index (so a resumed run equals an uninterrupted one), keeps a
checkpoint in ``out`` (see :func:`save_checkpoint`), continues from it when ``resume`` is true,
shows a tqdm bar when ``progress`` is true, and saves the finished model with ``save_pretrained``
into ``out / "model"``, which it returns. Copying that folder to ``weights/<name>/`` is how the
shipped weights were made.

Examples
--------
>>> "flux" in REGISTRY and "classifier" in REGISTRY
True
>>> path("flux").name
'flux'
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import tempfile
from typing import Any, Callable

import torch

__all__ = [
    "REGISTRY",
    "WEIGHTS",
    "is_shipped",
    "load",
    "load_checkpoint",
    "path",
    "run_phase",
    "save_checkpoint",
    "step_generator",
    "training_function",
]

REGISTRY: dict[str, str] = {
    "flux": "hasten.tiny.micro_diffusion:train_flux",
    "classifier": "hasten.tiny.classifier:train_classifier",
    "janus-vq": "hasten.tiny.micro_janus:train_vq",
    "janus": "hasten.tiny.micro_janus:train_janus",
    "llava": "hasten.tiny.micro_vlm:train_llava",
    "llava-draft": "hasten.tiny.micro_vlm:train_llava_draft",
    "qwen2.5-vl": "hasten.tiny.micro_vlm:train_qwen25_vl",
    "wan": "hasten.tiny.micro_video:train_wan",
    "sd15": "hasten.tiny.micro_sd15:train_sd15",
}
"""Micro-world name -> ``"module:function"`` that trains it (imported only when used)."""

WEIGHTS: pathlib.Path = pathlib.Path(__file__).resolve().parent / "weights"
"""The package folder holding the shipped weights, one sub-folder per :data:`REGISTRY` name."""

CHECKPOINT = "checkpoint.pt"
"""File name of the resumable training state inside a training run's ``out`` folder."""


def _check_name(name: str) -> str:
    if name not in REGISTRY:
        raise ValueError(f"`name` must be one of {', '.join(sorted(REGISTRY))}; got {name!r}")
    return name


def path(name: str) -> pathlib.Path:
    """The shipped weights folder of micro-world ``name`` (``hasten/tiny/weights/<name>``).

    The folder may not exist yet for a registered model whose weights were not trained and
    shipped; :func:`is_shipped` says.

    Examples
    --------
    >>> path("classifier").parent.name
    'weights'
    """
    return WEIGHTS / _check_name(name)


def is_shipped(name: str) -> bool:
    """Whether ``name``'s weights are in the package (a ``config.json``, ``model_index.json`` or, for a
    SpecVLM draft, ``draft_config.json``).

    Examples
    --------
    >>> isinstance(is_shipped("flux"), bool)
    True
    """
    folder = path(name)
    return any((folder / marker).is_file() for marker in ("model_index.json", "config.json", "draft_config.json"))


def training_function(name: str) -> Callable[..., pathlib.Path]:
    """Import and return the training function registered for ``name``.

    Examples
    --------
    >>> callable(training_function("classifier"))
    True
    """
    module, _, function = REGISTRY[_check_name(name)].partition(":")
    return getattr(importlib.import_module(module), function)


def load(name: str, folder: str | os.PathLike | None = None, **kwargs: Any) -> Any:
    """Load micro-world ``name`` with its library's ``from_pretrained``.

    - a diffusers pipeline folder (``model_index.json``): ``DiffusionPipeline.from_pretrained``;
    - a transformers model (``config.json`` with ``architectures``): that transformers class's
      ``from_pretrained`` (load its processor with ``AutoProcessor.from_pretrained(path(name))``);
    - a hasten model (``config.json`` with diffusers' ``_class_name``): the class of that name in the
      module of ``name``'s training function, a diffusers ``ModelMixin``, ``.from_pretrained``.

    Parameters
    ----------
    name : str
        A key of :data:`REGISTRY`.
    folder : path, optional
        Load from here instead of the shipped folder (e.g. a fresh ``out / "model"``).
    **kwargs
        Passed to ``from_pretrained`` (e.g. ``dtype=torch.float32``).

    Raises
    ------
    ValueError
        Unknown ``name``, or no saved model in the folder.

    Examples
    --------
    >>> pipe = load("flux")  # doctest: +SKIP
    >>> image = pipe("a red circle at the top left", height=64, width=64).images[0]  # doctest: +SKIP
    """
    _check_name(name)
    folder = pathlib.Path(folder) if folder is not None else path(name)
    if (folder / "model_index.json").is_file():
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(folder, **kwargs)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"no saved {name!r} model in {folder} (no model_index.json or config.json); train it with "
            f"`hasten tiny train {name}`"
        )
    config = json.loads(config_file.read_text())
    if config.get("architectures"):
        import transformers

        return getattr(transformers, config["architectures"][0]).from_pretrained(folder, **kwargs)
    if "_class_name" in config:
        module = importlib.import_module(REGISTRY[name].partition(":")[0])
        return getattr(module, config["_class_name"]).from_pretrained(folder, **kwargs)
    raise ValueError(f"{config_file} names no model class (`architectures` or `_class_name`)")


# ---------------------------------------------------------------------------------------------
# Helpers shared by the training functions
# ---------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` determined by ``(seed, step, stream)`` only.

    Training functions draw each step's noise and data from it, so a run resumed at step ``k``
    sees exactly what an uninterrupted run saw.

    Examples
    --------
    >>> a = torch.rand(2, generator=step_generator(0, 5))
    >>> b = torch.rand(2, generator=step_generator(0, 5))
    >>> bool((a == b).all()), bool((a == torch.rand(2, generator=step_generator(0, 6))).all())
    (True, False)
    """
    value = (int(seed) * 1_000_003 + int(step)) * 131 + int(stream)
    return torch.Generator(device="cpu").manual_seed(value % (2**63))


def run_phase(
    name: str,
    done: dict[str, int],
    total: int,
    step: Callable[[int], float],
    checkpoint: Callable[[], None],
    *,
    progress: bool = True,
    checkpoint_at_end: bool = True,
    every: int = 100,
) -> None:
    """Run the remaining steps ``done[name] .. total - 1`` of one resumable training phase.

    ``step(i)`` trains step ``i`` and returns its loss (shown on a tqdm bar named ``name``); after it,
    ``done[name]`` is ``i + 1`` and ``checkpoint()`` is called every ``every`` steps and after the last
    one (unless ``checkpoint_at_end`` is false: for a phase whose caller still has work to do, e.g.
    measuring latent statistics, before its final checkpoint).

    Examples
    --------
    >>> done, saved = {"toy": 0}, []
    >>> run_phase("toy", done, 5, lambda i: 0.0, lambda: saved.append(done["toy"]), progress=False, every=2)
    >>> done["toy"], saved
    (5, [2, 4, 5])
    """
    from tqdm.auto import tqdm

    bar = tqdm(range(done[name], total), initial=done[name], total=total, desc=name, disable=not progress)
    for index in bar:
        bar.set_postfix(loss=f"{step(index):.4f}")
        done[name] = index + 1
        if (done[name] % every == 0 and done[name] < total) or (done[name] == total and checkpoint_at_end):
            checkpoint()


def run_vae_phase(
    out: str | os.PathLike,
    done: dict[str, int],
    total: int,
    vae: torch.nn.Module,
    step: Callable[[int], float],
    measure: Callable[[], None],
    checkpoint: Callable[[], None],
    *,
    next_phase: str,
    progress: bool = True,
) -> None:
    """The VAE phase that opens a diffusion micro-world's training: the remaining steps of
    ``done["vae"]`` .. ``total - 1`` (:func:`run_phase`), then ``measure()`` (the latent statistics
    the pipeline normalises with, written into the VAE's config) and a checkpoint.

    A checkpoint whose ``next_phase`` has begun holds a finished VAE: asking for more VAE steps
    than it ran raises ``ValueError`` (the later phases were trained on that VAE's latents).
    """
    if done["vae"] >= total:
        return
    if done[next_phase]:
        raise ValueError(
            f"the checkpoint in {out} finished its VAE at step {done['vae']}; resume with `vae_steps` <= {done['vae']}"
        )
    vae.train()
    # the phase's last checkpoint comes after the latent statistics
    run_phase("vae", done, total, step, checkpoint, progress=progress, checkpoint_at_end=False)
    vae.eval()
    measure()
    checkpoint()


def save_checkpoint(out: str | os.PathLike, state: dict[str, Any]) -> pathlib.Path:
    """Write ``state`` (state dicts, the step, ...) to ``out / CHECKPOINT`` atomically.

    A temporary file in ``out`` is written first and moved into place with ``os.replace``, so an
    interrupted write leaves the previous checkpoint intact.

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> _ = save_checkpoint(folder, {"step": 3})
    >>> load_checkpoint(folder)["step"]
    3
    """
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT}.", dir=out)
    os.close(handle)
    try:
        torch.save(state, tmp)
        os.replace(tmp, out / CHECKPOINT)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out / CHECKPOINT


def load_checkpoint(out: str | os.PathLike) -> dict[str, Any] | None:
    """The state saved by :func:`save_checkpoint` in ``out``, or ``None`` when there is none."""
    file = pathlib.Path(out) / CHECKPOINT
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=False)
