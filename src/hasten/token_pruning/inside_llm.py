"""The in-LLM stage: drop visual tokens after a chosen decoder layer, during prefill and decoding.

Layers up to ``layer`` see every token. The layer scores the visual tokens: the last prompt
token's attention, recorded from the exact query and keys it uses. The next layer's pre-hook
gathers the kept tokens' hidden states and hands every later layer matching position
embeddings and an attention mask. So the KV cache of layers ``layer + 1 ..`` holds only kept
tokens, and at every decoding step those layers get the same columns of the mask. Positions
are never renumbered: RoPE was already applied from the original position ids.

:class:`LLMLayerPruner` owns the mechanics. A method (e.g. :class:`hasten.token_pruning.FastV`)
only says which tokens to keep from ``ImageTokens.scores``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .adapters import adapter_for
from .core import PruningStats, TokenPruner, gather_plan
from .scoring import LastQueryAttention

__all__ = ["LLMLayerPruner"]


@dataclass
class LLMLayerPruner(TokenPruner):
    """Base class of methods that drop visual tokens inside the LLM, after decoder layer ``layer``.

    Parameters
    ----------
    budget : float
        Fraction of each image's visual tokens kept after ``layer``, in (0, 1].
    layer : int
        The decoder layer whose attention ranks the tokens (0-based); later layers see the kept
        tokens only. Must leave at least one layer after it.
    """

    layer: int = 2

    def attach(self, model) -> "LLMLayerPruner":
        if self._model is not None:
            raise ValueError(f"{type(self).__name__} is already attached to a model; detach() it first")
        adapter = adapter_for(model)
        language_model = adapter.language_model(model)
        layers = language_model.layers
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or not 0 <= self.layer < len(layers) - 1:
            raise ValueError(f"`layer` must be in [0, {len(layers) - 2}] for this {len(layers)}-layer LLM, "
                             f"got {self.layer!r}")
        self._adapter, self._model, self._language_model = adapter, model, language_model
        self._recorder = LastQueryAttention([self.layer])
        self._recorder.install(language_model.config)
        self._handles = [
            model.register_forward_pre_hook(self._record_inputs, with_kwargs=True),
            language_model.register_forward_pre_hook(self._llm_inputs, with_kwargs=True),
            language_model.register_forward_hook(self._measure, with_kwargs=True),
            layers[self.layer + 1].register_forward_pre_hook(self._drop, with_kwargs=True),
            *(layer.register_forward_pre_hook(self._follow, with_kwargs=True) for layer in layers[self.layer + 2:]),
        ]
        return self

    def detach(self) -> None:
        if self._model is not None:
            LastQueryAttention.remove(self._language_model.config)
        super().detach()

    # --- hooks -----------------------------------------------------------------------------------
    def _llm_inputs(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        cache = kwargs.get("past_key_values")
        cached = cache.get_seq_length() if cache is not None else 0
        if cached == 0:
            call = self._state.pop("call", None)
            input_ids = call["input_ids"] if call else None
            if input_ids is None or embeds is None or input_ids.shape != embeds.shape[:2]:
                raise ValueError("token pruning needs `input_ids` (to find the image tokens)")
            batch, length = input_ids.shape
            mask = kwargs.get("attention_mask")
            if isinstance(mask, dict):
                raise ValueError("token pruning needs a 2-D attention mask (got precomputed 4-D masks)")
            positions = kwargs.get("position_ids")
            self._state = {
                "image_mask": input_ids == self._adapter.image_token_id(self._model),
                "mask": mask if mask is not None else torch.ones_like(input_ids),
                "positions": positions if positions is not None else torch.arange(length, device=input_ids.device).expand(batch, -1),
                "length": length,
                "prefill_start": time.perf_counter(),
            }
            self.stats = PruningStats(visual_tokens_in=self._state["image_mask"].sum(1).tolist(), prompt_tokens=length,
                                      prefill_tokens=length)
            self.stats.record_kept(torch.ones_like(self._state["image_mask"]), self._state["image_mask"])
            self._recorder.active = self.budget < 1.0
        elif "plan" in self._state:  # a decoding step: one mask for every layer after `layer`
            mask = kwargs.get("attention_mask")
            if isinstance(mask, dict):
                raise ValueError("token pruning needs a 2-D attention mask (got precomputed 4-D masks)")
            self._state["step_attention"] = self._decode_mask(mask, cached, embeds.shape[1], embeds.dtype)
        return args, kwargs

    def _drop(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1 and "plan" not in self._state and "image_mask" in self._state:
            if self.budget >= 1.0:
                return args, kwargs  # nothing to drop: the exact unpruned model
            start = time.perf_counter()
            self._recorder.active = False
            scores = self._recorder.scores.pop(self.layer)
            images = self._images(self._state["image_mask"], hidden, self._state["positions"])
            keep = ~self._state["image_mask"]
            for image in images:
                image.scores = scores[image.sample, image.positions]
                kept, _ = self.select(image)
                keep[image.sample, image.positions[kept]] = True
            columns, real = gather_plan(keep)
            self._state["plan"] = (columns, real)
            self.stats.record_kept(keep, self._state["image_mask"])
            self.stats.prefill_tokens = columns.shape[1]
            self.stats.stage_seconds["select"] = time.perf_counter() - start
            hidden = hidden.gather(1, columns[..., None].expand(-1, -1, hidden.shape[-1]))
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs["hidden_states"] = hidden
        return args, self._follow(module, args, kwargs)[1]

    def _follow(self, module, args, kwargs):
        if "plan" not in self._state:
            return args, kwargs
        columns, real = self._state["plan"]
        hidden = args[0] if args else kwargs["hidden_states"]
        if "step_attention" not in self._state:  # prefill: everything per token is gathered
            kwargs["attention_mask"] = self._prefill_mask(columns, real, hidden.dtype)
            cos_sin = kwargs.get("position_embeddings")
            if cos_sin is not None:
                kwargs["position_embeddings"] = tuple(self._gather_sequence(t, columns) for t in cos_sin)
            positions = kwargs.get("position_ids")
            if positions is not None and positions.shape[-1] == self._state["length"]:
                index = columns.expand(*positions.shape[:-2], *columns.shape) if positions.dim() > 2 else columns
                kwargs["position_ids"] = positions.gather(-1, index)
            if kwargs.get("cache_position") is not None:
                kwargs["cache_position"] = torch.arange(columns.shape[1], device=columns.device)
        else:
            kwargs["attention_mask"] = self._state["step_attention"]
        return args, kwargs

    # --- masks -----------------------------------------------------------------------------------
    def _prefill_mask(self, columns, real, dtype) -> torch.Tensor:
        """Additive (batch, 1, n, n) causal mask over the kept tokens (pad slots see only themselves)."""
        valid = real & self._state["mask"].gather(1, columns).bool()
        n = columns.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=columns.device).tril()
        allowed = causal & valid[:, None, :]
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=columns.device)  # no empty rows: no NaN
        return self._additive(allowed[:, None], dtype)

    def _decode_mask(self, mask, cached: int, queries: int, dtype) -> torch.Tensor:
        """Additive (batch, 1, queries, kept + generated) mask of a decoding step, for the later layers.

        ``mask`` is generate()'s 2-D mask over the original prompt + generated tokens (or None:
        all ones); ``cached`` the full-length cache of the early layers.
        """
        columns, real = self._state["plan"]
        length = self._state["length"]
        generated = cached - length + queries  # generated tokens, this step's included
        prompt = real & self._state["mask"].gather(1, columns).bool()
        if mask is None:
            later = torch.ones(columns.shape[0], generated, dtype=torch.bool, device=columns.device)
        else:
            later = mask[:, length:length + generated].bool()
        keys = torch.cat([prompt, later], 1)
        total = keys.shape[1]
        query_positions = total - queries + torch.arange(queries, device=columns.device)
        causal = torch.arange(total, device=columns.device)[None] <= query_positions[:, None]
        return self._additive(keys[:, None, None, :] & causal[None, None], dtype)

    @staticmethod
    def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    @staticmethod
    def _gather_sequence(tensor: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Gather the sequence axis (-2) of a cos/sin table ``(..., batch, length, dim)``."""
        lead = tensor.dim() - 3
        index = columns.view(*([1] * lead), *columns.shape, 1).expand(*tensor.shape[:-2], columns.shape[1], tensor.shape[-1])
        return tensor.gather(-2, index)

    def select(self, image) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError
