"""ZipVL: dynamic token sparsification and a mixed-precision KV cache (He et al., 2024, arXiv 2410.08584).

At every LLM layer of the prefill:

1. Probe queries (ZipCache: the last 5% of the tokens plus a random 5%) score every key with
   their attention, normalised by how many probes can see the key.
2. The important tokens are the fewest top-scoring ones that hold a fraction ``tau`` of the
   score mass (0.975 by default), so the ratio adapts to the layer and the input.
3. The layer's prefill attention runs over the important keys only (sparse prefill: every
   query attends the gathered important keys, causally), with the model's own attention
   implementation (SDPA, eager).
4. The layer's KV cache keeps important tokens at ``high_bits`` (4) and the rest at
   ``low_bits`` (2) (:mod:`.kv_cache`); generated tokens stay in a full-precision window and
   are compressed every ``recompress_every`` (100) tokens.

No token is dropped: ZipVL trades attention FLOPs and cache bytes, not sequence length. All
tokens take part (text and visual), as in the paper. ``tau = 1.0`` with 16-bit precision for
both classes gives exactly the unpruned model.

No official code was released; choices where the paper leaves room (documented on the fields):
the random probes are drawn with a fixed seed per call, so a call is reproducible; the first
real token (the attention sink) is always important; decoded tokens are compressed at
``high_bits``; ``budget`` < 1 additionally caps the important count per layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..transformers_conventions import cache_of, patch_point_error
from .core import PruningStats, TokenPruner
from .kv_cache import MixedPrecisionConfig, install_mixed_precision, mixed_precision_cache
from .scoring import AttentionHook, mass_count, normalized_probe_attention, probe_queries

__all__ = ["ZipVL"]


@dataclass
class ZipVL(TokenPruner):
    """ZipVL sparse prefill + mixed-precision KV cache.

    Parameters
    ----------
    budget : float, default 1.0
        Cap on the important fraction per layer (1.0: the mass rule alone, as in the paper).
    tau : float, default 0.975
        Attention-mass fraction the important tokens hold (paper: 0.96-0.975), in (0, 1].
    probe_fraction : float, default 0.05
        Recent and random probe queries, each this fraction of the tokens (ZipCache: 5% + 5%).
    cache : MixedPrecisionConfig
        Bit widths (4 / 2), full-precision window and re-compression interval (100 tokens).
    sparse_prefill : bool, default True
        Run each layer's prefill attention over its important keys only.
    fused_decode : bool, default True
        Decoding steps attend the quantised cache without dequantising it (a fused Triton
        kernel on CUDA, its torch reference elsewhere); False dequantises the whole cache every
        step, as transformers' quantised caches do.
    seed : int, default 0
        Seeds the random probes of every call.

    Examples
    --------
    >>> import hasten.tiny
    >>> from hasten.tiny.vlms import chat_prompt
    >>> from PIL import Image
    >>> model, processor = hasten.tiny.vlm("llava")
    >>> inputs = processor(images=[Image.new("RGB", (32, 32))], text=[chat_prompt(processor, "Hi?")],
    ...                    return_tensors="pt")
    >>> with ZipVL().apply(model) as pruner:
    ...     _ = model.generate(**inputs, max_new_tokens=2)
    >>> 0 < pruner.stats.kv_cache_bytes
    True
    """

    budget: float = 1.0
    tau: float = 0.975

    drops_visual_tokens: ClassVar[bool] = False  # every token stays, important ones at higher precision
    probe_fraction: float = 0.05
    cache: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)
    sparse_prefill: bool = True
    fused_decode: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 < self.tau <= 1.0:
            raise ValueError(f"`tau` must be in (0, 1], got {self.tau!r}")
        if not 0.0 < self.probe_fraction <= 0.5:
            raise ValueError(f"`probe_fraction` must be in (0, 0.5], got {self.probe_fraction!r}")
        if not isinstance(self.cache, MixedPrecisionConfig):
            raise ValueError(f"`cache` must be a MixedPrecisionConfig, got {type(self.cache).__name__}")
        if self.renumber:
            raise ValueError("ZipVL drops no token: `renumber` does not apply")

    def attach(self, model) -> "ZipVL":
        adapter = self._check_model(model)
        self._adapter, self._model = adapter, model
        language_model = adapter.language_model(model)
        self._language_model = language_model
        self._hook = _ZipVLAttention(self)
        self._hook.install(language_model.config)
        self._handles = [
            model.register_forward_pre_hook(self._record_inputs, with_kwargs=True),
            language_model.register_forward_pre_hook(self._llm_inputs, with_kwargs=True),
            language_model.register_forward_hook(self._measure, with_kwargs=True),
        ]
        return self

    def detach(self) -> None:
        if self._model is not None:
            AttentionHook.remove(self._language_model.config)
        super().detach()

    def _llm_inputs(self, module, args, kwargs):
        cache = cache_of(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            return args, kwargs
        prompt = self._prompt(kwargs, kwargs.get("inputs_embeds"))
        length = prompt["length"]
        layers = len(module.layers)
        self.stats = PruningStats(visual_tokens_in=prompt["image_mask"].sum(1).tolist(), prompt_tokens=length,
                                  prefill_tokens=length, layer_tokens=[length] * layers)
        self.stats.record_kept(torch.ones_like(prompt["image_mask"]), prompt["image_mask"])
        self.stats.layer_important = [1.0] * layers
        cache_layers = None
        use_cache = kwargs.get("use_cache")
        if cache is None and (use_cache if use_cache is not None else module.config.use_cache):
            cache = kwargs[self._cache_keyword] = mixed_precision_cache(self.cache, layers)  # plain forward calls
        if cache is not None:
            cache_layers = install_mixed_precision(cache, layers, self.cache)
            for layer in cache_layers:
                layer.fused = self.fused_decode
        self._state = dict(valid=prompt["mask"].bool(), cache_layers=cache_layers, image_mask=prompt["image_mask"],
                           probes=probe_queries(prompt["mask"].bool(), self.probe_fraction, self.seed),
                           prefill_start=time.perf_counter())
        return args, kwargs

    def _check_pruned(self) -> None:
        """Every decoder layer's prefill attention must have come through the hook (else its
        cache was never compressed: a moved attention patch point, not a result)."""
        scored = self._state.get("scored_layers", set())
        layers = len(self._language_model.layers)
        if len(scored) < layers:
            raise patch_point_error(self._model, f"ZipVL: the prefill attention of layers "
                                                 f"{sorted(set(range(layers)) - scored)} did not go through "
                                                 "transformers' attention-function registry")

    def important(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
        """``(batch, length)`` flags of one layer's important tokens (see the module docstring)."""
        valid, probes = self._state["valid"], self._state["probes"]
        flags = torch.zeros_like(valid)
        for row in range(valid.shape[0]):
            scores = normalized_probe_attention(query[row], key[row], probes[row].to(key.device), scaling,
                                                valid[row]).masked_fill(~valid[row], 0.0)
            real = int(valid[row].sum())
            count = min(mass_count(scores[valid[row]], self.tau), real)
            if self.budget < 1.0:
                count = min(count, max(1, int(self.budget * real)))
            flags[row, scores.topk(count).indices] = True
            flags[row, valid[row].nonzero()[0, 0]] = True  # the attention sink
        return flags & valid


class _ZipVLAttention(AttentionHook):
    """Each prefill layer: find the important tokens, attend over them, flag them in the cache."""

    def __init__(self, method: ZipVL):
        self.method = method

    def attend(self, module, query, key, value, mask, function, **kwargs):
        method = self.method
        state = method._state
        layer = getattr(module, "layer_idx", None)
        if "valid" not in state or query.shape[2] < 2 or key.shape[2] != state["valid"].shape[1]:
            cache_layers = state.get("cache_layers")
            cache_layer = cache_layers[layer] if cache_layers is not None else None
            if cache_layer is not None and cache_layer.reads_fused(query.shape[2]):
                scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
                return cache_layer.decode_attention(query, key, value, mask, scaling), None
            return function(module, query, key, value, mask, **kwargs)  # decoding: the cache does the work
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        everything = method.tau >= 1.0 and method.budget >= 1.0
        flags = state["valid"] if everything else method.important(query, key, scaling)
        real = state["valid"].sum(1).clamp_min(1)
        method.stats.layer_important[layer] = float((flags.sum(1) / real).mean())
        state.setdefault("scored_layers", set()).add(layer)
        if state["cache_layers"] is not None:
            important = flags | ~state["valid"]  # pad slots: whatever is cheapest to read back exactly
            state["cache_layers"][layer].compress(important)
        if everything or not method.sparse_prefill:
            return function(module, query, key, value, mask, **kwargs)
        return self._sparse(module, query, key, value, mask, flags, function, **kwargs)

    @staticmethod
    def _sparse(module, query, key, value, mask, flags, function, **kwargs):
        """Attention of every query over the important keys only (gathered, causal, padded)."""
        from .core import gather_plan

        columns, real = gather_plan(flags)  # (batch, k): important key positions, left-padded
        index = columns[:, None, :, None]
        key_g = key.gather(2, index.expand(-1, key.shape[1], -1, key.shape[-1]))
        value_g = value.gather(2, index.expand(-1, value.shape[1], -1, value.shape[-1]))
        length = query.shape[2]
        if mask is None:  # SDPA without padding: plain causal order
            allowed = torch.arange(length, device=key.device)[None, None, :, None] >= columns[:, None, None, :]
        elif mask.dtype == torch.bool:
            allowed = mask[..., :length, :].expand(query.shape[0], -1, -1, -1).gather(
                3, columns[:, None, None, :].expand(-1, mask.shape[1], length, -1))
        else:
            allowed = mask[..., :length, :].expand(query.shape[0], -1, -1, -1).gather(
                3, columns[:, None, None, :].expand(-1, mask.shape[1], length, -1)) == 0
        allowed = allowed & real[:, None, None, :]
        empty = ~allowed.any(-1, keepdim=True)  # pad queries: let them see one slot (their output is unused)
        allowed = allowed | (empty & (torch.arange(allowed.shape[-1], device=key.device) == allowed.shape[-1] - 1))
        if mask is not None and mask.dtype != torch.bool:
            gathered = torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device).masked_fill(
                ~allowed, torch.finfo(mask.dtype).min)
        else:
            gathered = allowed
        return function(module, query, key_g, value_g, gathered, **kwargs)
