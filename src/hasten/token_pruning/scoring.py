"""Visual-token scores shared by the pruning methods (one place, reused by every method).

- :class:`CLSAttention`: CLS-token attention inside a CLIP-style vision tower, recomputed from
  forward hooks on the chosen layers' ``q_proj`` / ``k_proj`` (so it works with SDPA, eager or
  any attention implementation).
- :class:`QueryAttention`: the attention of the last prompt token (FastV's ranking;
  SnapKV-style scores), or of chosen query rows such as every text token (MustDrop), to every
  key at chosen LLM layers, recomputed from the exact queries and keys the layer uses (after
  RoPE) through a registered transformers attention function that wraps the model's own one.
- :func:`l2_saliency`: the L2 norm of each token's hidden state.
- :func:`probe_queries`, :func:`probe_attention`, :func:`normalized_probe_attention`,
  :func:`mass_count`: ZipVL's probe queries (64 recent + 64 random, or ZipCache's 5% + 5%), their
  attention's column sums and ZipCache-normalised scores, and the attention-mass rule that gives
  ZipVL its dynamic token count.
- :func:`z_saliency`, :func:`subspace_residuals`: GUI-KV's spatial saliency and temporal
  redundancy.
- :class:`AttentionHook`: the registered attention function all of the in-LLM scores (and
  ZipVL's sparse prefill) run through.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "AttentionHook",
    "CLSAttention",
    "QueryAttention",
    "encoder_layers_of",
    "l2_saliency",
    "mass_count",
    "normalized_probe_attention",
    "probe_attention",
    "probe_queries",
    "subspace_residuals",
    "z_saliency",
]

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
            attention = torch.softmax((q @ k.transpose(-1, -2)).float() * head_dim**-0.5, dim=-1)
            self.scores[layer] = attention.sum(1)[:, 0, 1:]  # (images, patches), CLS key dropped

        return hook


def _wrapped_attention(module, query, key, value, attention_mask, **kwargs):
    """Registered attention function: hand the call to the installed hook, which runs the model's own one."""
    config = module.config
    original = config._hasten_original_attn
    if original == "eager":
        import sys

        function = sys.modules[type(module).__module__].eager_attention_forward
    else:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        function = ALL_ATTENTION_FUNCTIONS[original]
    hook = getattr(config, "_hasten_recorder", None)
    if hook is None:
        return function(module, query, key, value, attention_mask, **kwargs)
    return hook.attend(module, query, key, value, attention_mask, function, **kwargs)


class AttentionHook:
    """Sees (and may change) every attention call of a language model, through a registered
    transformers attention function that wraps the model's own implementation.

    :meth:`install` on the language model's config, :meth:`remove` to restore the original
    implementation. Subclasses override :meth:`observe` (read the exact queries and keys, after
    RoPE) or :meth:`attend` (run the attention differently).
    """

    def install(self, config) -> None:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from ..transformers_conventions import PatchPointError, transformers_version

        original = config._attn_implementation
        if getattr(config, "_hasten_recorder", None) is not None:
            raise ValueError("another hasten method already hooks attention on this model")
        registered = original in ALL_ATTENTION_FUNCTIONS and original in ALL_MASK_ATTENTION_FUNCTIONS
        if original != "eager" and not registered:
            raise PatchPointError(
                f"attention implementation {original!r} is not in transformers "
                f"{transformers_version()}'s attention-function registries, which hasten wraps"
            )
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
        """Called before the attention of every layer."""

    def attend(self, module, query, key, value, mask, function, **kwargs):
        """Run one layer's attention; by default observe, then the model's own ``function``."""
        self.observe(module, query, key, mask, kwargs.get("scaling"))
        return function(module, query, key, value, mask, **kwargs)


def l2_saliency(hidden: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each token's hidden state (last axis), in float32: a CLS-free saliency."""
    return hidden.float().norm(dim=-1)


class QueryAttention(AttentionHook):
    """Records, during a prefill, some queries' attention over all keys at chosen layers.

    With ``rows = None`` (the default) the last query is scored: ``scores[layer]`` is
    ``(batch, keys)``, the softmax of the last query row (the model's scaling and mask applied)
    averaged over heads. Set ``rows`` to one LongTensor of query indices per sample to score
    those instead: ``scores[layer]`` is then a list of ``(len(rows[b]), keys)`` tensors, or of
    ``(heads, len(rows[b]), keys)`` with ``per_head = True``.
    Install with :meth:`install` on the language model's config, remove with :meth:`remove`
    (the original attention implementation returns).
    """

    def __init__(self, layers: list[int]):
        self.layers = set(layers)
        self.scores: dict[int, Any] = {}
        self.rows: list[torch.Tensor] | None = None
        self.per_head = False
        self.active = False

    def observe(self, module, query, key, mask, scaling) -> None:
        layer = getattr(module, "layer_idx", None)
        if not self.active or layer not in self.layers or query.shape[2] < 2:
            return
        heads, kv_heads = query.shape[1], key.shape[1]
        keys = (key.repeat_interleave(heads // kv_heads, dim=1) if heads != kv_heads else key).float()
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        length = keys.shape[2]
        if self.rows is None:
            self.scores[layer] = self._probabilities(
                query[:, :, -1:].float() @ keys.transpose(-1, -2) * scale, mask, slice(-1, None), None, length
            ).mean(1)[:, 0]
            return
        probabilities = [
            self._probabilities(
                query[b : b + 1, :, rows].float() @ keys[b : b + 1].transpose(-1, -2) * scale,
                None if mask is None else mask[min(b, mask.shape[0] - 1)][None],
                rows,
                rows,
                length,
            )[0]
            for b, rows in enumerate(self.rows)
        ]  # per sample (heads, rows, keys)
        self.scores[layer] = [p if self.per_head else p.mean(0) for p in probabilities]

    @staticmethod
    def _probabilities(logits, mask, rows, causal_rows, length):
        """Softmax of (1|B, H, R, S) logits under the layer's mask (or causal order where it is None)."""
        if mask is not None:
            row = mask[..., rows, :length]
            return torch.softmax(
                logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row.float(), dim=-1
            )
        if causal_rows is not None:  # no mask given: SDPA's causal order
            future = torch.arange(length, device=logits.device)[None] > causal_rows[:, None]
            logits = logits.masked_fill(future, float("-inf"))
        return torch.softmax(logits, dim=-1)


def probe_queries(
    valid: torch.Tensor, fraction: float | None = None, seed: int = 0, recent: int = 64, random: int = 64
) -> list[torch.Tensor]:
    """Probe queries per sample: the most recent valid positions plus randomly drawn earlier ones, ascending.

    By default ``recent`` (64) recent and ``random`` (64) random probes (ZipVL, arXiv
    2410.08584), fewer where the sample is shorter (all of its tokens below 128). With
    ``fraction`` set, ZipCache's rule instead: the last ``fraction`` of the valid positions plus a
    random ``fraction`` of the others, at least one of each where possible.

    ``valid``: ``(batch, length)`` bool, the real (unpadded) tokens.
    """
    probes = []
    generator = torch.Generator().manual_seed(seed)
    for row in valid:
        positions = row.nonzero()[:, 0]
        if fraction is not None:
            count = max(1, int(round(fraction * len(positions))))
            recent_count, random_count = count, count
        else:
            recent_count, random_count = recent, random
        recent_count = min(recent_count, len(positions))
        chosen, rest = positions[len(positions) - recent_count :], positions[: len(positions) - recent_count]
        drawn = rest[torch.randperm(len(rest), generator=generator)[: min(random_count, len(rest))].to(rest.device)]
        probes.append(torch.cat([drawn, chosen]).sort().values)
    return probes


def probe_attention(
    query: torch.Tensor, key: torch.Tensor, probes: torch.Tensor, scaling: float, key_valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's probe attention, head-averaged: each key's column sum and how many probes see it.

    ``query`` ``(heads, length, dim)``, ``key`` ``(kv_heads, length, dim)`` (after RoPE),
    ``probes`` ascending positions, ``key_valid`` ``(length,)``. Each probe's causal softmax
    over the valid keys is averaged over heads (a row still sums to 1). Returns ``(length,)``
    column sums (ZipVL Eq. 6's accumulated scores: they total the number of probes) and
    ``(length,)`` counts of the probes that can see each key (Eq. 7's normaliser).
    """
    heads, kv_heads = query.shape[0], key.shape[0]
    keys = (key.repeat_interleave(heads // kv_heads, 0) if heads != kv_heads else key).float()
    logits = query[:, probes].float() @ keys.transpose(-1, -2) * scaling  # (heads, probes, length)
    length = key.shape[1]
    visible = (torch.arange(length, device=key.device)[None] <= probes[:, None]) & key_valid[None]
    attention = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1).mean(0)  # (probes, length)
    return attention.sum(0), visible.sum(0)


def normalized_probe_attention(
    query: torch.Tensor, key: torch.Tensor, probes: torch.Tensor, scaling: float, key_valid: torch.Tensor
) -> torch.Tensor:
    """ZipCache-normalised attention of one sample's keys from its probe queries, head-averaged.

    Arguments as :func:`probe_attention`. Returns ``(length,)``: each key's attention summed over
    the probes that can see it (causally), divided by how many can (ZipVL Eq. 7): early tokens
    are not favoured merely for being visible to more queries.
    """
    sums, seen = probe_attention(query, key, probes, scaling, key_valid)
    return sums / seen.clamp_min(1)


def mass_count(scores: torch.Tensor, tau: float) -> int:
    """The fewest top scores that hold a fraction ``tau`` of their total (ZipVL's dynamic count, Eq. 6).

    On the un-normalised column sums of an attention matrix whose rows sum to 1 the total is the
    number of rows ``n``, so this is Eq. 6's "smallest p whose sorted sums reach tau * n".
    """
    if tau >= 1.0:
        return len(scores)
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0)
    return int((cumulative < tau * cumulative[-1]).sum()) + 1


def z_saliency(norms: torch.Tensor, temperature: float) -> torch.Tensor:
    """GUI-KV's spatial saliency: ``softmax(z / temperature)`` of the z-scored hidden-state norms."""
    if len(norms) < 2:
        return torch.ones_like(norms, dtype=torch.float32)
    z = (norms.float() - norms.float().mean()) / norms.float().std().clamp_min(1e-6)
    return torch.softmax(z / temperature, 0)


def subspace_residuals(current: torch.Tensor, earlier: torch.Tensor, rank: int) -> torch.Tensor:
    """Distance of each earlier key to the span of the current keys, per head.

    ``current`` ``(heads, n, dim)``, ``earlier`` ``(heads, m, dim)``; the basis is the first
    ``rank`` columns of the QR decomposition of the current keys (their span when ``rank``
    reaches it). Returns ``(heads, m)``: ~0 for an earlier token whose key the current
    screenshot repeats.
    """
    basis, _ = torch.linalg.qr(current.float().transpose(1, 2))  # (heads, dim, min(dim, n))
    basis = basis[..., : min(rank, basis.shape[-1])]
    earlier = earlier.float()
    return (earlier - (earlier @ basis) @ basis.transpose(1, 2)).norm(dim=-1)
