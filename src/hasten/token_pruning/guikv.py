"""GUI-KV: KV-cache compression for GUI agents with many screenshots (Salesforce, 2025).

After the prefill, every layer's cache keeps ``int(L * budget)`` of a sample's ``L`` prompt
tokens per head (the official code's uniform ``max_capacity_prompt``): the last ``window`` (8)
prompt tokens always, and the best-scored of the tokens before them, text and visual alike
(text competes for the same budget). Each layer scores those tokens per KV head:

1. Base: SnapKV-style attention of the last ``window`` prompt queries, SUMMED over them (as the
   reference does), then average-pooled along the sequence (width ``pool`` = 5, zero padding
   counted, as ``F.avg_pool1d``'s default).
2. Spatial saliency, on the current (last) screenshot only: the L2 norm of each token's input
   to the attention (the layer's ``input_layernorm`` output), z-scored over the screenshot,
   ``softmax(z / temperature)`` (temperature 3.5), times ``alpha``, added to the base score.
3. Temporal redundancy, per KV head: a QR decomposition of the current screenshot's keys gives a
   basis of rank <= ``rank`` (32); each earlier-screenshot token's residual is the distance of
   its key to that subspace, and the ``1 - int(L * budget) / L`` fraction of earlier tokens with
   the smallest residuals (the most redundant) score 0.

Then each head keeps its top tokens, so a head's cache holds its own choice (the same count in
every head, which keeps one tensor per layer; :attr:`PruningStats.kv_kept_positions` lists them).
Decoding attends the compressed cache at every layer; positions continue from the original prompt.

Where hasten differs from the released code, deliberately:

- Grouped-query attention: the reference repeats each KV head for its query heads
  (``repeat_kv``) and selects per query head, so its cache grows to one copy per query head;
  hasten scores per KV head (the base score averaged over the group's query heads) and keeps
  one cache per KV head, as the model stores it: the cache stays ``num_key_value_heads`` wide.
- The temporal term uses the keys BEFORE RoPE, so that the same content at a later position
  counts as redundant (after RoPE, position alone makes a repeated screenshot look new).
- ``alpha`` is 2.0, the released code's value (the paper's text says 0.5), because the code is
  what produced the reported numbers.
- A budget smaller than the window keeps the window (the reference asserts instead).

Screenshots are the images of a sample in order, the last one is current. With one screenshot
there is no temporal term.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from .._validation import check_positive_int
from ..transformers_conventions import cache_of, output_cache, patch_point_error
from .core import PromptPlan, TokenPruner
from .scoring import QueryAttention, subspace_residuals, z_saliency

__all__ = ["GUIKV"]


@dataclass
class GUIKV(TokenPruner):
    """GUI-KV cache compression after the prefill.

    Parameters
    ----------
    budget : float, default 0.2
        Fraction of each sample's prompt tokens every layer and head keeps, ``int(L * budget)``
        entries, the window included (the paper reports near-full accuracy at 10-20%).
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
    >>> inputs["input_ids"].shape[1], pruner.stats.kv_kept_positions[0].shape  # (batch, kv_heads, int(L * budget))
    (71, torch.Size([1, 2, 17]))
    """

    budget: float = 0.2
    window: int = 8

    # The budget is over every prompt token (text competes), so a head may keep all visual tokens.
    drops_visual_tokens: ClassVar[bool] = False
    pool: int = 5
    alpha: float = 2.0
    temperature: float = 3.5
    rank: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("window", "pool", "rank"):
            value = getattr(self, name)
            check_positive_int(value, name)
        if self.alpha < 0:
            raise ValueError(f"`alpha` must be >= 0, got {self.alpha!r}")
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature!r}")
        if self.renumber:
            raise ValueError("GUI-KV compresses the cache after the prefill: `renumber` does not apply")

    # --- hooks -------------------------------------------------------------------------------------
    def _extra_hooks(self, model, adapter, language_model) -> list:
        layers = language_model.layers
        missing = [index for index, layer in enumerate(layers) if getattr(layer, "input_layernorm", None) is None]
        if missing:
            raise patch_point_error(
                model,
                f"GUI-KV: decoder layers {missing} have no `input_layernorm` (the "
                "attention's input, whose norm is the spatial saliency)",
            )
        self._recorder = QueryAttention(list(range(len(layers))))
        self._recorder.per_head = True
        handles = []
        for index, layer in enumerate(layers):
            handles.append(layer.input_layernorm.register_forward_hook(functools.partial(self._norms, index=index)))
            handles.append(layer.self_attn.k_proj.register_forward_hook(functools.partial(self._keys, index=index)))
        return handles

    def _attention_hook(self, language_model):
        return self._recorder

    # --- the language model's inputs and outputs ---------------------------------------------------
    def _before_llm(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        cache = cache_of(kwargs)
        cached = cache.get_seq_length() if cache is not None else 0
        if cached:
            if "prefill" in self._state:
                kwargs = self._decode(kwargs, embeds, cached)
            return args, kwargs
        prompt = self._prompt(kwargs, embeds)
        self.stats = self._full_prompt_stats(prompt)
        valid = prompt["mask"].bool()
        self._state = dict(
            prompt, valid=valid, norms={}, keys={}, prefill_start=time.perf_counter(), collecting=self.budget < 1.0
        )
        self._recorder.rows = [row.nonzero()[:, 0][-self.window :] for row in valid]
        self._recorder.active = self.budget < 1.0
        return args, kwargs

    def _norms(self, module, args, output, index: int):
        if self._state.get("collecting"):  # the attention's input: after the layer's input_layernorm
            self._state["norms"][index] = output.float().norm(dim=-1)

    def _keys(self, module, args, output, index: int):
        if self._state.get("collecting"):
            self._state["keys"][index] = output  # (batch, length, kv_heads * head_dim), before RoPE

    def _after_llm(self, module, args, kwargs, output):
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
    def capacity(self, length: int) -> int:
        """Cache entries each head keeps of a ``length``-token prompt: ``int(length * budget)`` (the
        reference's ``max_capacity_prompt``), never fewer than the ``window`` tokens always kept."""
        return min(length, max(int(length * self.budget), self.window))

    def _compress_cache(self, cache) -> None:
        state = self._state
        image_mask, valid = state["image_mask"], state["valid"]
        images = self._images(
            image_mask, torch.zeros(*image_mask.shape, 1, device=image_mask.device), None, layouts=False
        )
        screenshots = [[image.positions for image in images if image.sample == row] for row in range(len(valid))]
        prompts = [valid[row].nonzero()[:, 0] for row in range(len(valid))]  # each row's prompt positions
        lengths = [self.capacity(len(prompt)) for prompt in prompts]
        width = max(lengths)
        kept_per_layer = []
        for index, layer in enumerate(cache.layers):
            kv_heads, head_dim = layer.keys.shape[1], layer.keys.shape[-1]
            slots = torch.zeros(len(valid), kv_heads, width, dtype=torch.long, device=layer.keys.device)
            for row, prompt in enumerate(prompts):
                prompt = prompt.to(slots.device)
                prefix, window = prompt[: -self.window], prompt[-self.window :]
                scores = self._scores(
                    index, row, prefix, screenshots[row], kv_heads, head_dim, lengths[row] / len(prompt)
                )  # (kv_heads, len(prefix))
                top = scores.topk(lengths[row] - len(window), dim=-1).indices
                kept = torch.cat([prefix[top], window.expand(kv_heads, -1)], -1)
                slots[row, :, width - kept.shape[1] :] = kept.sort(-1).values
            index_ = slots[..., None]
            layer.keys = layer.keys.gather(2, index_.expand(-1, -1, -1, head_dim))
            layer.values = layer.values.gather(2, index_.expand(-1, -1, -1, layer.values.shape[-1]))
            real = (
                torch.arange(width, device=slots.device) >= width - torch.tensor(lengths, device=slots.device)[:, None]
            )
            kept_per_layer.append(torch.where(real[:, None], slots, -1))
        self._plan_decoding(kept_per_layer[0])
        self.stats.kv_kept_positions = [kept.cpu() for kept in kept_per_layer]
        self.stats.visual_tokens_kept = [
            self._visual_kept(image_mask[row], [kept[row] for kept in kept_per_layer]) for row in range(len(valid))
        ]

    @staticmethod
    def _visual_kept(image_mask: torch.Tensor, kept: list[torch.Tensor]) -> int:
        """Visual entries one sample's cache keeps, averaged over layers and heads (each head keeps
        its own choice; text competes for the same budget)."""
        counts = []
        for slots in kept:  # (kv_heads, width) prompt positions, -1 on pad slots
            flags = (slots >= 0) & image_mask.to(slots.device)[slots.clamp_min(0)]
            counts.append(flags.sum(-1).float().mean())
        return round(float(torch.stack(counts).mean()))

    def _scores(
        self,
        index: int,
        row: int,
        prefix: torch.Tensor,
        screenshots: list[torch.Tensor],
        kv_heads: int,
        head_dim: int,
        kept_ratio: float,
    ) -> torch.Tensor:
        """(kv_heads, len(prefix)) scores at layer ``index`` of the prompt tokens before the window.

        Computed over the whole row, with the base score zero outside the prefix, so that the
        pooling's zero padding at the prefix's edges is the reference's (it pools the prefix alone).
        """
        state = self._state
        recorded = self._recorder.scores.get(index)
        if recorded is None:
            raise patch_point_error(
                self._model,
                f"GUI-KV: decoder layer {index}'s attention did not go through "
                "transformers' attention-function registry",
            )
        attention = recorded[row].float().sum(1)  # (heads, keys): summed over the window queries
        heads = attention.shape[0]
        attention = attention.view(kv_heads, heads // kv_heads, -1).mean(1)
        prefix = prefix.to(attention.device)
        base = torch.zeros_like(attention)
        base[:, prefix] = attention[:, prefix]
        scores = torch.nn.functional.avg_pool1d(base[:, None], self.pool, stride=1, padding=self.pool // 2)[
            :, 0, : base.shape[-1]
        ]
        if screenshots:
            current = screenshots[-1].to(scores.device)
            scores[:, current] += self.alpha * z_saliency(state["norms"][index][row, current], self.temperature).to(
                scores.device
            )
        if len(screenshots) > 1:  # temporal redundancy of the earlier screenshots
            earlier = torch.cat(screenshots[:-1]).to(scores.device)
            keys = state["keys"][index][row].view(-1, kv_heads, head_dim).transpose(0, 1)  # (kv, len, dim)
            residual = subspace_residuals(keys[:, current], keys[:, earlier], self.rank)
            redundant = int((1.0 - kept_ratio) * len(earlier))
            if redundant:
                zero = earlier[residual.topk(redundant, dim=-1, largest=False).indices]  # (kv, redundant)
                scores.scatter_(1, zero, 0.0)
        return scores[:, prefix]

    def _plan_decoding(self, kept: torch.Tensor) -> None:
        """The LLM-level rewrite of every decoding step: generate()'s prompt -> the compressed cache.

        ``kept`` ``(batch, kv_heads, slots)``: one layer's kept positions, -1 on pad slots (every
        head keeps the same count, so any head's real columns have mask 1)."""
        state = self._state
        real = kept[:, 0] >= 0
        columns = kept[:, 0].clamp_min(0)
        positions = state["positions"]
        self._state["prefill"] = PromptPlan(
            columns=columns,
            real=real,
            length=state["length"],
            next_position=self._last_positions(positions) + 1,
            position_shape=positions.shape[:-2],
        )
        self.stats.prefill_tokens = state["length"]
