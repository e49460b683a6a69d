"""Visual-token scores shared by the pruning methods (one place, reused by every method).

- :class:`CLSAttention`: CLS-token attention inside a CLIP-style vision tower, recomputed from
  forward hooks on the chosen layers' ``q_proj`` / ``k_proj`` (so it works with SDPA, eager or
  any attention implementation).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["CLSAttention", "encoder_layers_of"]


def encoder_layers_of(vision_tower: torch.nn.Module) -> torch.nn.ModuleList:
    """The encoder layers of a CLIP-style vision tower (transformers 5 flattens ``vision_model``)."""
    inner = getattr(vision_tower, "vision_model", vision_tower)
    return inner.encoder.layers


class CLSAttention:
    """Records, per image, the CLS query's attention to the patch tokens at chosen encoder layers.

    ``scores[layer]`` is a ``(num_images, num_patches)`` tensor: softmax over all keys (CLS
    included) of the CLS query, summed over heads, CLS column dropped. Layers are counted like
    ``hidden_states``: layer ``i`` is the encoder layer whose output is ``hidden_states[i + 1]``.
    """

    def __init__(self, vision_tower: torch.nn.Module, layers: list[int]):
        encoder_layers = encoder_layers_of(vision_tower)
        self.heads = vision_tower.config.num_attention_heads
        self.layers = [layer % len(encoder_layers) for layer in layers]
        self.scores: dict[int, torch.Tensor] = {}
        self._q: dict[int, torch.Tensor] = {}
        self.handles: list[Any] = []
        for layer in self.layers:
            attention = encoder_layers[layer].self_attn
            self.handles.append(attention.q_proj.register_forward_hook(self._keep_query(layer)))
            self.handles.append(attention.k_proj.register_forward_hook(self._score(layer)))

    def _keep_query(self, layer: int):
        def hook(module, args, output):
            self._q[layer] = output[:, :1]  # the CLS query only
        return hook

    def _score(self, layer: int):
        def hook(module, args, keys):
            query = self._q.pop(layer)
            images, length, width = keys.shape
            head_dim = width // self.heads
            q = query.view(images, 1, self.heads, head_dim).transpose(1, 2)
            k = keys.view(images, length, self.heads, head_dim).transpose(1, 2)
            attention = torch.softmax((q @ k.transpose(-1, -2)).float() * head_dim ** -0.5, dim=-1)
            self.scores[layer] = attention.sum(1)[:, 0, 1:]  # (images, patches), CLS key dropped
        return hook
