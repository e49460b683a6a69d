"""ZipVL: dynamic token sparsification and a mixed-precision KV cache (He et al., 2024, arXiv 2410.08584).

No official code was released: the paper (Algorithm 1, Eqs. 5-8) is the reference, and its rules
are the defaults. At every LLM layer of the prefill:

1. **Probe queries** score every key: the 64 most recent tokens plus 64 drawn at random
   (``probe_recent``, ``probe_random``). Their causal softmax, head-averaged, is the probe
   attention ``A`` (Eq. 5).
2. **How many tokens are important** (Eq. 6): ``p`` is the fewest columns whose sorted
   *un-normalised* column sums of ``A`` reach ``tau`` times their total (the number of probes),
   ``tau = 0.975``. The ratio adapts to the layer and the input.
3. **Which tokens** (Eqs. 7-8): the top ``p`` by the *normalised* score, each key's column sum
   divided by the number of probes that can see it (early tokens are not favoured merely for
   being visible to more probes).
4. **Sparse prefill** (Algorithm 1, ``FlashAttention(Q[T], K[T], V[T])``): attention runs for the
   important tokens only, as queries and as keys, causally, with the model's own attention
   implementation (SDPA, eager). The paper computes no output for the other rows; here they
   receive a zero attention output, so those tokens pass the layer on the residual stream (and
   its MLP) alone.
5. **KV cache**: important tokens at ``high_bits`` (4), the rest at ``low_bits`` (2)
   (:mod:`.kv_cache`), the prompt compressed right after each layer's attention. Generated
   tokens stay in full precision until a block of ``recompress_every`` (100) has accumulated;
   at ``m = 100, 200, ...`` the block is split by the current query's attention with the same
   mass rule (the fewest block tokens holding ``tau`` of the attention the block receives) and
   compressed, important tokens at ``high_bits``, the others at ``low_bits``.

No token is dropped: ZipVL trades attention FLOPs and cache bytes, not sequence length. All
tokens take part (text and visual), as in the paper. ``tau = 1.0`` with 16-bit precision for
both classes gives exactly the unpruned model.

hasten's former behaviour stays available, each as a documented option:

- ``count_scores="normalized"`` counts ``p`` on the normalised scores (keeps 6-15 percentage
  points more tokens than Eq. 6 at the paper's ratios);
- ``sparse_prefill="keys"`` lets every query attend the important keys (``n * p`` pairs instead
  of ``p^2``; every token gets an attention output); ``"dense"`` runs the full attention;
- ``probe_fraction=0.05`` draws ZipCache's 5% recent + 5% random probes (fewer than the paper's
  128 below ~1,280 tokens);
- ``split_generated=False`` with ``cache=MixedPrecisionConfig(residual=32)`` stores every
  generated token at ``high_bits`` and compresses at 132, 232, ... keeping a 32-token window.

Choices of hasten's where the paper is silent: the random probes are drawn with a fixed seed per
call, so a call is reproducible; the first real token (the attention sink) is always important;
the last prompt token is always important too: its row's attention output is what the first
generated token is read from, and under ``sparse_prefill="important"`` a row outside the
important set gets none (selected as a *key* by its probe score alone, the last token is often
not chosen: on the trained micro-world LLaVA that silenced its attention in 3 of 4 layers and
changed 67% of the one-token answers at budget 1.0);
``budget`` < 1 additionally caps the important count of the prompt per layer.

:attr:`ZipVL.attention` counts, per layer, the query-key pairs the prefill attends (and those of
the dense causal attention and of the probe scoring), from which :meth:`ZipVL.prefill_flops`
gives the attention FLOPs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .._validation import check_int, check_number
from ..transformers_conventions import cache_of, patch_point_error
from .core import TokenPruner
from .kv_cache import MixedPrecisionConfig, install_mixed_precision, mixed_precision_cache
from .scoring import AttentionHook, mass_count, probe_attention, probe_queries

__all__ = ["COUNT_SCORES", "SPARSE_PREFILL", "ZipVL", "block_verdict", "select_important"]

COUNT_SCORES = ("column_sums", "normalized")
SPARSE_PREFILL = ("important", "keys", "dense")


def select_important(
    column_sums: torch.Tensor, seen: torch.Tensor, tau: float, count_scores: str = "column_sums", cap: int | None = None
) -> torch.Tensor:
    """ZipVL's important tokens of one sample from its probe attention: ascending positions.

    ``column_sums`` ``(length,)``: each key's accumulated probe attention (rows of the
    attention sum to 1); ``seen`` ``(length,)``: how many probes can see each key (0: a key no
    probe sees, i.e. padding, never chosen). ``p`` is :func:`~.scoring.mass_count` of the column
    sums (Eq. 6, ``count_scores="column_sums"``) or of the normalised scores
    (``"normalized"``, hasten's former rule), at most ``cap``; the chosen tokens are the top
    ``p`` by the normalised score ``column_sums / seen`` (Eqs. 7-8).

    Examples
    --------
    >>> attention = torch.tensor([[0.2, 0.8, 0.0], [0.1, 0.1, 0.8]])  # probes at positions 1 and 2
    >>> sums, seen = attention.sum(0), torch.tensor([2, 2, 1])  # sums 0.3, 0.9, 0.8; normalised .15, .45, .8
    >>> select_important(sums, seen, 0.45).tolist()  # p = 1 (0.9 >= 0.45 * 2); the top normalised score
    [2]
    """
    if count_scores not in COUNT_SCORES:
        raise ValueError(f"`count_scores` must be one of {COUNT_SCORES}, got {count_scores!r}")
    valid = seen > 0
    normalized = column_sums / seen.clamp_min(1)
    counted = column_sums if count_scores == "column_sums" else normalized
    count = min(mass_count(counted[valid], tau), int(valid.sum()))
    if cap is not None:
        count = min(count, cap)
    chosen = normalized.masked_fill(~valid, float("-inf")).topk(count).indices
    return chosen.sort().values


def block_verdict(probabilities: torch.Tensor, tau: float) -> torch.Tensor:
    """Important flags of a block of generated tokens: ``(batch, m)`` bool.

    ``probabilities`` ``(batch, m)``: the current query's (head-averaged) attention to each token
    of the block. The fewest tokens holding ``tau`` of the attention the block receives are
    important (Eq. 6's mass rule on the block).
    """
    flags = torch.zeros(probabilities.shape, dtype=torch.bool, device=probabilities.device)
    for row in range(probabilities.shape[0]):
        count = mass_count(probabilities[row], tau)
        flags[row, probabilities[row].topk(count).indices] = True
    return flags


@dataclass
class ZipVL(TokenPruner):
    """ZipVL sparse prefill + mixed-precision KV cache (the paper's rules by default; see the module docstring).

    Parameters
    ----------
    budget : float, default 1.0
        Cap on the important fraction of the prompt per layer (1.0: the mass rule alone, as in
        the paper).
    tau : float, default 0.975
        Attention-mass fraction the important tokens hold (paper: 0.96-0.975), in (0, 1].
    count_scores : {"column_sums", "normalized"}, default "column_sums"
        What the mass rule counts ``p`` on: the probe attention's un-normalised column sums
        (Eq. 6) or the normalised scores (hasten's former rule). The choice of *which* tokens
        always uses the normalised scores (Eqs. 7-8).
    probe_recent, probe_random : int, default 64, 64
        Recent and random probe queries (the paper's 64 + 64).
    probe_fraction : float, optional
        Set (e.g. 0.05, hasten's former default) to draw ZipCache's probes instead: the last
        ``probe_fraction`` of the tokens plus a random ``probe_fraction``; in (0, 0.5].
    cache : MixedPrecisionConfig, default ``MixedPrecisionConfig(residual=0)``
        Bit widths (4 / 2) and the block of generated tokens compressed at a time (100, no
        full-precision window kept: the paper's).
    sparse_prefill : {"important", "keys", "dense"}, default "important"
        Prefill attention of each layer: the important tokens among themselves (Algorithm 1;
        the other rows get a zero output), every query over the important keys (hasten's former
        rule), or the full attention.
    split_generated : bool, default True
        Split each block of generated tokens into important (``high_bits``) and other
        (``low_bits``) by the current query's attention (the paper's); False stores them all at
        ``high_bits`` (hasten's former rule).
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
    count_scores: str = "column_sums"
    probe_recent: int = 64
    probe_random: int = 64
    probe_fraction: float | None = None
    cache: MixedPrecisionConfig = field(default_factory=lambda: MixedPrecisionConfig(residual=0))
    sparse_prefill: str = "important"
    split_generated: bool = True
    fused_decode: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self.tau, "tau", 0, 1, open_low=True)
        if self.count_scores not in COUNT_SCORES:
            raise ValueError(f"`count_scores` must be one of {COUNT_SCORES}, got {self.count_scores!r}")
        for name in ("probe_recent", "probe_random"):
            value = getattr(self, name)
            check_int(value, name, 1 if name == "probe_recent" else 0)
        if self.probe_fraction is not None:
            check_number(self.probe_fraction, "probe_fraction", 0, 0.5, open_low=True)
        if not isinstance(self.cache, MixedPrecisionConfig):
            raise ValueError(f"`cache` must be a MixedPrecisionConfig, got {type(self.cache).__name__}")
        if self.sparse_prefill not in SPARSE_PREFILL:
            raise ValueError(f"`sparse_prefill` must be one of {SPARSE_PREFILL}, got {self.sparse_prefill!r}")
        if not isinstance(self.split_generated, bool):
            raise ValueError(f"`split_generated` must be a bool, got {self.split_generated!r}")
        if self.renumber:
            raise ValueError("ZipVL drops no token: `renumber` does not apply")
        self.attention: dict[str, list[int]] = {}

    def _extra_hooks(self, model, adapter, language_model) -> list:
        return []  # no layout needed: every token is scored inside the LLM

    def _attention_hook(self, language_model):
        return _ZipVLAttention(self)

    def _before_llm(self, module, args, kwargs):
        cache = cache_of(kwargs)
        if cache is not None and cache.get_seq_length() > 0:
            return args, kwargs
        prompt = self._prompt(kwargs, kwargs.get("inputs_embeds"))
        layers = len(module.layers)
        self.stats = self._full_prompt_stats(prompt)
        self.stats.layer_important = [1.0] * layers
        self.attention = {name: [0] * layers for name in ("pairs", "dense_pairs", "probe_pairs", "head_width")}
        cache_layers = None
        use_cache = kwargs.get("use_cache")
        if cache is None and (use_cache if use_cache is not None else module.config.use_cache):
            cache = kwargs[self._cache_keyword] = mixed_precision_cache(self.cache, layers)  # plain forward calls
        if cache is not None:
            cache_layers = install_mixed_precision(cache, layers, self.cache)
            for layer in cache_layers:
                layer.fused = self.fused_decode
                layer.defer_decoded = self.split_generated
        valid = prompt["mask"].bool()
        probes = probe_queries(valid, self.probe_fraction, self.seed, self.probe_recent, self.probe_random)
        self._state = dict(
            valid=valid,
            cache_layers=cache_layers,
            image_mask=prompt["image_mask"],
            probes=probes,
            prefill_start=time.perf_counter(),
        )
        return args, kwargs

    def _check_pruned(self) -> None:
        """Every decoder layer's prefill attention must have come through the hook (else its
        cache was never compressed: a moved attention patch point, not a result)."""
        scored = self._state.get("scored_layers", set())
        layers = len(self._language_model.layers)
        if len(scored) < layers:
            raise patch_point_error(
                self._model,
                f"ZipVL: the prefill attention of layers "
                f"{sorted(set(range(layers)) - scored)} did not go through "
                "transformers' attention-function registry",
            )

    def important(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
        """``(batch, length)`` flags of one layer's important tokens (see :func:`select_important`)."""
        valid, probes = self._state["valid"], self._state["probes"]
        flags = torch.zeros_like(valid)
        for row in range(valid.shape[0]):
            sums, seen = probe_attention(query[row], key[row], probes[row].to(key.device), scaling, valid[row])
            real = int(valid[row].sum())
            cap = max(1, int(self.budget * real)) if self.budget < 1.0 else None
            flags[row, select_important(sums, seen, self.tau, self.count_scores, cap)] = True
            real_positions = valid[row].nonzero()[:, 0]
            flags[row, real_positions[0]] = True  # the attention sink
            flags[row, real_positions[-1]] = True  # the last prompt token: the next token is read from its row
        return flags & valid

    def prefill_flops(self) -> dict[str, int]:
        """Attention FLOPs of the last prefill, summed over layers (and the batch).

        Each attended query-key pair costs ``4 * heads * head_dim`` (``QK^T`` and ``AV``, a
        multiply-add each); the probe scoring costs ``2 * heads * head_dim`` per probe-key pair
        (``QK^T``). ``sparse``: the prefill as run; ``dense``: the full causal attention;
        ``probes``: the scoring. Pairs are counted causally, as a causal FlashAttention computes
        them.
        """
        width = self.attention.get("head_width", [])
        total = {"sparse": 0, "dense": 0, "probes": 0}
        for index, head_width in enumerate(width):
            total["sparse"] += 4 * head_width * self.attention["pairs"][index]
            total["dense"] += 4 * head_width * self.attention["dense_pairs"][index]
            total["probes"] += 2 * head_width * self.attention["probe_pairs"][index]
        return total


def _allowed(mask, rows: torch.Tensor, columns: torch.Tensor, batch: int) -> torch.Tensor:
    """``(batch, 1|heads, r, c)`` bool: may query position ``rows[b, i]`` see key ``columns[b, j]``."""
    if mask is None:  # SDPA without padding: plain causal order
        return rows[:, None, :, None] >= columns[:, None, None, :]
    full = mask.expand(batch, -1, -1, -1)
    picked = full.gather(2, rows[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[-1]))
    picked = picked.gather(3, columns[:, None, None, :].expand(-1, full.shape[1], rows.shape[1], -1))
    return picked if picked.dtype == torch.bool else picked == 0


def _as_mask(allowed: torch.Tensor, mask) -> torch.Tensor:
    """The attention function's mask form: boolean, or additive in the original mask's dtype."""
    if mask is not None and mask.dtype != torch.bool:
        return torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~allowed, torch.finfo(mask.dtype).min
        )
    return allowed


class _ZipVLAttention(AttentionHook):
    """Each prefill layer: find the important tokens, attend over them, flag them in the cache; each
    decoding step: attend, then compress a due block of generated tokens by the query's attention."""

    def __init__(self, method: ZipVL):
        self.method = method

    def attend(self, module, query, key, value, mask, function, **kwargs):
        method = self.method
        state = method._state
        layer = getattr(module, "layer_idx", None)
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        if "valid" not in state or query.shape[2] < 2 or key.shape[2] != state["valid"].shape[1]:
            return self._decode(module, query, key, value, mask, function, layer, **kwargs)
        everything = method.tau >= 1.0 and method.budget >= 1.0
        valid = state["valid"]
        flags = valid if everything else method.important(query, key, scaling)
        real = valid.sum(1).clamp_min(1)
        method.stats.layer_important[layer] = float((flags.sum(1) / real).mean())
        state.setdefault("scored_layers", set()).add(layer)
        if state["cache_layers"] is not None:
            important = flags | ~valid  # pad slots: whatever is cheapest to read back exactly
            state["cache_layers"][layer].compress(important)
        length = valid.shape[1]
        if mask is None:
            dense = torch.ones(length, length, dtype=torch.bool, device=key.device).tril()[None]
        else:
            dense = mask[:, 0, :length, :length]
            dense = dense if dense.dtype == torch.bool else dense == 0
        dense = dense & valid[:, :, None] & valid[:, None, :]  # (batch, queries, keys) the full causal attention
        counts = method.attention
        counts["dense_pairs"][layer] = int(dense.sum())
        counts["head_width"][layer] = query.shape[1] * query.shape[-1]
        counts["probe_pairs"][layer] = (
            0
            if everything
            else int(sum(dense[row, probes.to(key.device)].sum() for row, probes in enumerate(state["probes"])))
        )
        if everything or method.sparse_prefill == "dense":
            counts["pairs"][layer] = counts["dense_pairs"][layer]
            return function(module, query, key, value, mask, **kwargs)
        if method.sparse_prefill == "keys":
            return self._sparse_keys(module, query, key, value, mask, flags, valid, function, layer, **kwargs)
        return self._sparse_important(module, query, key, value, mask, flags, function, layer, **kwargs)

    def _decode(self, module, query, key, value, mask, function, layer, **kwargs):
        """A decoding step: the cache's attention, then (with ``split_generated``) a due block compressed."""
        method = self.method
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        cache_layers = method._state.get("cache_layers")
        cache_layer = cache_layers[layer] if cache_layers is not None else None
        if cache_layer is not None and cache_layer.reads_fused(query.shape[2]):
            result = cache_layer.decode_attention(query, key, value, mask, scaling), None
            lse = cache_layer.last_lse
        else:
            result = function(module, query, key, value, mask, **kwargs)
            lse = None
        if cache_layer is not None and cache_layer.defer_decoded and cache_layer.due:
            window = cache_layer.keys.shape[-2]
            probabilities = self._window_attention(query, key, mask, scaling, window, lse)
            due = cache_layer.due
            cache_layer.compress(block_verdict(probabilities[:, :due], method.tau), due)
        return result

    @staticmethod
    def _window_attention(query, key, mask, scaling, window, lse):
        """``(batch, window)``: the last query's head-averaged softmax attention to the last ``window`` keys.

        ``key`` ends with the window (the whole cache read back, or the window alone when the
        fused decode ran; its ``lse`` then gives the softmax normaliser over every key).
        """
        heads, kv_heads = query.shape[1], key.shape[1]
        keys = (key.repeat_interleave(heads // kv_heads, 1) if heads != kv_heads else key).float()
        logits = (keys @ query[:, :, -1:].float().transpose(-1, -2))[..., 0] * scaling  # (batch, heads, keys)
        if lse is None:
            if mask is not None:
                last = mask[:, :, -1, : keys.shape[2]]
                visible = last if last.dtype == torch.bool else last == 0
                logits = logits.masked_fill(~visible, float("-inf"))
            lse = torch.logsumexp(logits, -1)
        return torch.exp(logits[..., -window:] - lse.float()[..., None]).mean(1)

    def _sparse_important(self, module, query, key, value, mask, flags, function, layer, **kwargs):
        """Algorithm 1: attention among the important tokens only, ``Attention(Q[T], K[T], V[T])``,
        causal; the rows outside ``T`` get a zero output."""
        from .core import gather_plan

        method = self.method
        columns, real = gather_plan(flags)  # (batch, p): important positions, left-padded
        heads_q, heads_k = query.shape[1], key.shape[1]
        query_g = query.gather(2, columns[:, None, :, None].expand(-1, heads_q, -1, query.shape[-1]))
        key_g = key.gather(2, columns[:, None, :, None].expand(-1, heads_k, -1, key.shape[-1]))
        value_g = value.gather(2, columns[:, None, :, None].expand(-1, heads_k, -1, value.shape[-1]))
        allowed = _allowed(mask, columns, columns, query.shape[0]) & real[:, None, None, :] & real[:, None, :, None]
        method.attention["pairs"][layer] = int(allowed[:, 0].sum())
        empty = ~allowed.any(-1, keepdim=True)  # pad rows: let them see one slot (their output is dropped)
        allowed = allowed | (empty & (torch.arange(allowed.shape[-1], device=key.device) == allowed.shape[-1] - 1))
        output, weights = function(module, query_g, key_g, value_g, _as_mask(allowed, mask), **kwargs)
        full = output.new_zeros(query.shape[0], query.shape[2], *output.shape[2:])  # (batch, length, heads, dim)
        rows = torch.arange(query.shape[0], device=key.device)[:, None].expand_as(columns)
        full[rows[real], columns[real]] = output[real]
        return full, None

    def _sparse_keys(self, module, query, key, value, mask, flags, valid, function, layer, **kwargs):
        """hasten's former rule: every query attends the important keys only (gathered, causal, padded)."""
        from .core import gather_plan

        method = self.method
        columns, real = gather_plan(flags)  # (batch, k): important key positions, left-padded
        index = columns[:, None, :, None]
        key_g = key.gather(2, index.expand(-1, key.shape[1], -1, key.shape[-1]))
        value_g = value.gather(2, index.expand(-1, value.shape[1], -1, value.shape[-1]))
        length = query.shape[2]
        positions = torch.arange(length, device=key.device).expand(query.shape[0], -1)
        allowed = _allowed(mask, positions, columns, query.shape[0]) & real[:, None, None, :]
        method.attention["pairs"][layer] = int((allowed[:, 0] & valid[:, :, None]).sum())
        empty = ~allowed.any(-1, keepdim=True)  # pad queries: let them see one slot (their output is unused)
        allowed = allowed | (empty & (torch.arange(allowed.shape[-1], device=key.device) == allowed.shape[-1] - 1))
        return function(module, query, key_g, value_g, _as_mask(allowed, mask), **kwargs)
