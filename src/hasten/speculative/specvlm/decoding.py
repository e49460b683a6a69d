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
``model.generate``, chain and tree). With :class:`~hasten.speculative.Sampling` the output
follows the target's sampling distribution: a chain uses speculative sampling against the
draft's distribution, a tree the point-mass rule (both from :mod:`hasten.speculative.acceptance`,
tested with chi-square tests against exact distributions).

Batches (chain drafting): the prompts are left-padded (as for ``generate()``) and decoded in one
cache; each row's acceptance is decided on its own, and the batch advances by the shortest
accepted run (the rule of :func:`~hasten.speculative.chain_verify` with ``shortest=True``), so the
cache keeps one length: every row's output is ``generate()``'s for that row. Trees run one prompt
at a time (a batch with ``tree`` raises a clear error).

Host work: tree growth, selection, the tree mask and the acceptance walk are tensor code on the
model's device; a round reads back one small tensor (the accepted path, or the shared advance
and the committed tokens).
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ..._validation import check_positive_int
from ...token_pruning.adapters import adapter_for
from ...transformers_conventions import cache_keyword, output_cache
from ..acceptance import chain_verify, tree_accept
from ..sampling import Sampling
from .draft import DraftModel
from .tree import DraftTree, TreeConfig

__all__ = ["Sampling", "SpecStats", "SpecVLM", "draft_inputs", "speculative_generate"]


@dataclass
class SpecStats:
    """What one speculative generation did."""

    accepted: list[int] = field(default_factory=list)  # accepted draft tokens per round (the batch's advance)
    row_accepted: list[list[int]] = field(default_factory=list)  # per round, each row's own accepted run
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


def draft_inputs(
    model: Any,
    draft: DraftModel,
    input_ids: torch.Tensor,
    features: torch.Tensor,
    embeds: torch.Tensor,
    next_token: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
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
    runs = (
        torch.tensor_split(columns, ((columns[1:] - columns[:-1] != 1).nonzero()[:, 0] + 1).tolist())
        if len(columns)
        else []
    )
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


def _grow_tree(
    draft: DraftModel,
    draft_cache,
    root_token: torch.Tensor,
    root_feature: torch.Tensor,
    config: TreeConfig,
    stats: SpecStats,
) -> DraftTree:
    """EAGLE-2's dynamic tree from the root's predicted feature (see :mod:`.tree`), all on the device."""
    device = root_feature.device
    tree = DraftTree.rooted(root_token.reshape(1), device=device)
    prefix = draft_cache.get_seq_length()
    k = config.top_k
    frontier = torch.zeros(1, dtype=torch.long, device=device)
    features = root_feature[0, -1:]  # (F, H): each frontier node's predicted feature
    slots = torch.empty(1, dtype=torch.long, device=device)  # frontier node -> its draft-cache entry
    ancestors = torch.empty(1, 0, dtype=torch.long, device=device)  # frontier node -> its ancestors' entries
    for level in range(config.depth):
        top = torch.log_softmax(draft.logits(features).float(), -1).topk(k)  # the whole frontier at once
        scores = (tree.scores[frontier][:, None] + top.values).flatten()
        order = torch.sort(scores, descending=True, stable=True).indices  # children added best first
        rows = order // k
        added = tree.extend(frontier[rows], top.indices.flatten()[order], scores[order])
        chosen = rows[:k]  # the next frontier: the k best children, and the frontier row of each parent
        frontier = added[:k]
        if level == config.depth - 1:
            break
        # the draft reads each frontier node (parent's feature + its token), attending the prompt and its ancestors
        if level:
            ancestors = torch.cat([ancestors[chosen], slots[chosen][:, None]], 1)
        else:
            ancestors = ancestors.expand(len(frontier), 0)
        cached = draft_cache.get_seq_length()
        size = len(frontier)
        allowed = torch.zeros(size, cached + size, dtype=torch.bool, device=device)
        allowed[:, :prefix] = True
        if ancestors.shape[1]:
            allowed.scatter_(1, ancestors, torch.ones_like(ancestors, dtype=torch.bool))
        own = torch.arange(size, device=device)
        allowed[own, cached + own] = True
        positions = torch.full((size,), prefix + level, device=device)  # prefix - 1 + depth, depth = level + 1
        out = draft(
            features[chosen][None], tree.tokens[frontier][None], draft_cache, positions=positions, allowed=allowed
        )
        stats.draft_forwards += 1
        features, slots = out[0], cached + own
    return tree.select(config.total)


def _verify_tree(model: Any, cache, tree: DraftTree, mrope: bool):
    """One target forward over the tree (tree mask, tree positions)."""
    past = cache.get_seq_length()
    device = tree.tokens.device
    dtype = next(model.parameters()).dtype
    size = len(tree)
    allowed = torch.cat([torch.ones(size, past, dtype=torch.bool, device=device), tree.mask()], 1)
    mask = torch.zeros(1, 1, size, past + size, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
    positions = (past + tree.depths())[None]
    if mrope:  # Qwen: a text token's three mRoPE rows are its position shifted by the image's rope delta
        positions = (positions + model.model.rope_deltas.to(device)).expand(3, -1, -1)
    return model(
        input_ids=tree.tokens[None],
        **{_cache_arg(model): cache},
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        output_hidden_states=True,
    )


def _keep_path(cache, past: int, path: torch.Tensor) -> None:
    """Keep the prompt and the accepted tree nodes (in path order) in every layer of the target cache."""
    for layer in cache.layers:
        index = path.to(layer.keys.device) + past
        layer.keys = torch.cat([layer.keys[..., :past, :], layer.keys[..., index, :]], -2)
        layer.values = torch.cat([layer.values[..., :past, :], layer.values[..., index, :]], -2)


_CACHE_ARGS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()


def _cache_arg(model: Any) -> str:
    """``cache_keyword(model)``, read once per model (inspect.signature costs host time per call)."""
    if model not in _CACHE_ARGS:
        _CACHE_ARGS[model] = cache_keyword(model)
    return _CACHE_ARGS[model]


def _scores(sampling: Sampling, logits: torch.Tensor) -> torch.Tensor:
    """What acceptance compares: the processed distribution, or the logits themselves when greedy
    (only their argmax is read then)."""
    return logits if sampling.greedy else sampling.probs(logits)


class _Batch:
    """Per-row state of a (left-padded) batch: the target's attention mask and positions, the
    draft's valid entries."""

    def __init__(self, model: Any, attention_mask: torch.Tensor, mrope: bool):
        self.model, self.mask, self.mrope = model, attention_mask, mrope
        self.draft_valid: torch.Tensor | None = None  # (B, draft cache length) bool

    def positions(self, count: int, past: int) -> torch.Tensor:
        """Position ids of the next ``count`` tokens of every row (as ``generate()`` derives them)."""
        steps = torch.arange(count, device=self.mask.device)
        if self.mrope:  # Qwen: cache length + the row's rope delta (which accounts for padding and the image)
            return (past + steps + self.model.model.rope_deltas.to(self.mask.device)).expand(3, -1, -1)
        return self.mask.sum(1, keepdim=True) + steps

    def grow(self, count: int) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], count)], 1)

    def draft_allowed(self, count: int) -> torch.Tensor:
        """``(B, count, cached + count)``: the draft's valid cached entries, causal over the new ones."""
        rows, cached = self.draft_valid.shape
        new = torch.ones(count, count, dtype=torch.bool, device=self.draft_valid.device).tril()
        return torch.cat([self.draft_valid[:, None].expand(-1, count, -1), new[None].expand(rows, -1, -1)], 2)

    def draft_step(self, draft, features, tokens, draft_cache):
        out = draft(
            features,
            tokens,
            draft_cache,
            start=draft_cache.get_seq_length(),
            allowed=self.draft_allowed(tokens.shape[1]),
        )
        self.draft_valid = torch.cat([self.draft_valid, self.draft_valid.new_ones(tokens.shape[0], tokens.shape[1])], 1)
        return out


def _chain_round(model, draft, cache, draft_cache, pending, predicted, steps, sampling, generator, stats, batch):
    """Draft ``steps`` tokens per row in a chain, verify them with the pending tokens in one target forward.

    Returns the committed tokens per row (the pending one and the accepted proposals: the same
    count for every row), the target's token after them per row, and the target's features of
    the committed tokens; the rejected entries are cropped from the target cache.
    """
    proposals, draft_probs, feature = [], [], predicted
    for _ in range(steps):
        probs = _scores(sampling, draft.logits(feature[:, -1]))
        draft_probs.append(probs)
        proposals.append(sampling.draw(probs, generator))
        if len(proposals) < steps:
            feature = batch.draft_step(draft, feature, proposals[-1][:, None], draft_cache)
            stats.draft_forwards += 1
    rows = pending.shape[0]
    candidate = torch.cat([pending[:, None], *(p[:, None] for p in proposals)], 1)
    positions = batch.positions(candidate.shape[1], cache.get_seq_length())
    batch.grow(candidate.shape[1])
    verified = model(
        input_ids=candidate,
        **{_cache_arg(model): cache},
        attention_mask=batch.mask,
        position_ids=positions,
        use_cache=True,
        output_hidden_states=True,
    )
    stats.target_forwards += 1
    target = _scores(sampling, verified.logits)
    drafted = torch.stack(draft_probs, 1) if steps else target[:, :0]
    verdict = chain_verify(
        candidate[:, 1:], drafted, target, generator=generator, greedy=sampling.greedy, shortest=True
    )
    host = torch.cat([verdict.advance[:1], verdict.lengths, verdict.tokens, candidate.flatten()]).tolist()  # the sync
    accepted, lengths, following = host[0], host[1 : 1 + rows], host[1 + rows : 1 + 2 * rows]
    tokens = [host[1 + 2 * rows + r * (steps + 1) :][: accepted + 1] for r in range(rows)]
    stats.accepted.append(accepted)
    stats.row_accepted.append(lengths)
    rejected = candidate.shape[1] - (accepted + 1)
    if rejected:
        cache.crop(-rejected)
        batch.mask = batch.mask[:, :-rejected]
    return tokens, following, verified.hidden_states[-1][:, : accepted + 1]


def _tree_round(model, draft, cache, draft_cache, pending, predicted, config, mrope, sampling, generator, stats, batch):
    """Grow a draft tree, verify it in one target forward, keep the accepted path in the target cache.

    Returns what :func:`_chain_round` returns (batch size 1).
    """
    grown = _grow_tree(draft, draft_cache, pending, predicted, config, stats)
    past = cache.get_seq_length()
    verified = _verify_tree(model, cache, grown, mrope)
    stats.target_forwards += 1
    choices = sampling.draw(_scores(sampling, verified.logits[0]), generator)
    path, length, following = tree_accept(grown.parents[None], grown.tokens[None], choices[None], config.depth)
    nodes = path[0].clamp_min(0)
    host = torch.cat([length, following, grown.tokens[nodes]]).tolist()  # the sync
    accepted = host[0]
    _keep_path(cache, past, nodes[: accepted + 1])
    batch.grow(accepted + 1)
    stats.accepted.append(accepted)
    stats.row_accepted.append([accepted])
    return [host[2 : 3 + accepted]], [host[1]], verified.hidden_states[-1][:, nodes[: accepted + 1]]


def _draft_prefill(model, draft, input_ids, attention_mask, features, embeds, pending, batch):
    """The draft's prefill for every row (each row's real tokens, compressed, then left-padded)."""
    parts, seen, kept = [], 0, 0
    for row in range(input_ids.shape[0]):
        real = attention_mask[row].bool()
        f, e, (s, k) = draft_inputs(
            model,
            draft,
            input_ids[row : row + 1, real],
            features[row : row + 1, real],
            embeds[row : row + 1, real],
            pending[row],
        )
        parts.append((f[0], e[0]))
        seen, kept = seen + s, kept + k
    length = max(len(f) for f, _ in parts)
    pad = lambda x: torch.cat([x.new_zeros(length - len(x), x.shape[-1]), x])  # noqa: E731
    feats = torch.stack([pad(f) for f, _ in parts])
    nexts = torch.stack([pad(e) for _, e in parts])
    valid = torch.stack([torch.arange(length, device=feats.device) >= length - len(f) for f, _ in parts])
    causal = torch.ones(length, length, dtype=torch.bool, device=feats.device).tril()
    batch.draft_valid = valid
    return feats, nexts, causal[None] & valid[:, None], (seen, kept)


@torch.no_grad()
def speculative_generate(
    model: Any,
    inputs: dict,
    draft: DraftModel,
    max_new_tokens: int = 64,
    depth: int = 5,
    eos_token_id: int | None = None,
    tree: TreeConfig | None = None,
    sampling: Sampling | None = None,
) -> tuple[torch.Tensor, SpecStats]:
    """Speculative generation: ``(sequences (B, prompt + new), stats)``; greedy unless ``sampling``.

    With ``sampling`` (chain drafting), the draft samples its proposals from its own processed
    distribution and each is accepted with probability ``min(1, p/q)`` under the target's
    processed distribution ``p`` (the same :class:`~hasten.speculative.Sampling` for both); at the
    first rejection the token is drawn from ``norm(max(0, p - q))``. With ``tree`` and
    ``sampling``, the tree's children are point-mass proposals. Either way the output follows the
    target's sampling distribution exactly. ``Sampling(greedy=True)`` is the same as no
    ``sampling``.

    ``depth`` is the chain length per round; with ``tree`` (e.g. ``TreeConfig()``: top-k 10, 60
    tokens, depth 7) the draft grows a dynamic tree instead and the target verifies all of it in
    one forward with a tree attention mask (one prompt at a time).

    A batch (chain drafting) is left-padded like ``generate()``'s input; rows that end (EOS) are
    padded with the pad token after it, and decoding stops when every row has ended.

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
    rows = input_ids.shape[0]
    if tree is not None and rows != 1:
        raise ValueError(
            f"tree drafting runs one prompt at a time; got {rows} prompts: pass tree=None (chain "
            f"drafting) to decode a batch"
        )
    check_positive_int(depth, "depth")
    check_positive_int(max_new_tokens, "max_new_tokens")
    sampling = sampling or Sampling(greedy=True)
    generator = sampling.generator(input_ids.device)
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos_token_id if isinstance(eos_token_id, list) else [] if eos_token_id is None else [eos_token_id])
    pad_id = getattr(model.generation_config, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (min(eos) if eos else 0)
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
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
    mrope = adapter_for(model).mrope
    batch = _Batch(model, attention_mask, mrope)
    pending = sampling.draw(_scores(sampling, out.logits[:, -1]), generator)  # (B,)
    features, next_embeds, allowed, stats.compressed_visual = _draft_prefill(
        model, draft, input_ids, attention_mask, out.hidden_states[-1], embeds, pending, batch
    )
    draft_cache = DynamicCache()
    predicted = draft(features, None, draft_cache, start=0, next_embeds=next_embeds, allowed=allowed)[:, -1:]
    stats.draft_forwards += 1
    generated: list[list[int]] = [[] for _ in range(rows)]
    ended = [False] * rows

    def commit(row_tokens: list[list[int]]) -> None:
        for row, tokens in enumerate(row_tokens):
            generated[row].extend(tokens)
            ended[row] = ended[row] or bool(eos & set(tokens))

    while len(generated[0]) < max_new_tokens:
        before = draft_cache.get_seq_length()
        if tree is None:
            steps = min(depth, max_new_tokens - len(generated[0]) - 1)
            committed, following, true_features = _chain_round(
                model, draft, cache, draft_cache, pending, predicted, steps, sampling, generator, stats, batch
            )
        else:
            committed, following, true_features = _tree_round(
                model, draft, cache, draft_cache, pending, predicted, tree, mrope, sampling, generator, stats, batch
            )
        commit(committed)
        if all(ended) or len(generated[0]) >= max_new_tokens:
            break
        if len(generated[0]) == max_new_tokens - 1 or all(e or f in eos for e, f in zip(ended, following)):
            commit([[f] for f in following])
            break
        # the draft forgets its proposals and re-reads the accepted tokens with the target's true features
        extra = draft_cache.get_seq_length() - before
        if extra:
            draft_cache.crop(-extra)
            batch.draft_valid = batch.draft_valid[:, :before]
        pending = torch.tensor(following, device=input_ids.device)
        next_tokens = torch.tensor([[*c[1:], f] for c, f in zip(committed, following)], device=input_ids.device)
        predicted = batch.draft_step(draft, true_features, next_tokens, draft_cache)[:, -1:]
        stats.draft_forwards += 1
    length = 0
    for row in range(rows):  # each row ends at its first EOS (pad after it); the batch at its longest row
        tokens = generated[row][:max_new_tokens]
        end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        generated[row] = tokens[:end]
        length = max(length, end)
    generated = [tokens + [pad_id] * (length - len(tokens)) for tokens in generated]
    stats.new_tokens = length
    stats.seconds = time.perf_counter() - start_time
    sequence = torch.cat([input_ids, torch.tensor(generated, dtype=input_ids.dtype, device=input_ids.device)], 1)
    return sequence, stats


@dataclass
class SpecVLM:
    """SpecVLM as one object: a draft, its drafting shape and its compressor, and the last call's stats.

    Two ways to use it: :meth:`generate` (``spec.generate(model, inputs)``), or applied to the
    model through the front door, ``hasten.apply(model, SpecVLM(draft))``: until removed,
    ``model.generate(**inputs, max_new_tokens=..)`` decodes speculatively (greedy: the same tokens
    as the plain model, fewer target passes). ``model.generate`` cannot host draft-and-verify
    rounds itself (it owns the cache and the one-token step), so applying replaces the model's
    ``generate`` on the instance; removing restores the class's. Through ``model.generate`` it
    decodes greedily only and takes the model inputs plus ``max_new_tokens`` and
    ``eos_token_id``; any other generation option (``do_sample=True``, ``num_beams``, ...) is a
    ``ValueError`` naming it, never a silent fallback to plain decoding (sampling:
    ``spec.generate(model, inputs, sampling=Sampling(...))``).

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
    >>> import hasten, hasten.tiny
    >>> from hasten.tiny.vlms import chat_prompt
    >>> from PIL import Image
    >>> model, processor = hasten.tiny.vlm("llava")
    >>> inputs = processor(images=[Image.new("RGB", (32, 32))], text=[chat_prompt(processor, "Hi?")],
    ...                    return_tensors="pt")
    >>> spec = SpecVLM(DraftModel.for_target(model))
    >>> out = spec.generate(model, inputs, max_new_tokens=8)
    >>> spec.stats.target_forwards <= 9
    True
    >>> with hasten.apply(model, spec):
    ...     same = model.generate(**inputs, max_new_tokens=8)
    >>> bool((same == out).all())
    True
    """

    draft: Any
    tree: TreeConfig | None = field(default_factory=TreeConfig)
    depth: int = 5
    compressor: str | None = None

    def __post_init__(self) -> None:
        self.stats: SpecStats | None = None

    def bound_draft(self, model: Any) -> DraftModel:
        """The draft (loaded if a folder), bound to ``model``, with the compressor override applied."""
        draft = self.draft if isinstance(self.draft, DraftModel) else DraftModel.from_pretrained(self.draft, model)
        draft.bind(model)
        if self.compressor is not None:
            from .compressor import CHOICES

            if self.compressor not in CHOICES:
                raise ValueError(f"`compressor` must be one of {CHOICES}, got {self.compressor!r}")
            draft.compressor.mode = self.compressor
        return draft

    def generate(
        self,
        model: Any,
        inputs: dict,
        max_new_tokens: int = 64,
        sampling: Sampling | None = None,
        eos_token_id: int | None = None,
        draft: DraftModel | None = None,
    ) -> torch.Tensor:
        """``(B, prompt + new)`` tokens (a batch needs ``tree=None``): the target's own greedy (or sampled)
        output, with fewer target passes. ``draft``: an already bound draft (else :meth:`bound_draft`)."""
        draft = draft if draft is not None else self.bound_draft(model)
        sequences, self.stats = speculative_generate(
            model, inputs, draft, max_new_tokens, self.depth, eos_token_id, self.tree, sampling
        )
        return sequences


# --- the front door's row for SpecVLM (hasten.methods.METHODS) -----------------------------------------
#: ``model.generate`` options the speculative ``generate`` takes (any other one is an error).
_GENERATE_OPTIONS = ("max_new_tokens", "eos_token_id", "do_sample")


def specvlm_target(model: Any) -> torch.nn.Module:
    """The VLM whose ``generate`` SpecVLM replaces (a supported transformers VLM)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "generate"):
        raise ValueError(
            f"SpecVLM applies to a transformers VLM (a module with `generate`); got {type(model).__name__}"
        )
    adapter_for(model)  # a clear error for an unsupported model class
    return model


def prepare_specvlm(model: torch.nn.Module, spec: SpecVLM) -> SpecVLM:
    replaced = vars(model).get("generate")
    if replaced is not None and not hasattr(replaced, "specvlm"):  # another SpecVLM's is replaced by this one
        raise ValueError(
            f"{type(model).__name__}.generate is already replaced on this instance (not by SpecVLM); "
            "SpecVLM would hide it"
        )
    return spec


def attach_specvlm(model: torch.nn.Module, spec: SpecVLM) -> None:
    draft = spec.bound_draft(model)
    from transformers import GenerationConfig

    generation_options = set(GenerationConfig().to_dict())

    def generate(input_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in generation_options or k == "generation_config"}
        unsupported = sorted(k for k, v in options.items() if k not in _GENERATE_OPTIONS and v is not None)
        if options.get("do_sample") or (options.get("do_sample") is None and model.generation_config.do_sample):
            unsupported.insert(0, "do_sample")
        if unsupported:
            raise ValueError(
                f"`{unsupported[0]}`: model.generate with SpecVLM applied decodes greedily and takes "
                f"only {', '.join(_GENERATE_OPTIONS[:2])}; remove SpecVLM (hasten.remove) or call "
                "SpecVLM.generate(model, inputs, sampling=...)"
            )
        max_new_tokens = options.get("max_new_tokens") or model.generation_config.max_new_tokens
        if max_new_tokens is None:
            raise ValueError(
                "`max_new_tokens`: model.generate with SpecVLM applied needs it (or the model's "
                "generation_config.max_new_tokens)"
            )
        return spec.generate(model, kwargs, max_new_tokens, eos_token_id=options.get("eos_token_id"), draft=draft)

    generate.specvlm = spec  # type: ignore[attr-defined]
    model.generate = generate


def detach_specvlm(model: torch.nn.Module, spec: SpecVLM) -> None:
    vars(model).pop("generate", None)
