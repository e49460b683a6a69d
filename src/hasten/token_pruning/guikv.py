"""GUI-KV: KV-cache compression for GUI agents with many screenshots (Salesforce, 2025).

After the prefill, every layer's cache keeps the same number of visual tokens per head,
``floor(budget * n)`` of a sample's ``n`` visual tokens (a uniform budget; text is always kept).
Each layer scores the visual tokens per KV head:

1. Base: SnapKV-style attention of the last ``window`` (8) prompt queries, averaged over them
   and over the query heads of the KV head, then average-pooled along the sequence (width
   ``pool`` = 5).
2. Spatial saliency, on the current (last) screenshot only: the L2 norm of each token's hidden
   state entering the layer, z-scored over the screenshot, ``softmax(z / temperature)``
   (temperature 3.5), times ``alpha``, added to the base score.
3. Temporal redundancy, per KV head: a QR decomposition of the current screenshot's keys gives a
   basis of rank <= ``rank`` (32); each earlier-screenshot token's residual is the distance of
   its key to that subspace, and the ``1 - budget`` fraction of earlier tokens with the smallest
   residuals (the most redundant) score 0.

Then each head keeps its top visual tokens, so a head's cache holds its own choice of tokens
(the same count in every head, which keeps one tensor per layer). Decoding attends the
compressed cache at every layer; positions continue from the original prompt.

Choices where the paper and its code leave room (documented on the fields): ``alpha`` is 2.0,
the released code's value (the paper's text says 0.5), because the code is what produced the
reported numbers; the temporal term uses the keys BEFORE RoPE, so that the same content at a
later position counts as redundant (after RoPE, position alone makes a repeated screenshot look
new); screenshots are the images of a sample in order, the last one is current. With one
screenshot there is no temporal term.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch

from ..transformers_conventions import cache_of, output_cache, patch_point_error
from .core import PruningStats, TokenPruner
from .scoring import AttentionHook, QueryAttention, subspace_residuals, z_saliency

__all__ = ["GUIKV"]


@dataclass
class GUIKV(TokenPruner):
    """GUI-KV cache compression after the prefill.

    Parameters
    ----------
    budget : float, default 0.2
        Fraction of each sample's visual tokens every layer and head keeps (the paper reports
        near-full accuracy at 10-20%).
    window : int, default 8
        Last prompt queries whose attention is the base score (SnapKV).
    pool : int, default 5
        Width of the average pooling of the base score.
    alpha : float, default 2.0
        Weight of the spatial saliency (released code: 2; paper text: 0.5).
    temperature : float, default 3.5
        Softmax temperature of the z-scored saliency.
    rank : int, default 32
        Largest rank of the current screenshot's key subspace.

    Examples
    --------
    >>> import hasten.tiny
    >>> from hasten.tiny.gui import trajectory
    >>> from hasten.tiny.vlms import chat_prompt
    >>> model, processor = hasten.tiny.vlm("qwen2.5-vl")
    >>> shots, _ = trajectory(steps=3, size=(32, 32))
    >>> inputs = processor(images=shots, text=[chat_prompt(processor, "Next action?", images=3)],
    ...                    return_tensors="pt")
    >>> with GUIKV(budget=0.25).apply(model) as pruner:
    ...     _ = model.generate(**inputs, max_new_tokens=2)
    >>> pruner.stats.visual_tokens_kept
    [12]
    """

    budget: float = 0.2
    window: int = 8
    pool: int = 5
    alpha: float = 2.0
    temperature: float = 3.5
    rank: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("window", "pool", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        if self.alpha < 0:
            raise ValueError(f"`alpha` must be >= 0, got {self.alpha!r}")
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature!r}")
        if self.renumber:
            raise ValueError("GUI-KV compresses the cache after the prefill: `renumber` does not apply")

    # --- attach --------------------------------------------------------------------------------------
    def attach(self, model) -> "GUIKV":
        adapter = self._check_model(model)
        self._adapter, self._model = adapter, model
        language_model = adapter.language_model(model)
        self._language_model = language_model
        layers = language_model.layers
        self._recorder = QueryAttention(list(range(len(layers))))
        self._recorder.per_head = True
        self._recorder.install(language_model.config)
        self._handles = [
            model.register_forward_pre_hook(self._record_inputs, with_kwargs=True),
            language_model.register_forward_pre_hook(self._llm_inputs, with_kwargs=True),
            language_model.register_forward_hook(self._compress, with_kwargs=True),
        ]
        for index, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(functools.partial(self._norms, index=index),
                                                                 with_kwargs=True))
            self._handles.append(layer.self_attn.k_proj.register_forward_hook(functools.partial(self._keys,
                                                                                               index=index)))
        return self

    def detach(self) -> None:
        if self._model is not None:
            AttentionHook.remove(self._language_model.config)
        super().detach()

    # --- hooks ---------------------------------------------------------------------------------------
    def _llm_inputs(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        cache = cache_of(kwargs)
        cached = cache.get_seq_length() if cache is not None else 0
        if cached:
            if "prefill" in self._state:
                kwargs = self._decode(kwargs, embeds, cached)
            return args, kwargs
        prompt = self._prompt(kwargs, embeds)
        length = prompt["length"]
        self.stats = PruningStats(visual_tokens_in=prompt["image_mask"].sum(1).tolist(), prompt_tokens=length,
                                  prefill_tokens=length, layer_tokens=[length] * len(module.layers))
        self.stats.record_kept(torch.ones_like(prompt["image_mask"]), prompt["image_mask"])
        valid = prompt["mask"].bool()
        self._state = dict(prompt, valid=valid, norms={}, keys={}, prefill_start=time.perf_counter(),
                           collecting=self.budget < 1.0)
        self._recorder.rows = [row.nonzero()[:, 0][-self.window:] for row in valid]
        self._recorder.active = self.budget < 1.0
        return args, kwargs

    def _norms(self, module, args, kwargs, index: int):
        if self._state.get("collecting"):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._state["norms"][index] = hidden.float().norm(dim=-1)

    def _keys(self, module, args, output, index: int):
        if self._state.get("collecting"):
            self._state["keys"][index] = output  # (batch, length, kv_heads * head_dim), before RoPE

    def _compress(self, module, args, kwargs, output):
        state = self._state
        cache = output_cache(output, kwargs)
        if state.get("collecting") and cache is not None:
            state["collecting"] = False
            self._recorder.active = False
            start = time.perf_counter()
            self._compress_cache(cache)
            self.stats.stage_seconds["compress"] = time.perf_counter() - start
        self._measure(module, args, kwargs, output)

    # --- the compression -----------------------------------------------------------------------------
    def _compress_cache(self, cache) -> None:
        state = self._state
        image_mask, valid = state["image_mask"], state["valid"]
        images = self._images(image_mask, torch.zeros(*image_mask.shape, 1, device=image_mask.device), None,
                              layouts=False)
        screenshots = [[image.positions for image in images if image.sample == row] for row in range(len(valid))]
        visual = image_mask.sum(1)
        keep_counts = [max(1, int(self.budget * int(n))) if int(n) else 0 for n in visual]
        text = valid & ~image_mask
        lengths = [int(text[row].sum()) + keep_counts[row] for row in range(len(valid))]
        width = max(lengths)
        kept_per_layer = []
        for index, layer in enumerate(cache.layers):
            kv_heads, head_dim = layer.keys.shape[1], layer.keys.shape[-1]
            slots = torch.zeros(len(valid), kv_heads, width, dtype=torch.long, device=layer.keys.device)
            for row in range(len(valid)):
                scores = self._scores(index, row, screenshots[row], kv_heads, head_dim)  # (kv_heads, visual)
                visual_positions = torch.cat(screenshots[row]) if screenshots[row] else slots.new_zeros(0)
                top = scores.topk(keep_counts[row], dim=-1).indices if keep_counts[row] else scores.new_zeros(
                    kv_heads, 0, dtype=torch.long)
                kept = torch.cat([text[row].nonzero()[:, 0].expand(kv_heads, -1), visual_positions[top]], -1)
                slots[row, :, width - kept.shape[1]:] = kept.sort(-1).values
            index_ = slots[..., None]
            layer.keys = layer.keys.gather(2, index_.expand(-1, -1, -1, head_dim))
            layer.values = layer.values.gather(2, index_.expand(-1, -1, -1, layer.values.shape[-1]))
            kept_per_layer.append(slots)
        self._plan_decoding(lengths, width, kept_per_layer[0])
        state["kept"] = kept_per_layer  # per layer (batch, kv_heads, slots): prompt positions in the cache
        self.stats.visual_tokens_kept = keep_counts

    def _scores(self, index: int, row: int, screenshots: list[torch.Tensor], kv_heads: int, head_dim: int):
        """(kv_heads, visual tokens of the sample) scores at layer ``index``, screenshots in order."""
        if not screenshots:
            return torch.zeros(kv_heads, 0)
        state = self._state
        recorded = self._recorder.scores.get(index)
        if recorded is None:
            raise patch_point_error(self._model, f"GUI-KV: decoder layer {index}'s attention did not go through "
                                                 "transformers' attention-function registry")
        attention = recorded[row].mean(1)  # (heads, keys)
        heads = attention.shape[0]
        attention = attention.view(kv_heads, heads // kv_heads, -1).mean(1)
        pooled = torch.nn.functional.avg_pool1d(attention[:, None], self.pool, stride=1, padding=self.pool // 2,
                                                count_include_pad=False)[:, 0]
        positions = torch.cat(screenshots).to(pooled.device)
        scores = pooled[:, positions].clone()
        current = screenshots[-1].to(pooled.device)
        start = len(positions) - len(current)
        scores[:, start:] += self.alpha * z_saliency(state["norms"][index][row, current], self.temperature)
        if start:  # temporal redundancy of the earlier screenshots
            keys = state["keys"][index][row].view(-1, kv_heads, head_dim).transpose(0, 1)  # (kv, len, dim)
            residual = subspace_residuals(keys[:, current], keys[:, positions[:start]], self.rank)
            redundant = math.floor((1 - self.budget) * start)
            if redundant:
                zero = residual.topk(redundant, dim=-1, largest=False).indices
                scores[:, :start].scatter_(1, zero, 0.0)
            self._state.setdefault("residuals", {})[(index, row)] = residual
        return scores

    def _plan_decoding(self, lengths: list[int], width: int, slots: torch.Tensor) -> None:
        """The LLM-level rewrite of every decoding step: generate()'s prompt -> the compressed cache."""
        state = self._state
        real = torch.arange(width, device=slots.device)[None] >= (width - torch.tensor(lengths, device=slots.device))[:, None]
        columns = torch.where(real, slots[:, 0], 0)  # any real column of the slot's row has mask 1
        positions = state["positions"]
        self._state["prefill"] = dict(
            columns=columns, real=real, length=state["length"], dropped=state["length"] - width,
            next_position=self._last_positions(positions) + 1, position_shape=positions.shape[:-2])
        self.stats.prefill_tokens = state["length"]
