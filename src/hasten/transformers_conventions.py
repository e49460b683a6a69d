"""How the installed transformers release passes things around: the one place that knows.

hasten hooks transformers models from the outside (forward pre-hooks, registered attention
functions, cache layers). Those hooks read and write the keyword arguments that transformers'
own modules hand each other, and some of their names move between releases:

- transformers 5.24 renamed the KV-cache argument ``past_key_values`` to ``cache`` on every
  model's and layer's ``forward`` (the old name still works for callers, with a deprecation
  warning, until 5.40) and the output field ``past_key_values`` to ``cache``. A hook that reads
  ``kwargs["past_key_values"]`` on 5.24 sees no cache, takes every decoding step for a prefill
  and silently prunes nothing.
- transformers 5.24 dropped the ``dtype`` attribute of cache layers (``DynamicLayer``).
- transformers 5.25 kernelizes every model in ``from_pretrained`` by default (the hub
  ``kernels`` package, now a hard dependency): RMSNorm, activations and the rotary embedding may
  be replaced by hub kernels on CUDA/ROCm/XPU. None of them is a hasten patch point (hasten hooks
  decoder layers, the attention function and the cache), and nothing moved that this module
  reads; ``USE_HUB_KERNELS=0`` (or ``use_kernels=False``) turns kernelizing off.

Everything in hasten that touches these conventions asks this module, which reads the
installed release's signatures instead of comparing version numbers, and raises
:class:`PatchPointError` (naming the model class and the transformers version) when a
convention it relies on is gone, so an upstream change fails loudly at attach time instead of
turning a method into a silent no-op.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["CACHE_KEYWORDS", "PatchPointError", "cache_keyword", "cache_of", "output_cache", "transformers_version"]

#: The names the KV cache goes by, newest first (``cache``: transformers >= 5.24).
CACHE_KEYWORDS: tuple[str, ...] = ("cache", "past_key_values")


class PatchPointError(RuntimeError):
    """A model internal that a hasten method hooks is missing or no longer behaves as expected."""


def transformers_version() -> str:
    """The installed transformers release (for error messages)."""
    import transformers

    return transformers.__version__


def patch_point_error(model: Any, what: str) -> PatchPointError:
    """A :class:`PatchPointError` naming ``model``'s class and the transformers version."""
    return PatchPointError(
        f"{what} ({type(model).__name__}, transformers {transformers_version()}); this "
        "transformers release changed an internal hasten hooks: install the tested versions "
        "(requirements/lock.txt) or report it"
    )


def cache_keyword(module: torch.nn.Module) -> str:
    """The keyword under which ``module.forward`` takes the KV cache in this transformers release.

    Raises :class:`PatchPointError` when ``forward`` takes the cache under none of
    :data:`CACHE_KEYWORDS`.

    Examples
    --------
    >>> import hasten.tiny
    >>> model, _ = hasten.tiny.vlm("llava")
    >>> cache_keyword(model.model.language_model) in CACHE_KEYWORDS
    True
    """
    parameters = inspect.signature(module.forward).parameters
    for name in CACHE_KEYWORDS:
        if name in parameters:
            return name
    raise patch_point_error(
        module, f"`{type(module).__name__}.forward` takes the KV cache under none of {CACHE_KEYWORDS}"
    )


def cache_of(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache a forward call received, under whichever of :data:`CACHE_KEYWORDS` the caller
    used (transformers 5.24+ still accepts the old name from callers), or None."""
    for name in CACHE_KEYWORDS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    from transformers.cache_utils import Cache

    for name, value in kwargs.items():  # a cache under a name hasten does not know: a renamed argument
        if isinstance(value, Cache):
            raise PatchPointError(
                f"the KV cache arrived as `{name}`, which hasten does not know (it knows "
                f"{CACHE_KEYWORDS}; transformers {transformers_version()}): install the tested "
                "versions (requirements/lock.txt) or report it"
            )
    return None


def output_cache(output: Any, kwargs: Mapping[str, Any] | None = None) -> Any:
    """The KV cache a model output carries (``output.cache`` or ``output.past_key_values``); else the
    one its call received (``kwargs``, from a forward hook), else None."""
    if isinstance(output, Mapping):
        for name in CACHE_KEYWORDS:
            if output.get(name) is not None:
                return output[name]
    return cache_of(kwargs) if kwargs is not None else None
