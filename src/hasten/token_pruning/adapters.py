"""Where the visual tokens are, per transformers VLM class (for :mod:`hasten.token_pruning`).

One small table entry per model class: its image-token id, the language model that the
pruning stages hook, the vision tower (for methods that score inside it), and how many visual
tokens each image contributes and on which grid they lie. The pruning core knows nothing else
about the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["ADAPTERS", "VLMAdapter", "adapter_for"]


@dataclass(frozen=True)
class VLMAdapter:
    """How one VLM class lays out visual tokens.

    Attributes
    ----------
    model_class : str
    language_model : callable
        ``model -> nn.Module``: the decoder whose forward receives the merged input embeddings.
    vision_tower : callable
        ``model -> nn.Module``.
    image_grids : callable
        ``(model, runs, position_ids) -> list[(rows, cols) | None]``: the token grid of each
        image (``runs``: ``(sample, positions)`` per image, in order of appearance), from the
        position ids the language model receives; ``None`` where the tokens are not one grid.
    has_cls : bool
        Whether the vision tower has a CLS token (CLIP) whose attention can score patches.
    """

    model_class: str
    language_model: Callable[[Any], torch.nn.Module]
    vision_tower: Callable[[Any], torch.nn.Module]
    image_grids: Callable[[Any, dict, list[int]], list[tuple[int, int] | None]]
    has_cls: bool

    def image_token_id(self, model) -> int:
        return int(model.config.image_token_id)


def _square_grids(model, runs, position_ids):
    grids = []
    for _, run in runs:
        side = int(round(len(run) ** 0.5))
        grids.append((side, side) if side * side == len(run) else None)
    return grids


def _llava_next_grids(model, runs, position_ids):
    # anyres: base image + sub-images, unpadded, with a newline token per row: not one grid.
    return [None] * len(runs)


def _qwen_grids(model, runs, position_ids):
    """From the mRoPE positions: the last two rows are each visual token's (row, column)."""
    grids = []
    for sample, run in runs:
        rows_, cols_ = position_ids[-2, sample, run], position_ids[-1, sample, run]
        rows, cols = int(rows_.max() - rows_.min()) + 1, int(cols_.max() - cols_.min()) + 1
        grids.append((rows, cols) if rows * cols == len(run) else None)
    return grids


ADAPTERS: dict[str, VLMAdapter] = {
    adapter.model_class: adapter
    for adapter in (
        VLMAdapter("LlavaForConditionalGeneration", lambda m: m.model.language_model, lambda m: m.model.vision_tower,
                   _square_grids, has_cls=True),
        VLMAdapter("LlavaNextForConditionalGeneration", lambda m: m.model.language_model,
                   lambda m: m.model.vision_tower, _llava_next_grids, has_cls=True),
        VLMAdapter("Qwen2VLForConditionalGeneration", lambda m: m.model.language_model, lambda m: m.model.visual,
                   _qwen_grids, has_cls=False),
        VLMAdapter("Qwen2_5_VLForConditionalGeneration", lambda m: m.model.language_model, lambda m: m.model.visual,
                   _qwen_grids, has_cls=False),
    )
}


def adapter_for(model: Any) -> VLMAdapter:
    """The adapter of ``model``'s class; ``ValueError`` listing the supported classes otherwise."""
    name = type(model).__name__
    if name not in ADAPTERS:
        raise ValueError(f"unsupported model class {name}; token pruning supports {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]
