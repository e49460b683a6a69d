"""HiRED: high-resolution early dropping of visual tokens (Arif et al., AAAI 2025).

Before the LLM, each image partition keeps its tokens with the highest CLS attention at the
vision tower's feature layer (the layer LLaVA uses, 22 of CLIP-L/336), summed over heads.

With several partitions (LLaVA-Next anyres: the full image, then k sub-images), the budget is
the official code's ``B = int(budget * (k + 1) * P)`` over the ``P`` patches of a full
partition (576 for CLIP-L/336), not over the tokens the LLM sees (those add row newlines and
lose the rows anyres unpadding crops). It is split: ``floor(alpha * B)`` to the full image, the rest to the sub-images in proportion to their content score, the layer-0 CLS
attention of the full image summed over the full-image patches that cover each sub-image
(the paper's rule; its public code counts top layer-0 tokens per region instead). Rounding
remainders go to the largest fractional shares, and a partition that has fewer tokens than its
share (anyres unpadding crops sub-images) passes the rest on, so every image keeps exactly
``B`` tokens (all of its patches, when unpadding left fewer than ``B``). LLaVA-Next's
row-newline tokens carry no patch and are dropped first.

The sub-image grid is read in row-major order (rows of sub-images, as transformers packs
them). The official code maps sub-images to full-image regions with the grid transposed
(columns for rows); hasten keeps the correct orientation, so on a non-square grid its content
scores go to the sub-images they describe.

Qwen2-VL / Qwen2.5-VL variant: their vision towers have no CLS token and one native-resolution
partition, so there is no budget split, and each token is scored by its L2 norm at the LLM
input (the merged patch feature), the CLS-free saliency hasten also uses for MustDrop's key
set. It keeps HiRED's shape (score once, top-k before the LLM) but not its signal; the
faithful CLS path is LLaVA's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .core import ImageTokens, TokenPruner
from .scoring import CLSAttention, encoder_layers_of, l2_saliency

__all__ = ["HiRED"]


@dataclass
class HiRED(TokenPruner):
    """HiRED token dropping before the LLM.

    Parameters
    ----------
    budget : float, default 0.2
        Fraction of visual tokens kept (the paper's 20% setting), in (0, 1].
    alpha : float, default 0.5
        Share of the budget for the full image when there are sub-images (paper: 0.5).

    Examples
    --------
    >>> import hasten.tiny, torch
    >>> from hasten.tiny.vlms import chat_prompt
    >>> from PIL import Image
    >>> model, processor = hasten.tiny.vlm("llava")
    >>> inputs = processor(images=[Image.new("RGB", (32, 32))], text=[chat_prompt(processor, "Hi?")],
    ...                    return_tensors="pt")
    >>> with HiRED(budget=0.25).apply(model) as pruner:
    ...     _ = model.generate(**inputs, max_new_tokens=2)
    >>> pruner.stats.visual_tokens_in, pruner.stats.visual_tokens_kept
    ([64], [16])
    """

    budget: float = 0.2
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {self.alpha!r}")

    def _hook_vision(self, model, adapter):
        self._cls = None
        if not adapter.has_cls:
            return []
        layer = model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("HiRED needs a single `vision_feature_layer`")
        # hidden_states[layer] is the output of encoder layer (layer - 1) counted from the end too.
        tower = adapter.vision_tower(model)
        self._feature_layer = (layer % (len(encoder_layers_of(tower)) + 1)) - 1
        self._cls = CLSAttention(tower, sorted({0, self._feature_layer}))
        return self._cls.handles

    def select(self, image: ImageTokens):
        n, budget = len(image.positions), self.kept_count(image)
        device = image.embeds.device
        if self._cls is None:  # Qwen: no CLS token, one partition
            if budget >= n:
                return torch.arange(n, device=device), None
            return l2_saliency(image.embeds).topk(budget).indices.sort().values, None
        if image.layout is None:
            raise ValueError("HiRED needs each image's patch layout (LLaVA; LLaVA-Next with `image_sizes`)")
        layout = image.layout.to(device)
        patch = layout[:, 0] >= 0
        feature = self._cls.scores[self._feature_layer].to(device)
        side = int(round(feature.shape[1] ** 0.5))
        flat = layout[:, 1].clamp_min(0) * side + layout[:, 2].clamp_min(0)
        scores = torch.where(patch, feature[layout[:, 0].clamp_min(0), flat], float("-inf"))
        partitions = layout[patch, 0].unique()  # ascending: the full image first
        if len(partitions) > 1 and self.budget < 1.0:  # anyres: the official budget, over (k + 1) partitions
            budget = min(int(self.budget * len(partitions) * side * side), int(patch.sum()))
        if budget >= n:
            return torch.arange(n, device=device), None
        shares = self._partition_budgets(budget, layout, patch, partitions, side)
        kept = [
            scores.masked_fill(layout[:, 0] != row, float("-inf")).topk(count).indices
            for row, count in zip(partitions.tolist(), shares)
            if count
        ]
        return torch.cat(kept).sort().values, None

    def _partition_budgets(self, budget: int, layout, patch, partitions, side: int) -> list[int]:
        """Tokens per partition: alpha of the budget to the full image, the rest by content score."""
        available = [int((layout[:, 0] == row).sum()) for row in partitions.tolist()]
        if len(partitions) == 1:
            return [min(budget, available[0])]
        base = int(self.alpha * budget)
        subs = len(partitions) - 1
        # the sub-image grid: after the full image's tokens, the first row of the unpadded grid
        # (up to its newline) runs through the first row of sub-images
        sub_tokens = layout[available[0] :]
        newlines = (sub_tokens[:, 0] < 0).nonzero()[:, 0]
        first_row = sub_tokens[: int(newlines[0]) if len(newlines) else len(sub_tokens)]
        columns = max(1, int(first_row[:, 0].unique().numel()))
        rows = max(1, subs // columns)
        content = self._cls.scores[0][int(partitions[0])].view(side, side).to(layout.device)
        score = torch.stack(
            [
                content[
                    r * side // rows : (r + 1) * side // rows, c * side // columns : (c + 1) * side // columns
                ].sum()
                for r in range(rows)
                for c in range(columns)
            ]
        )[:subs].float()
        weights = score / score.sum() if float(score.sum()) > 0 else torch.full_like(score, 1 / subs)
        exact = weights * (budget - base)
        counts = exact.floor().long()
        for index in (exact - counts).argsort(descending=True)[: (budget - base) - int(counts.sum())]:
            counts[index] += 1  # remainders to the largest fractional shares
        shares = [base, *counts.tolist()]
        # partitions with fewer tokens than their share pass the rest on, in order of content
        order = [0, *(1 + weights.argsort(descending=True)).tolist()]
        spare = 0
        for index in order:
            spare += max(0, shares[index] - available[index])
            shares[index] = min(shares[index], available[index])
        for index in order:
            extra = min(spare, available[index] - shares[index])
            shares[index] += extra
            spare -= extra
        return shares
