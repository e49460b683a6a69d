"""FastV: drop visual tokens after an early LLM layer by the last token's attention (Chen et al., ECCV 2024).

At decoder layer ``K`` (paper: K = 2) the visual tokens are ranked by the attention the last
prompt token gives them; after that layer only the top ``budget`` fraction of each image's
visual tokens continue (paper: R = 50% dropped, i.e. budget 0.5). Layers up to K keep every
token, so the KV cache of those layers stays full; later layers' caches hold the kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._validation import check_int
from .core import ImageTokens
from .inside_llm import LLMLayerPruner

__all__ = ["FastV"]


@dataclass
class FastV(LLMLayerPruner):
    """FastV visual-token dropping inside the LLM.

    Parameters
    ----------
    budget : float, default 0.5
        Fraction of each image's visual tokens kept after ``layer`` (paper: drop ratio R = 50%).
    layer : int, default 2
        The layer K whose last-query attention ranks the visual tokens (paper: K = 2).

    Examples
    --------
    >>> import hasten.tiny
    >>> from hasten.tiny.vlms import chat_prompt
    >>> from PIL import Image
    >>> model, processor = hasten.tiny.vlm("qwen2-vl")
    >>> inputs = processor(images=[Image.new("RGB", (32, 32))], text=[chat_prompt(processor, "Hi?")],
    ...                    return_tensors="pt")
    >>> with FastV(budget=0.5, layer=1).apply(model) as pruner:
    ...     _ = model.generate(**inputs, max_new_tokens=2)
    >>> pruner.stats.visual_tokens_in, pruner.stats.visual_tokens_kept
    ([16], [8])
    """

    budget: float = 0.5
    layer: int = 2

    def pruning_layers(self, num_layers: int) -> list[int]:
        check_int(self.layer, "layer", 0, num_layers - 2, why=f"this LLM has {num_layers} layers")
        return [self.layer]

    def select_in_llm(self, image: ImageTokens, stage: int):
        return image.scores.topk(self.kept_count(image)).indices.sort().values
