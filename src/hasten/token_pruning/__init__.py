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

from .baselines import RandomKeep, SpatialPool
from .core import ImageTokens, PruningStats, TokenPruner
from .fastv import FastV
from .guikv import GUIKV
from .hired import HiRED
from .inside_llm import LLMLayerPruner
from .mustdrop import MustDrop
from .zipvl import ZipVL

__all__ = ["FastV", "GUIKV", "HiRED", "ImageTokens", "LLMLayerPruner", "MustDrop", "PruningStats", "RandomKeep", "SpatialPool",
           "TokenPruner", "ZipVL"]


def __getattr__(name: str):
    if name == "SpecVLM":  # moved to hasten.speculative (deprecated here for one release)
        import warnings

        warnings.warn("hasten.token_pruning.SpecVLM moved to hasten.speculative.SpecVLM; the old name is removed in "
                      "the next release", DeprecationWarning, stacklevel=2)
        from ..speculative.specvlm import SpecVLM

        return SpecVLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
