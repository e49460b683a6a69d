"""Record and replay self-attention keys / values of chosen tokens, for models with a fused ``to_qkv``.

VoxHammer's mechanism on TRELLIS-style attention (``MultiHeadAttention.to_qkv``): during the
source's inversion the keys and values of the PRESERVED tokens are recorded per (noise level,
layer, batch row) into a :class:`~hasten.attention_processors.feature_cache.FeatureCache`
(region-only, bounded); while editing they overwrite those tokens' keys and values at the same
noise level, so the edited tokens attend the source's context. Forward hooks on ``to_qkv``; the
attention itself is the model's own. ``remove()`` restores the model exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from .feature_cache import FeatureCache

__all__ = ["KVReplay"]


class KVReplay:
    """Hooks on the ``to_qkv`` projections of ``attention_modules`` (see the module docstring)."""

    def __init__(self, attention_modules: list[Any], cache: FeatureCache, preserved: torch.Tensor):
        self.modules, self.cache, self.preserved = attention_modules, cache, preserved
        self.mode = "off"  # "record" | "replay" | "off"
        self.sigma = 1.0
        self._handles: list[Any] = []

    def install(self) -> "KVReplay":
        for index, attention in enumerate(self.modules):
            self._handles.append(attention.to_qkv.register_forward_hook(functools.partial(self._hook, layer=index)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, module, args, output: torch.Tensor, layer: int):
        if self.mode == "off" or len(self.preserved) == 0:
            return None
        channels = output.shape[-1] // 3
        key = (round(self.sigma, 6), layer, output.shape[0])
        if self.mode == "record":
            self.cache.put(key, output[..., channels:], rows=self.preserved)  # K and V of the preserved tokens
            return None
        if key not in self.cache:
            return None
        recorded, rows = self.cache.get(key, device=output.device)
        out = output.clone() if output.requires_grad else output  # a fresh projection: edited in place
        out[:, rows, channels:] = recorded.to(out.dtype)
        return out
