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

With ``tree=TreeConfig()`` the draft grows EAGLE-2's dynamic tree instead of a chain (top-k 10,
60 tokens, depth 7: :mod:`.tree`), and the target verifies the whole tree in one forward with a
tree attention mask and tree positions; the accepted path's entries are kept in the target
cache, the rest dropped.

The output is exactly the target's greedy output (tested token for token against
``model.generate``, chain and tree). With :class:`Sampling` the output follows the target's
sampling distribution: a chain uses speculative sampling against the draft's ``q``, a tree the
point-mass rule of :meth:`.tree.DraftTree.accept_sampled` (both tested with a chi-square test
against the exact two-token distribution). Batch size 1: rounds accept different numbers of
tokens per prompt, so a batch would need ragged caches; a batch raises a clear error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ...transformers_conventions import cache_keyword, output_cache
from ..adapters import adapter_for
from .draft import DraftModel
from .tree import DraftTree, TreeConfig

__all__ = ["Sampling", "SpecStats", "SpecVLM", "draft_inputs", "speculative_generate"]


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


@dataclass(frozen=True)
class Sampling:
    """Sampling settings, applied like ``generate()``'s warpers: temperature, then top-k, then top-p."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p!r}")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``(..., vocab)`` logits -> the sampling distribution (float64)."""
        scores = logits.double() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            ordered, order = scores.sort(dim=-1)
            cumulative = ordered.softmax(-1).cumsum(-1)
            remove = cumulative <= 1 - self.top_p
            remove[..., -1] = False
            scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
        return scores.softmax(-1)


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs.cpu().float(), 1, generator=generator))


def _accept_sampled(proposals, draft_probs, target_probs, generator):
    """Speculative sampling: (accepted count, a tensor whose entry ``accepted`` is the next token)."""
    choices = torch.zeros(len(proposals) + 1, dtype=torch.long)
    for index, token in enumerate(proposals):
        token = int(token)
        p, q = target_probs[index].cpu(), draft_probs[index].cpu()
        if float(torch.rand((), generator=generator, dtype=torch.float64)) < min(1.0, float(p[token] / q[token])):
            continue
        residual = (p - q).clamp_min(0)
        total = float(residual.sum())
        choices[index] = _draw(residual / total if total > 0 else p, generator)
        return index, choices
    choices[len(proposals)] = _draw(target_probs[len(proposals)].cpu(), generator)
    return len(proposals), choices


def _grow_tree(draft: DraftModel, draft_cache, root_token: int, root_feature: torch.Tensor, config: TreeConfig,
               stats: SpecStats) -> DraftTree:
    """EAGLE-2's dynamic tree from the root's predicted feature (see :mod:`.tree`)."""
    tree = DraftTree.rooted(root_token)
    prefix = draft_cache.get_seq_length()
    features = {0: root_feature[0, -1]}  # node -> its predicted feature (the draft output for its input)
    slots: dict[int, int] = {}  # node -> its entry in the draft cache (nodes that were expanded)
    frontier = [0]
    for level in range(config.depth):
        candidates = []  # the whole frontier through the LM head at once: one host sync per level
        top = torch.log_softmax(draft.logits(torch.stack([features[n] for n in frontier])).float(), -1).topk(config.top_k)
        for node, log_probs, tokens in zip(frontier, top.values.tolist(), top.indices.tolist()):
            for log_prob, token in zip(log_probs, tokens):
                candidates.append((tree.scores[node] + log_prob, node, token))
        candidates.sort(key=lambda c: -c[0])
        added = [tree.add(parent, token, score) for score, parent, token in candidates]
        frontier = added[: config.top_k]
        if level == config.depth - 1:
            break
        # the draft reads each frontier node (parent's feature + its token), attending the prompt and its ancestors
        cached = draft_cache.get_seq_length()
        allowed = torch.zeros(len(frontier), cached + len(frontier), dtype=torch.bool)
        allowed[:, :prefix] = True
        for row, node in enumerate(frontier):
            for ancestor in tree.ancestors(node)[1:-1]:  # not itself (added below), not the root (in the prefix)
                allowed[row, slots[ancestor]] = True
            allowed[row, cached + row] = True
        parent_features = torch.stack([features[tree.parents[n]] for n in frontier])[None]
        tokens = torch.tensor([[tree.tokens[n] for n in frontier]], device=parent_features.device)
        positions = torch.tensor([prefix - 1 + tree.depth(n) for n in frontier])
        out = draft(parent_features, tokens, draft_cache, positions=positions, allowed=allowed)
        stats.draft_forwards += 1
        for row, node in enumerate(frontier):
            features[node], slots[node] = out[0, row], cached + row
    return tree.select(config.total)


def _verify_tree(model: Any, cache, tree: DraftTree, mrope: bool):
    """One target forward over the tree (tree mask, tree positions); keeps the cache's prompt only."""
    past = cache.get_seq_length()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    size = len(tree.tokens)
    allowed = torch.cat([torch.ones(size, past, dtype=torch.bool), tree.mask()], 1)
    mask = torch.zeros(1, 1, size, past + size, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    positions = (past + tree.depths())[None].to(device)
    if mrope:  # Qwen: a text token's three mRoPE rows are its position shifted by the image's rope delta
        positions = (positions + model.model.rope_deltas.to(device)).expand(3, -1, -1)
    ids = torch.tensor([tree.tokens], device=device)
    return model(input_ids=ids, **{cache_keyword(model): cache}, attention_mask=mask.to(device), position_ids=positions,
                 use_cache=True, output_hidden_states=True)


def _keep_path(cache, past: int, path: list[int]) -> None:
    """Keep the prompt and the accepted tree nodes (in path order) in every layer of the target cache."""
    for layer in cache.layers:
        index = torch.tensor(path, device=layer.keys.device) + past
        layer.keys = torch.cat([layer.keys[..., :past, :], layer.keys[..., index, :]], -2)
        layer.values = torch.cat([layer.values[..., :past, :], layer.values[..., index, :]], -2)


def _chain_round(model, draft, cache, draft_cache, pending, predicted, steps, sampling, generator, stats):
    """Draft ``steps`` tokens in a chain, verify them with the pending token in one target forward.

    Returns the committed tokens (the pending one and the accepted proposals), the target's token
    after them, and the target's features of the committed tokens; the rejected entries are
    cropped from the target cache.
    """
    proposals, draft_probs, feature = [], [], predicted
    for _ in range(steps):
        logits = draft.logits(feature[:, -1])
        if sampling is None:
            token = logits.argmax(-1)
        else:
            draft_probs.append(sampling.probs(logits[0]))
            token = torch.tensor([_draw(draft_probs[-1], generator)], device=pending.device)
        proposals.append(token)
        if len(proposals) < steps:
            feature = draft(feature, token.view(1, 1), draft_cache, start=draft_cache.get_seq_length())
            stats.draft_forwards += 1
    candidate = torch.cat([pending.view(1, 1), *(p.view(1, 1) for p in proposals)], 1)
    verified = model(input_ids=candidate, **{cache_keyword(model): cache}, use_cache=True, output_hidden_states=True)
    stats.target_forwards += 1
    tokens = candidate[0].tolist()
    if sampling is None:
        choices = verified.logits[0].argmax(-1).tolist()  # the target's token after each candidate
        accepted = 0
        while accepted < len(proposals) and tokens[accepted + 1] == choices[accepted]:
            accepted += 1
        following = choices[accepted]
    else:
        accepted, choices = _accept_sampled(proposals, draft_probs, sampling.probs(verified.logits[0]), generator)
        following = int(choices[accepted])
    stats.accepted.append(accepted)
    rejected = len(tokens) - (accepted + 1)
    if rejected:
        cache.crop(-rejected)
    return tokens[: accepted + 1], following, verified.hidden_states[-1][:, : accepted + 1]


def _tree_round(model, draft, cache, draft_cache, pending, predicted, config, mrope, sampling, generator, stats):
    """Grow a draft tree, verify it in one target forward, keep the accepted path in the target cache.

    Returns what :func:`_chain_round` returns.
    """
    grown = _grow_tree(draft, draft_cache, int(pending), predicted, config, stats)
    past = cache.get_seq_length()
    verified = _verify_tree(model, cache, grown, mrope)
    stats.target_forwards += 1
    if sampling is None:
        choices = verified.logits[0].argmax(-1).tolist()
        path = grown.accept(choices)
        following = choices[path[-1]]
    else:
        path, following = grown.accept_sampled(sampling.probs(verified.logits[0]), generator)
    _keep_path(cache, past, path)
    stats.accepted.append(len(path) - 1)
    return [grown.tokens[n] for n in path], following, verified.hidden_states[-1][:, path]


@torch.no_grad()
def speculative_generate(model: Any, inputs: dict, draft: DraftModel, max_new_tokens: int = 64, depth: int = 5,
                         eos_token_id: int | None = None, tree: TreeConfig | None = None,
                         sampling: Sampling | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Speculative generation: ``(sequences (1, prompt + new), stats)``; greedy unless ``sampling``.

    With ``sampling`` (chain drafting), the draft samples its proposals from its own
    distribution ``q`` and each is accepted with probability ``min(1, p/q)`` under the target's
    distribution ``p`` (same warpers as ``generate()``); at the first rejection the token is
    drawn from ``norm(max(0, p - q))``. With ``tree`` and ``sampling``, each tree node's
    children are tried as point-mass proposals (:meth:`.tree.DraftTree.accept_sampled`). Either
    way the output follows the target's sampling distribution exactly.

    ``depth`` is the chain length per round; with ``tree`` (e.g. ``TreeConfig()``: top-k 10, 60
    tokens, depth 7) the draft grows a dynamic tree instead and the target verifies all of it in
    one forward with a tree attention mask.

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
    generator = torch.Generator().manual_seed(sampling.seed) if sampling is not None else None
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
    cache = output_cache(out)
    if sampling is None:
        pending = out.logits[:, -1].argmax(-1)  # (1,)
    else:
        pending = torch.tensor([_draw(sampling.probs(out.logits[0, -1]), generator)], device=input_ids.device)
    features, next_embeds, stats.compressed_visual = draft_inputs(model, draft, input_ids, out.hidden_states[-1],
                                                                   embeds, pending)
    draft_cache = DynamicCache()
    predicted = draft(features, None, draft_cache, start=0, next_embeds=next_embeds)[:, -1:]
    stats.draft_forwards += 1
    generated: list[int] = []
    mrope = adapter_for(model).mrope
    while len(generated) < max_new_tokens:
        before = draft_cache.get_seq_length()
        if tree is None:
            steps = min(depth, max_new_tokens - len(generated) - 1)
            committed, following, true_features = _chain_round(model, draft, cache, draft_cache, pending, predicted,
                                                               steps, sampling, generator, stats)
        else:
            committed, following, true_features = _tree_round(model, draft, cache, draft_cache, pending, predicted,
                                                              tree, mrope, sampling, generator, stats)
        generated.extend(committed)
        if eos & set(committed) or len(generated) >= max_new_tokens:
            break
        if len(generated) == max_new_tokens - 1 or following in eos:
            generated.append(following)
            break
        # the draft forgets its proposals and re-reads the accepted tokens with the target's true features
        extra = draft_cache.get_seq_length() - before
        if extra:
            draft_cache.crop(-extra)
        pending = torch.tensor([following], device=input_ids.device)
        next_tokens = torch.tensor([[*committed[1:], following]], device=input_ids.device)
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


@dataclass
class SpecVLM:
    """SpecVLM as one object: a draft, its drafting shape and its compressor, and the last call's stats.

    A ``generate`` helper rather than ``with ...apply(model)``: ``model.generate()`` owns the
    cache and the one-token step, so it cannot host draft-and-verify rounds.

    Parameters
    ----------
    draft : DraftModel or str
        A draft, or a folder saved by ``save_pretrained`` / ``hasten vlm train-draft``.
    tree : TreeConfig or None, default TreeConfig()
        The dynamic draft tree (paper: top-k 10, 60 tokens, depth 7); None drafts a chain.
    depth : int, default 5
        Chain length per round (when ``tree`` is None).
    compressor : str, optional
        Overrides the draft's visual compressor ("pool", "resampler", "text", "gate", ...).

    Examples
    --------
    >>> import hasten.tiny
    >>> from hasten.tiny.vlms import chat_prompt
    >>> from PIL import Image
    >>> model, processor = hasten.tiny.vlm("llava")
    >>> inputs = processor(images=[Image.new("RGB", (32, 32))], text=[chat_prompt(processor, "Hi?")],
    ...                    return_tensors="pt")
    >>> spec = SpecVLM(DraftModel.for_target(model))
    >>> out = spec.generate(model, inputs, max_new_tokens=8)
    >>> spec.stats.target_forwards <= 9
    True
    """

    draft: Any
    tree: TreeConfig | None = field(default_factory=TreeConfig)
    depth: int = 5
    compressor: str | None = None

    def __post_init__(self) -> None:
        self.stats: SpecStats | None = None

    def generate(self, model: Any, inputs: dict, max_new_tokens: int = 64, sampling: Sampling | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """``(1, prompt + new)`` tokens: the target's own greedy (or sampled) output, with fewer target passes."""
        draft = self.draft if isinstance(self.draft, DraftModel) else DraftModel.from_pretrained(self.draft, model)
        draft.bind(model)
        if self.compressor is not None:
            from .compressor import CHOICES

            if self.compressor not in CHOICES:
                raise ValueError(f"`compressor` must be one of {CHOICES}, got {self.compressor!r}")
            draft.compressor.mode = self.compressor
        sequences, self.stats = speculative_generate(model, inputs, draft, max_new_tokens, self.depth, eos_token_id,
                                                     self.tree, sampling)
        return sequences
