"""MustDrop: multi-stage vision token dropping (Liu et al., 2024, arXiv 2411.10803).

Three stages over a token's whole life, as the released code (liuting20/MustDrop) runs them:

1. Vision (before the LLM): each image's patch grid is tiled with ``window x window`` windows
   (3 x 3); a window whose tokens have a mean pairwise cosine similarity >= ``merge_threshold``
   (0.8) becomes one token, the mean of its tokens, at its top-left token's position. Then, on
   the merged sequence, a "key set" of the ``ceil(key_fraction * N)`` (8%) tokens with the
   highest CLS attention at the vision tower's LAST layer is marked never-droppable (a merged
   token can be a key token: the merge ignores the key set).
2. Prefill: at LLM ``layers`` (2, 6, 10, 14) every text token's attention to each visual token
   is recorded (head-averaged). A visual token is dropped when BOTH its share of the total
   text-to-visual attention is below ``global_threshold`` AND the largest attention any single
   text token gives it is below ``individual_threshold`` (the dual-attention filter).
3. Decoding (``decode_cache="official"``, the paper's output-aware cache policy): the layers
   from the first filter layer on keep only the tokens that survived the last filter layer;
   the layers before it keep the whole prompt. Each layer's decoding step attends what its
   cache holds.

Choices where transformers or hasten's API leave the paper's letter:

- The merge happens at the LLM input, on the projected tokens, not inside the vision tower
  after its layer 0: transformers' VLMs place exactly one feature per image placeholder, so
  the tower cannot shorten its own sequence without a forked model file. The windows are the
  same (the patch grid of each image or anyres partition; LLaVA-Next's row newlines are never
  merged), the similarity is measured on the tokens the LLM sees. The tower therefore runs
  unmerged: a merged token's key-set score is the last-layer CLS attention its window's
  patches receive together.
- The paper tunes its thresholds to land near a target count (192, 128, 64 of 576): ``budget``
  picks the paper's thresholds for the nearest target, as the released code. With
  ``cap_budget=True`` (hasten's option) it is also a cap: at the last filter layer the
  lowest-attention survivors are dropped until at most ``max(floor(budget * n), key set)`` of
  each image's ``n`` visual tokens remain, so every image meets the budget.
- Qwen2-VL has no CLS token: its key set is the merged tokens with the largest L2 norm.
- Positions are kept (``renumber=False``); the paper renumbers (``renumber=True``, LLaVA only):
  see :class:`~hasten.token_pruning.TokenPruner`.
- Filter layers the model does not have (a tiny LLM) are skipped with a one-time warning.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .._validation import check_int
from .core import ImageTokens
from .inside_llm import LLMLayerPruner
from .scoring import CLSAttention, encoder_layers_of, l2_saliency

__all__ = ["MustDrop"]

# (target visual tokens of 576, global threshold, individual threshold): the paper's settings.
_THRESHOLDS = ((192, 0.001, 0.001), (128, 0.0012, 0.001), (64, 0.011, 0.01))
_DECODE_CACHES = ("official", "all_layers", "per_layer")


@dataclass
class MustDrop(LLMLayerPruner):
    """MustDrop multi-stage visual-token dropping.

    Parameters
    ----------
    budget : float, default 2/9
        Fraction of each image's visual tokens kept at most, in (0, 1] (paper: 192, 128 or 64
        of 576 tokens; the default is the 128 setting). 1.0 disables the method entirely.
    merge_threshold : float, default 0.8
        Mean pairwise cosine similarity at which a window merges (paper: 0.8).
    window : int, default 3
        Side of the merge windows (paper: 3 x 3).
    key_fraction : float, default 0.08
        Share of each image's tokens in the key set (paper: top 8% by CLS attention).
    layers : tuple of int, default (2, 6, 10, 14)
        LLM layers whose text-to-visual attention filters tokens (paper: 2, 6, 10, 14).
    global_threshold, individual_threshold : float, optional
        The dual-attention filter's thresholds; by default the paper's values for the target
        count nearest ``budget * 576``: 0.001 / 0.001 (192), 0.0012 / 0.001 (128), 0.011 / 0.01 (64).
    decode_cache : {"official", "all_layers", "per_layer"}, default "official"
        What the caches keep for decoding (the paper's "output-aware" policy). ``"official"``, as
        the released code: the layers from the first filter layer on keep only the final
        survivors, the earlier layers the whole prompt. ``"all_layers"``: every layer keeps only
        the survivors (the smallest cache). ``"per_layer"``: each layer keeps what reached it.
    cap_budget : bool, default False
        False, as the released code: ``budget`` only picks the paper's thresholds for the nearest
        target count, and the thresholds decide how many tokens survive. True (hasten's option,
        what ``hasten vlm eval`` uses to compare methods at one budget): at the last filter
        layer, drop the lowest-attention survivors until at most ``max(floor(budget * n), key
        set)`` of each image's ``n`` visual tokens remain, so every image meets ``budget``.

    Examples
    --------
    >>> import hasten.tiny
    >>> from hasten.tiny.vlms import chat_prompt
    >>> from PIL import Image
    >>> model, processor = hasten.tiny.vlm("llava")
    >>> inputs = processor(images=[Image.new("RGB", (32, 32))], text=[chat_prompt(processor, "Hi?")],
    ...                    return_tensors="pt")
    >>> with MustDrop(budget=0.25, layers=(1,), cap_budget=True).apply(model) as pruner:
    ...     _ = model.generate(**inputs, max_new_tokens=2)
    >>> pruner.stats.visual_tokens_in, pruner.stats.visual_tokens_kept[0] <= 16
    ([64], True)
    """

    budget: float = 2 / 9
    merge_threshold: float = 0.8
    window: int = 3
    key_fraction: float = 0.08
    layers: tuple[int, ...] = (2, 6, 10, 14)
    global_threshold: float | None = None
    individual_threshold: float | None = None
    decode_cache: str = "official"
    cap_budget: bool = False

    scored_by = "text"
    prunes_before_llm = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= self.merge_threshold <= 1.0:
            raise ValueError(f"`merge_threshold` must be a cosine similarity in [-1, 1], got {self.merge_threshold!r}")
        check_int(self.window, "window", 2)
        if not 0.0 <= self.key_fraction <= 1.0:
            raise ValueError(f"`key_fraction` must be in [0, 1], got {self.key_fraction!r}")
        self.layers = tuple(self.layers)
        if not self.layers or any(
            isinstance(layer, bool) or not isinstance(layer, int) or layer < 0 for layer in self.layers
        ):
            raise ValueError(f"`layers` must be non-negative ints, got {self.layers!r}")
        target = self.budget * 576
        _, default_global, default_individual = min(_THRESHOLDS, key=lambda row: abs(row[0] - target))
        self.global_threshold = default_global if self.global_threshold is None else self.global_threshold
        self.individual_threshold = (
            default_individual if self.individual_threshold is None else self.individual_threshold
        )
        for name in ("global_threshold", "individual_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1], got {getattr(self, name)!r}")
        if self.decode_cache not in _DECODE_CACHES:
            raise ValueError(f"`decode_cache` must be one of {_DECODE_CACHES}, got {self.decode_cache!r}")
        if not isinstance(self.cap_budget, bool):
            raise ValueError(f"`cap_budget` must be True or False, got {self.cap_budget!r}")

    # --- stage 1: merge windows, mark the key set ---------------------------------------------------
    def _hook_vision(self, model, adapter):
        self._cls = None
        if adapter.has_cls:  # the key set: CLS attention of the vision tower's LAST layer (released code)
            tower = adapter.vision_tower(model)
            self._key_layer = len(encoder_layers_of(tower)) - 1
            self._cls = CLSAttention(tower, [self._key_layer])
            return self._cls.handles
        return []

    def select(self, image: ImageTokens):
        n = len(image.positions)
        device = image.embeds.device
        if image.layout is None:
            raise ValueError(
                "MustDrop needs each image's patch layout (LLaVA, LLaVA-Next with `image_sizes`, Qwen2-VL)"
            )
        layout = image.layout.to(device)
        patch = layout[:, 0] >= 0

        # 1. merge: windows of (vision row, patch row // w, patch col // w); non-patch tokens are their own
        side = self.window
        window_key = torch.stack([layout[:, 0], layout[:, 1] // side, layout[:, 2] // side], 1)
        window_key[~patch] = torch.stack(
            [torch.full_like(layout[~patch, 0], -1), torch.nonzero(~patch)[:, 0], torch.zeros_like(layout[~patch, 0])],
            1,
        )
        _, window = torch.unique(window_key, dim=0, return_inverse=True)
        windows = int(window.max()) + 1
        size = torch.zeros(windows, device=device).index_add_(0, window, torch.ones(n, device=device))
        unit = torch.nn.functional.normalize(image.embeds.float(), dim=-1)
        total = torch.zeros(windows, unit.shape[-1], device=device).index_add_(0, window, unit)
        # mean pairwise cosine over i != j: (|sum of unit vectors|^2 - m) / (m (m - 1))
        similarity = (total.pow(2).sum(-1) - size) / (size * (size - 1)).clamp_min(1)
        merged = (size >= 2) & (similarity >= self.merge_threshold)
        token_merged = merged[window]
        first = torch.full((windows,), n, dtype=torch.long, device=device).scatter_reduce_(
            0, window, torch.arange(n, device=device), "amin"
        )
        keep = ~token_merged | (torch.arange(n, device=device) == first[window])
        kept = keep.nonzero()[:, 0]
        embeds = image.embeds.float()
        means = torch.zeros(windows, embeds.shape[-1], device=device).index_add_(0, window, embeds) / size[:, None]
        replaced = torch.where(token_merged[kept, None], means[window[kept]], embeds[kept])

        # 2. the key set, on the merged sequence: its top ceil(key_fraction * patches) tokens
        kept_patch = patch[kept]
        count = math.ceil(self.key_fraction * int(kept_patch.sum()))
        if count:
            scores = self._key_scores(image, layout, window, token_merged, replaced, kept)
            key = scores.masked_fill(~kept_patch, float("-inf")).topk(count).indices
            self._state.setdefault("key_set", []).append(
                (image.sample, image.positions[kept[key].to(image.positions.device)])
            )
        self._state.setdefault("originals", {})[image.index] = n
        return kept.to(image.positions.device), replaced

    def _key_scores(
        self,
        image: ImageTokens,
        layout: torch.Tensor,
        window: torch.Tensor,
        token_merged: torch.Tensor,
        replaced: torch.Tensor,
        kept: torch.Tensor,
    ) -> torch.Tensor:
        """Key-set scores of the merged tokens ``kept``.

        LLaVA / LLaVA-Next: CLS attention at the vision tower's last layer (heads summed: the
        same ranking as the released code's mean). hasten's tower runs unmerged, so a merged
        window scores the attention its members receive together, the mass the released code's
        merged token would draw. Qwen (no CLS): the L2 norm of the merged token.
        """
        if self._cls is None:
            return l2_saliency(replaced)
        scores = self._cls.scores[self._key_layer]  # (vision rows, patches)
        side = int(round(scores.shape[1] ** 0.5))
        patch = layout[:, 0] >= 0
        flat = (layout[:, 0].clamp_min(0), (layout[:, 1] * side + layout[:, 2]).clamp_min(0))
        per_token = torch.where(patch, scores.to(layout.device)[flat], 0.0)
        per_window = torch.zeros(int(window.max()) + 1, device=layout.device).index_add_(0, window, per_token)
        return torch.where(token_merged[kept], per_window[window[kept]], per_token[kept])

    def _protected(self, prompt: dict) -> torch.Tensor:
        """The key set, as flags over the LLM input (after stage 1)."""
        before = self._state["prefill"]
        flags = torch.zeros_like(before.image_mask)
        for sample, positions in self._state.pop("key_set", []):
            flags[sample, positions] = True
        return flags.gather(1, before.columns) & before.real

    # --- stage 2: the dual-attention filter ----------------------------------------------------------
    def pruning_layers(self, num_layers: int) -> list[int]:
        usable = sorted({layer for layer in self.layers if layer < num_layers - 1})
        if not usable:
            raise ValueError(
                f"`layers` {self.layers} leaves no filter layer in this {num_layers}-layer LLM "
                f"(each must be <= {num_layers - 2})"
            )
        if len(usable) < len(set(self.layers)):
            warnings.warn(
                f"MustDrop: filter layers {sorted(set(self.layers) - set(usable))} are not before the last "
                f"of this {num_layers}-layer LLM's layers; using {usable}",
                stacklevel=3,
            )
        return usable

    def select_in_llm(self, image: ImageTokens, stage: int) -> torch.Tensor:
        attention = image.text_attention.float()  # (text tokens, visual tokens)
        received = attention.sum(0)
        share = received / received.sum().clamp_min(1e-12)
        peak = attention.amax(0) if attention.shape[0] else torch.zeros_like(received)
        protected = image.protected if image.protected is not None else torch.zeros_like(received, dtype=torch.bool)
        protected = protected.to(received.device)
        keep = (share >= self.global_threshold) | (peak >= self.individual_threshold) | protected
        if self.cap_budget and stage == len(self._pruning):  # the budget, per image, at the last filter layer
            original = self._state.get("originals", {}).get(image.index, len(received))
            cap = max(int(self.budget * original), int(protected.sum()), 1)
            if int(keep.sum()) > cap:
                rank = share.masked_fill(~keep, float("-inf")).masked_fill(protected, float("inf"))
                keep = torch.zeros_like(keep)
                keep[rank.topk(cap).indices] = True
        if not bool(keep.any()):
            keep[share.argmax()] = True
        return keep.nonzero()[:, 0]

    def decode_cache_policy(self) -> str:
        return self.decode_cache

    def kept_count_for(self, n: int) -> int:
        """Without the cap, ``budget`` only picks the thresholds: nothing must be dropped."""
        return super().kept_count_for(n) if self.cap_budget else n
