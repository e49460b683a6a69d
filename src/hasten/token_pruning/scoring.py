"""Visual-token scores shared by the pruning methods (one place, reused by every method).

- :class:`CLSAttention`: CLS-token attention inside a CLIP-style vision tower, recomputed from
  forward hooks on the chosen layers' ``q_proj`` / ``k_proj`` (so it works with SDPA, eager or
  any attention implementation).
- :class:`QueryAttention`: the attention of the last prompt token (FastV's ranking;
  SnapKV-style scores), or of chosen query rows such as every text token (MustDrop), to every
  key at chosen LLM layers, recomputed from the exact queries and keys the layer uses (after
  RoPE) through a registered transformers attention function that wraps the model's own one.
- :func:`l2_saliency`: the L2 norm of each token's hidden state.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["CLSAttention", "QueryAttention", "encoder_layers_of", "l2_saliency"]

_RECORDING = "hasten_record"  # the registered attention function name


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


def _wrapped_attention(module, query, key, value, attention_mask, **kwargs):
    """Registered attention function: record if asked, then run the model's own implementation."""
    config = module.config
    recorder = getattr(config, "_hasten_recorder", None)
    if recorder is not None:
        recorder.observe(module, query, key, attention_mask, kwargs.get("scaling"))
    original = config._hasten_original_attn
    if original == "eager":
        import sys

        function = sys.modules[type(module).__module__].eager_attention_forward
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        function = ALL_ATTENTION_FUNCTIONS[original]
    return function(module, query, key, value, attention_mask, **kwargs)


def l2_saliency(hidden: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each token's hidden state (last axis), in float32: a CLS-free saliency."""
    return hidden.float().norm(dim=-1)


class QueryAttention:
    """Records, during a prefill, some queries' attention over all keys at chosen layers.

    With ``rows = None`` (the default) the last query is scored: ``scores[layer]`` is
    ``(batch, keys)``, the softmax of the last query row (the model's scaling and mask applied)
    averaged over heads. Set ``rows`` to one LongTensor of query indices per sample to score
    those instead: ``scores[layer]`` is then a list of ``(len(rows[b]), keys)`` tensors.
    Install with :meth:`install` on the language model's config, remove with :meth:`remove`
    (the original attention implementation returns).
    """

    def __init__(self, layers: list[int]):
        self.layers = set(layers)
        self.scores: dict[int, Any] = {}
        self.rows: list[torch.Tensor] | None = None
        self.active = False

    def install(self, config) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        original = config._attn_implementation
        if getattr(config, "_hasten_recorder", None) is not None:
            raise ValueError("another hasten method already records attention on this model")
        name = f"{_RECORDING}_{original}"  # masks are built exactly as for the original implementation
        AttentionInterface.register(name, _wrapped_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
        config._hasten_original_attn = original
        config._hasten_recorder = self
        config._attn_implementation = name

    @staticmethod
    def remove(config) -> None:
        if getattr(config, "_hasten_recorder", None) is None:
            return
        config._attn_implementation = config._hasten_original_attn
        del config._hasten_recorder, config._hasten_original_attn

    def observe(self, module, query, key, mask, scaling) -> None:
        layer = getattr(module, "layer_idx", None)
        if not self.active or layer not in self.layers or query.shape[2] < 2:
            return
        heads, kv_heads = query.shape[1], key.shape[1]
        keys = (key.repeat_interleave(heads // kv_heads, dim=1) if heads != kv_heads else key).float()
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        length = keys.shape[2]
        if self.rows is None:
            self.scores[layer] = self._probabilities(query[:, :, -1:].float() @ keys.transpose(-1, -2) * scale,
                                                     mask, slice(-1, None), None, length).mean(1)[:, 0]
            return
        self.scores[layer] = [
            self._probabilities(query[b:b + 1, :, rows].float() @ keys[b:b + 1].transpose(-1, -2) * scale,
                                None if mask is None else mask[min(b, mask.shape[0] - 1)][None], rows, rows, length).mean(1)[0]
            for b, rows in enumerate(self.rows)
        ]

    @staticmethod
    def _probabilities(logits, mask, rows, causal_rows, length):
        """Softmax of (1|B, H, R, S) logits under the layer's mask (or causal order where it is None)."""
        if mask is not None:
            row = mask[..., rows, :length]
            return torch.softmax(logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool
                                 else logits + row.float(), dim=-1)
        if causal_rows is not None:  # no mask given: SDPA's causal order
            future = torch.arange(length, device=logits.device)[None] > causal_rows[:, None]
            logits = logits.masked_fill(future, float("-inf"))
        return torch.softmax(logits, dim=-1)
