"""Baselines every pruning comparison needs: random keep and spatial average pooling.

Recent benchmarks find both strong; :mod:`benchmarks/vlm_pruning.py` reports them next to the
paper methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .core import ImageTokens, TokenPruner

__all__ = ["RandomKeep", "SpatialPool"]


@dataclass
class RandomKeep(TokenPruner):
    """Keep a uniformly random ``max(1, floor(budget * n))`` of each image's visual tokens.

    Parameters
    ----------
    budget : float
        Fraction of visual tokens kept, in (0, 1].
    seed : int, default 0
        Seeds the draw of every call (same inputs, same kept tokens).

    Examples
    --------
    >>> import hasten.tiny
    >>> model, processor = hasten.tiny.vlm("llava")
    >>> RandomKeep(budget=0.25).budget
    0.25
    """

    seed: int = 0

    def select(self, image: ImageTokens):
        n, k = len(image.positions), self.kept_count(image)
        generator = torch.Generator().manual_seed(self.seed + image.index)
        return torch.randperm(n, generator=generator)[:k].sort().values.to(image.positions.device), None


@dataclass
class SpatialPool(TokenPruner):
    """Average-pool each image's token grid with the smallest ``s x s`` window that meets the budget.

    The window side ``s`` is the smallest with ``ceil(rows/s) * ceil(cols/s) <= budget * n``; each
    window becomes one token: the mean of its embeddings, at the position of its top-left token
    (positions are never renumbered). Budget 1.0 gives ``s = 1``: the unpruned model.

    Parameters
    ----------
    budget : float
        Fraction of visual tokens kept at most, in (0, 1].
    """

    def select(self, image: ImageTokens):
        if image.grid is None:
            raise ValueError(
                "SpatialPool needs visual tokens on one grid (LLaVA, Qwen2-VL); "
                "LLaVA-Next anyres tokens are not one grid"
            )
        rows, cols = image.grid
        side = 1
        while math.ceil(rows / side) * math.ceil(cols / side) > max(1.0, self.budget * rows * cols):
            side += 1
        if side == 1:
            return torch.arange(rows * cols, device=image.positions.device), None
        grid = image.embeds.view(rows, cols, -1).permute(2, 0, 1)[None].float()
        pooled = torch.nn.functional.avg_pool2d(grid, side, side, ceil_mode=True)[0]  # windows at the edges: their mean
        index = torch.arange(rows * cols, device=image.positions.device).view(rows, cols)[::side, ::side]
        return index.flatten(), pooled.flatten(1).T
