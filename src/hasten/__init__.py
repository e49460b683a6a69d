"""hasten: training-free acceleration for diffusers pipelines and transformers VLMs.

One front door for every method, ``hasten.apply`` / ``hasten.remove`` / ``hasten.applied``
(:mod:`hasten.methods`; the table of methods and configs is in ``docs/architecture.md``)::

    import hasten
    handle = hasten.apply(pipe, hasten.GratConfig())      # or a pruner: hasten.apply(vlm, HiRED(0.2))
    image = pipe(prompt).images[0]
    hasten.remove(pipe)                                   # or handle.remove(); or `with hasten.apply(...):`

Importing hasten adds ``enable_grat()`` / ``disable_grat()`` to every
``diffusers.DiffusionPipeline``::

    import hasten
    pipe.enable_grat()            # GRAT-X with the model family's default groups
    image = pipe(prompt).images[0]
    pipe.disable_grat()           # exact original attention processors again

``import hasten`` is light: it imports neither torch, diffusers, transformers nor triton. The two
methods are added to ``DiffusionPipeline`` at once if diffusers is already imported, else the
moment diffusers defines ``DiffusionPipeline`` (an import hook on
``diffusers.pipelines.pipeline_utils``); everything else loads on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .hooks.grat import GratConfig
    from .methods import Handle, applied, apply, remove

__version__ = "0.1.0"

__all__ = ["GratConfig", "Handle", "applied", "apply", "disable_grat", "enable_grat", "grat_state", "remove"]

_PIPELINE_MODULE = "diffusers.pipelines.pipeline_utils"  # where DiffusionPipeline is defined


def enable_grat(pipe_or_transformer: Any, config: GratConfig | None = None, **kwargs) -> GratConfig:
    """GRAT grouped sparse attention on a diffusers pipeline or transformer.

    Takes a :class:`GratConfig` or its fields as keywords (``pattern="cross"``,
    ``group_size=None`` (family default), ``window=1``, ``dense_steps=0``, ``dense_blocks=()``,
    ``backend="auto"``) and returns the config in effect. Supported transformers:
    Flux, SD3, HunyuanVideo, Wan and CogVideoX. See :func:`hasten.hooks.grat.apply_grat`.

    Examples
    --------
    >>> import hasten, hasten.tiny
    >>> pipe = hasten.tiny.pipeline("flux")
    >>> pipe.enable_grat(pattern="cross", group_size=(4, 4)).pattern
    'cross'
    >>> pipe.disable_grat()
    """
    from .hooks.grat import apply_grat

    return apply_grat(pipe_or_transformer, config, **kwargs)


def disable_grat(pipe_or_transformer: Any) -> None:
    """Remove GRAT; the original attention processors (and outputs, bit for bit) come back.

    ``hasten.remove(pipe_or_transformer, GratConfig)``: a ``ValueError`` if GRAT is not on.
    """
    from .hooks.grat import GratConfig
    from .methods import remove as _remove

    _remove(pipe_or_transformer, GratConfig)


def _add_methods(module: Any) -> None:
    pipeline = module.DiffusionPipeline
    pipeline.enable_grat = enable_grat
    pipeline.disable_grat = disable_grat


class _AddMethodsOnImport(importlib.abc.MetaPathFinder):
    """Adds the methods right after diffusers executes the module that defines ``DiffusionPipeline``."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != _PIPELINE_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            original(module)
            _add_methods(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if _PIPELINE_MODULE in sys.modules:
    _add_methods(sys.modules[_PIPELINE_MODULE])
elif not any(isinstance(finder, _AddMethodsOnImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AddMethodsOnImport())


# Reachable as attributes after a plain ``import hasten``, imported on first use.
_LAZY_SUBMODULES = ("tiny",)
_LAZY_NAMES = {
    "GratConfig": ".hooks.grat",
    "grat_state": ".hooks.grat",
    # the front door (hasten.methods imports nothing heavy; a method loads when applied)
    "apply": ".methods",
    "remove": ".methods",
    "applied": ".methods",
    "Handle": ".methods",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
