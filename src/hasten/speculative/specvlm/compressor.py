"""SpecVLM's elastic visual compressor: fewer visual tokens for the DRAFT (the target sees them all).

Primitives (each maps an image's ``n`` visual features on a ``rows x cols`` grid to fewer):

``"pool"``       2 x 2 average pooling (``ceil(rows/2) * ceil(cols/2)`` tokens)
``"conv"``       a learned 2 x 2 stride-2 convolution (same count as "pool"; starts as pooling)
``"random"``     a seeded random quarter of the tokens (``max(1, n // 4)``)
``"saliency"``   the quarter with the largest feature norm (a training-free attention proxy)
``"resampler"``  ``queries`` (2) learned queries attending to all tokens
``"text"``       no visual token at all (the text-only branch)
``"none"``       every token

``"gate"`` picks one primitive per input with a small learned scorer on the image's mean
feature (argmax, deterministic, at eval; the trainer teaches it which primitive gives the lowest
draft loss). The speculative loop never lets this change what the target sees, so outputs stay
the target's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["PRIMITIVES", "ElasticCompressor"]

PRIMITIVES = ("none", "pool", "conv", "random", "saliency", "resampler", "text")
CHOICES = (*PRIMITIVES, "gate")


class ElasticCompressor(nn.Module):
    """The draft's visual-token compressor (see the module docstring)."""

    def __init__(self, hidden: int, mode: str = "pool", queries: int = 2):
        super().__init__()
        if mode not in CHOICES:
            raise ValueError(f"`compressor` must be one of {CHOICES}, got {mode!r}")
        self.mode = mode
        self.conv = nn.Conv2d(hidden, hidden, 2, stride=2, groups=1, bias=False)
        with torch.no_grad():  # start as average pooling
            self.conv.weight.zero_()
            for channel in range(hidden):
                self.conv.weight[channel, channel] = 0.25
        self.queries = nn.Parameter(torch.randn(queries, hidden) * hidden**-0.5)
        self.gate = nn.Linear(hidden, len(PRIMITIVES) - 1)  # "none" is never gated in
        self.last_choice = mode

    def count(self, n: int, grid: tuple[int, int] | None, mode: str | None = None) -> int:
        """How many tokens ``mode`` keeps of ``n`` on ``grid``."""
        mode = mode or self.mode
        if mode == "none":
            return n
        if mode == "text":
            return 0
        if mode in ("pool", "conv"):
            rows, cols = grid if grid is not None else (1, n)
            return math.ceil(rows / 2) * math.ceil(cols / 2)
        if mode in ("random", "saliency"):
            return max(1, n // 4)
        if mode == "resampler":
            return self.queries.shape[0]
        raise ValueError(f"cannot count tokens for {mode!r}")

    def choose(self, features: torch.Tensor) -> str:
        """The gate's primitive for one image's ``(n, hidden)`` features."""
        scores = self.gate(features.float().mean(0).to(self.gate.weight.dtype))
        return PRIMITIVES[1:][int(scores.argmax())]

    def compress_pair(
        self,
        features: torch.Tensor,
        embeds: torch.Tensor,
        grid: tuple[int, int] | None,
        mode: str | None = None,
        seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compress one image's features and, by the same selection / pooling, its next-token embeddings.

        The embeddings get the parameter-free twin of the primitive (pooling for "conv", the same
        attention weights for "resampler", the same kept tokens for "random" / "saliency").
        """
        mode = mode or self.mode
        if mode == "gate":
            mode = self.choose(features)
        self.last_choice = mode
        if mode == "resampler":
            hidden = features.shape[-1]
            attention = torch.softmax(self.queries.to(features.dtype) @ features.T * hidden**-0.5, dim=-1)
            return attention @ features, attention.to(embeds.dtype) @ embeds
        if mode in ("random", "saliency"):
            n = len(features)
            if mode == "random":
                generator = torch.Generator().manual_seed(seed)
                keep = torch.randperm(n, generator=generator)[: self.count(n, grid, mode)].sort().values
            else:
                keep = features.float().norm(dim=-1).topk(self.count(n, grid, mode)).indices.sort().values
            keep = keep.to(features.device)
            return features[keep], embeds[keep]
        twin = "pool" if mode == "conv" else mode
        return self.forward(features, grid, mode, seed), self.forward(embeds, grid, twin, seed)

    def forward(
        self, features: torch.Tensor, grid: tuple[int, int] | None, mode: str | None = None, seed: int = 0
    ) -> torch.Tensor:
        """``(n, hidden)`` -> ``(m, hidden)`` compressed features of one image."""
        mode = mode or self.mode
        if mode == "gate":
            mode = self.choose(features)
        self.last_choice = mode
        n, hidden = features.shape
        if mode == "none":
            return features
        if mode == "text":
            return features[:0]
        if mode in ("pool", "conv"):
            rows, cols = grid if grid is not None and grid[0] * grid[1] == n else (1, n)
            image = features.T.reshape(1, hidden, rows, cols)
            pad = (0, cols % 2, 0, rows % 2)
            if any(pad):
                image = nn.functional.pad(image, pad, mode="replicate")
            if mode == "pool":
                out = nn.functional.avg_pool2d(image.float(), 2).to(features.dtype)
            else:
                out = self.conv(image.to(self.conv.weight.dtype))
            return out.flatten(2)[0].T.to(features.dtype)
        if mode == "random":
            generator = torch.Generator().manual_seed(seed)
            keep = torch.randperm(n, generator=generator)[: self.count(n, grid, mode)].sort().values
            return features[keep.to(features.device)]
        if mode == "saliency":
            keep = features.float().norm(dim=-1).topk(self.count(n, grid, mode)).indices.sort().values
            return features[keep]
        attention = torch.softmax(self.queries.to(features.dtype) @ features.T * hidden**-0.5, dim=-1)
        return attention @ features
