"""hasten: training-free acceleration for diffusers pipelines and transformers VLMs.

Importing hasten adds ``enable_grat()`` / ``disable_grat()`` to every
``diffusers.DiffusionPipeline``::

    import hasten
    pipe.enable_grat()            # GRAT-X with the model family's default groups
    image = pipe(prompt).images[0]
    pipe.disable_grat()           # exact original attention processors again
"""

from __future__ import annotations

import importlib
from typing import Any

from diffusers import DiffusionPipeline

from .pipelines.grat import GratConfig, apply_grat, grat_state, remove_grat

__version__ = "0.1.0"

__all__ = ["GratConfig", "disable_grat", "enable_grat", "grat_state"]


def enable_grat(pipe_or_transformer: Any, config: GratConfig | None = None, **kwargs) -> GratConfig:
    """GRAT grouped sparse attention on a diffusers pipeline or transformer.

    Takes a :class:`GratConfig` or its fields as keywords (``pattern="cross"``,
    ``group_size=None`` (family default), ``window=1``, ``dense_steps=0``, ``dense_blocks=()``,
    ``backend="auto"``) and returns the config in effect. Supported transformers:
    Flux, SD3, HunyuanVideo, Wan and CogVideoX. See :func:`hasten.pipelines.grat.apply_grat`.

    Examples
    --------
    >>> import hasten, hasten.tiny
    >>> pipe = hasten.tiny.pipeline("flux")
    >>> pipe.enable_grat(pattern="cross", group_size=(4, 4)).pattern
    'cross'
    >>> pipe.disable_grat()
    """
    return apply_grat(pipe_or_transformer, config, **kwargs)


def disable_grat(pipe_or_transformer: Any) -> None:
    """Remove GRAT; the original attention processors (and outputs, bit for bit) come back."""
    remove_grat(pipe_or_transformer)


DiffusionPipeline.enable_grat = enable_grat  # type: ignore[attr-defined]
DiffusionPipeline.disable_grat = disable_grat  # type: ignore[attr-defined]


# Subpackages reachable as attributes after a plain ``import hasten`` (``hasten.tiny.pipeline(...)``),
# imported on first use so that ``import hasten`` stays as light as it is.
_LAZY_SUBMODULES = ("tiny",)


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
