"""Visual-token pruning and KV-cache compression for transformers VLMs, one shared core.

Methods (each a dataclass of its paper's knobs, used the same way)::

    from hasten.token_pruning import HiRED
    with HiRED(budget=0.2).apply(model) as pruner:
        out = model.generate(**inputs, max_new_tokens=64)
    pruner.stats            # PruningStats of the last call

- :class:`HiRED` — CLS-attention top-k before the LLM (LLaVA-1.5).
- :class:`FastV` — last-token attention at LLM layer K, tokens dropped after it (in-LLM stage).
- :class:`MustDrop` — all three stages: window merging before the LLM, a dual text-attention
  filter at several LLM layers, and a decoding cache of the survivors only.
- :class:`ZipVL` — probe-query attention mass picks each layer's important tokens; sparse
  prefill over them and a mixed-precision (4 / 2-bit) KV cache (:mod:`.kv_cache`).
- :class:`GUIKV` — after the prefill, each layer and head keeps a uniform budget of visual
  tokens scored by recent attention, the current screenshot's saliency and the earlier
  screenshots' redundancy (GUI agents).
- :class:`RandomKeep`, :class:`SpatialPool` — baselines.
- SpecVLM (speculative decoding, prunes nothing) moved to :mod:`hasten.speculative`;
  ``hasten.token_pruning.SpecVLM`` still imports, with a ``DeprecationWarning``, for one release.

Supported models: LLaVA, LLaVA-Next, Qwen2-VL, Qwen2.5-VL (see :mod:`.adapters`), with SDPA or
eager attention, batch size > 1 with left padding, and ``generate()`` options unchanged.
"""

import importlib
from typing import Any

# Names load on first use from their own modules: `import hasten.token_pruning` costs nothing, and a
# method imports only what it needs (ZipVL's mixed-precision cache is the one that needs transformers).
_LAZY = {
    "RandomKeep": ".baselines",
    "SpatialPool": ".baselines",
    "ImageTokens": ".core",
    "PruningStats": ".core",
    "TokenPruner": ".core",
    "FastV": ".fastv",
    "GUIKV": ".guikv",
    "HiRED": ".hired",
    "LLMLayerPruner": ".inside_llm",
    "MustDrop": ".mustdrop",
    "ZipVL": ".zipvl",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name == "SpecVLM":  # moved to hasten.speculative (deprecated here for one release)
        import warnings

        warnings.warn(
            "hasten.token_pruning.SpecVLM moved to hasten.speculative.SpecVLM; the old name is removed in "
            "the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        from ..speculative.specvlm import SpecVLM

        return SpecVLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
