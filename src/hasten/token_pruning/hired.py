"""HiRED: high-resolution early dropping of visual tokens (Arif et al., AAAI 2025).

Before the LLM, each image partition keeps its tokens with the highest CLS attention at the
vision tower's feature layer (the last layer LLaVA uses, 22 of CLIP-L/336), summed over heads.
With several partitions (LLaVA-Next anyres), the budget is split: ``alpha`` of it to the full
image, the rest to the sub-images in proportion to layer-0 CLS attention of the full image
over each sub-image's area.

This release covers LLaVA-1.5 (one partition: the top-k rule alone). LLaVA-Next partitions and
a Qwen2-VL variant (no CLS token) raise a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

from .core import ImageTokens, TokenPruner
from .scoring import CLSAttention, encoder_layers_of

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
        if type(model).__name__ != "LlavaForConditionalGeneration":
            raise ValueError(f"HiRED is implemented for LlavaForConditionalGeneration; {type(model).__name__} "
                             "(LLaVA-Next partitions, Qwen2-VL without a CLS token) is not supported yet")
        layer = model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("HiRED needs a single `vision_feature_layer`")
        # hidden_states[layer] is the output of encoder layer (layer - 1) counted from the end too.
        num_layers = len(encoder_layers_of(adapter.vision_tower(model)))
        self._feature_layer = (layer % (num_layers + 1)) - 1
        self._cls = CLSAttention(adapter.vision_tower(model), [self._feature_layer])
        return self._cls.handles

    def select(self, image: ImageTokens):
        scores = self._cls.scores[self._feature_layer][image.index]
        if len(scores) != len(image.positions):
            raise ValueError(f"HiRED: {len(scores)} vision patches but {len(image.positions)} image tokens")
        kept = scores.topk(self.kept_count(image)).indices.sort().values
        return kept.to(image.positions.device), None
