"""Speculative decoding with a SpecVLM draft: chain drafting, one target forward verifies each round.

``generate()`` cannot host a draft-and-verify loop (it owns the cache and the one-token step),
so SpecVLM is a ``generate`` helper, :func:`speculative_generate`, running on the unmodified
model:

1. The target prefills the prompt (images and all) and gives its last hidden states and the
   merged input embeddings; the draft prefills on them, with each image's tokens compressed by
   the draft's :class:`~.compressor.ElasticCompressor` (the target never sees the compression).
2. Each round the draft proposes ``depth`` tokens greedily (EAGLE: predicted feature + embedding
   of the proposed token -> next feature -> the target's LM head).
3. The target runs the pending token and the proposals in ONE forward; proposals are accepted
   while they equal the target's greedy choice, and the target's own next token follows (so a
   round yields 1 to ``depth + 1`` tokens). The target cache is cropped to the accepted tokens;
   the draft re-reads the accepted tokens with the target's TRUE features.

The output is exactly the target's greedy output (tested token for token against
``model.generate``). Batch size 1; a dynamic draft tree and sampling with the
speculative-sampling rule are not in this release.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters import adapter_for
from .draft import DraftModel

__all__ = ["SpecStats", "draft_inputs", "speculative_generate"]


@dataclass
class SpecStats:
    """What one speculative generation did."""

    accepted: list[int] = field(default_factory=list)  # accepted draft tokens per round
    target_forwards: int = 0
    draft_forwards: int = 0
    new_tokens: int = 0
    compressed_visual: tuple[int, int] = (0, 0)  # (visual tokens the target saw, the draft saw)
    seconds: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens per verification round (accepted drafts + the target's own token)."""
        return sum(a + 1 for a in self.accepted) / max(len(self.accepted), 1)

    @property
    def target_forwards_per_token(self) -> float:
        return self.target_forwards / max(self.new_tokens, 1)


class _Capture:
    """Captures the language model's merged input embeddings of one forward (a pre-hook)."""

    def __init__(self, language_model: torch.nn.Module):
        self.embeds: torch.Tensor | None = None
        self.handle = language_model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.embeds = kwargs.get("inputs_embeds")

    def remove(self) -> None:
        self.handle.remove()


def draft_inputs(model: Any, draft: DraftModel, input_ids: torch.Tensor, features: torch.Tensor,
                 embeds: torch.Tensor, next_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The draft's prefill: (features, next-token embeddings) per position, each image's run compressed.

    ``features`` ``(1, L, H)`` the target's last hidden states, ``embeds`` ``(1, L, H)`` its merged
    input embeddings, ``next_token`` the token after the prompt. Returns the draft's ``(1, L', H)``
    features and next embeddings, and (visual tokens in, out).
    """
    next_embeds = torch.cat([embeds[:, 1:], draft._target["embed"](next_token.view(1, 1)).to(embeds.dtype)], 1)
    image_id = adapter_for(model).image_token_id(model)
    is_image = input_ids[0] == image_id
    feature_parts, embed_parts, start = [], [], 0
    columns = is_image.nonzero()[:, 0]
    runs = torch.tensor_split(columns, ((columns[1:] - columns[:-1] != 1).nonzero()[:, 0] + 1).tolist()) \
        if len(columns) else []
    seen = kept = 0
    for index, run in enumerate(runs):
        a, b = int(run[0]), int(run[-1]) + 1
        feature_parts.append(features[0, start:a])
        embed_parts.append(next_embeds[0, start:a])
        side = int(round((b - a) ** 0.5))
        grid = (side, side) if side * side == b - a else None
        f, e = draft.compressor.compress_pair(features[0, a:b], next_embeds[0, a:b], grid, seed=index)
        feature_parts.append(f.to(features.dtype))
        embed_parts.append(e.to(features.dtype))
        seen, kept, start = seen + (b - a), kept + len(f), b
    feature_parts.append(features[0, start:])
    embed_parts.append(next_embeds[0, start:])
    return torch.cat(feature_parts)[None], torch.cat(embed_parts)[None], (seen, kept)


@torch.no_grad()
def speculative_generate(model: Any, inputs: dict, draft: DraftModel, max_new_tokens: int = 64, depth: int = 5,
                         eos_token_id: int | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Greedy speculative generation: ``(sequences (1, prompt + new), stats)``.

    Examples
    --------
    >>> import hasten.tiny
    >>> from hasten.tiny.vlms import chat_prompt
    >>> from PIL import Image
    >>> model, processor = hasten.tiny.vlm("llava")
    >>> inputs = processor(images=[Image.new("RGB", (32, 32))], text=[chat_prompt(processor, "Hi?")],
    ...                    return_tensors="pt")
    >>> out, stats = speculative_generate(model, inputs, DraftModel.for_target(model), max_new_tokens=8)
    >>> bool((out == model.generate(**inputs, max_new_tokens=8, do_sample=False)).all())
    True
    """
    from transformers import DynamicCache

    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding runs batch size 1; got {input_ids.shape[0]} prompts")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"`depth` must be a positive int, got {depth!r}")
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos_token_id if isinstance(eos_token_id, list) else [] if eos_token_id is None else [eos_token_id])
    start_time = time.perf_counter()
    stats = SpecStats()
    capture = _Capture(adapter_for(model).language_model(model))
    try:
        out = model(**inputs, output_hidden_states=True, use_cache=True)
        embeds = capture.embeds
    finally:
        capture.remove()
    stats.target_forwards += 1
    cache = out.past_key_values
    pending = out.logits[:, -1].argmax(-1)  # (1,)
    features, next_embeds, stats.compressed_visual = draft_inputs(model, draft, input_ids, out.hidden_states[-1],
                                                                   embeds, pending)
    draft_cache = DynamicCache()
    predicted = draft(features, None, draft_cache, start=0, next_embeds=next_embeds)[:, -1:]
    stats.draft_forwards += 1
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        budget = max_new_tokens - len(generated)
        steps = min(depth, budget - 1)
        proposals, feature, before = [], predicted, draft_cache.get_seq_length()
        for _ in range(steps):  # 2. draft
            token = draft.logits(feature[:, -1]).argmax(-1)
            proposals.append(token)
            if len(proposals) < steps:
                feature = draft(feature, token.view(1, 1), draft_cache, start=draft_cache.get_seq_length())
                stats.draft_forwards += 1
        candidate = torch.cat([pending.view(1, 1), *(p.view(1, 1) for p in proposals)], 1)
        verified = model(input_ids=candidate, past_key_values=cache, use_cache=True, output_hidden_states=True)
        stats.target_forwards += 1
        choices = verified.logits[0].argmax(-1)  # the target's token after each candidate
        accepted = 0
        while accepted < len(proposals) and int(proposals[accepted]) == int(choices[accepted]):
            accepted += 1
        stats.accepted.append(accepted)
        committed = candidate[0, : accepted + 1].tolist()
        rejected = candidate.shape[1] - (accepted + 1)
        if rejected:
            cache.crop(-rejected)
        generated.extend(committed)
        pending = choices[accepted].view(1)
        if eos & set(committed) or len(generated) >= max_new_tokens:
            break
        if len(generated) == max_new_tokens - 1 or int(pending) in eos:
            generated.append(int(pending))
            break
        # 3. the draft re-reads the accepted tokens with the target's true features
        extra = draft_cache.get_seq_length() - before
        if extra:
            draft_cache.crop(-extra)
        true_features = verified.hidden_states[-1][:, : accepted + 1]
        next_tokens = torch.cat([candidate[:, 1: accepted + 1], pending.view(1, 1)], 1)
        predicted = draft(true_features, next_tokens, draft_cache, start=draft_cache.get_seq_length())[:, -1:]
        stats.draft_forwards += 1
    generated = generated[:max_new_tokens]
    if eos:
        for index, token in enumerate(generated):
            if token in eos:
                generated = generated[: index + 1]
                break
    stats.new_tokens = len(generated)
    stats.seconds = time.perf_counter() - start_time
    sequence = torch.cat([input_ids, torch.tensor([generated], dtype=input_ids.dtype, device=input_ids.device)], 1)
    return sequence, stats
