"""Where the visual tokens are, per transformers VLM class (for :mod:`hasten.token_pruning`).

One small table entry per model class: its image-token id, the language model that the
pruning stages hook, the vision tower (for methods that score inside it), and where each
visual token comes from (which vision-tower image or anyres partition, which patch). The pruning
core knows nothing else about the models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..transformers_conventions import cache_keyword, patch_point_error

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
    patch_layouts : callable
        ``(model, call_kwargs, runs, position_ids) -> list[LongTensor (n, 3) | None]``: for each
        image (``runs``: ``(sample, positions)`` per image, in order of appearance), where each of
        its ``n`` visual tokens comes from: ``(vision batch row, patch row, patch column)``, or
        ``-1`` in all three for tokens that are no patch (LLaVA-Next's row newlines). The vision
        batch row indexes the vision tower's batch (one row per image, or per anyres partition).
        ``None`` where the layout is unknown.
    has_cls : bool
        Whether the vision tower has a CLS token (CLIP) whose attention can score patches.
    mrope : bool
        Whether positions are Qwen's 3-D mRoPE (row and column per visual token).
    encoder_inputs : tuple of str
        Arguments of ``get_image_features`` the layout needs (recorded there, because
        ``generate()`` runs the vision encoder before the first forward).
    """

    model_class: str
    language_model: Callable[[Any], torch.nn.Module]
    vision_tower: Callable[[Any], torch.nn.Module]
    patch_layouts: Callable[[Any, dict, list, torch.Tensor], list[torch.Tensor | None]]
    has_cls: bool
    mrope: bool = False
    encoder_inputs: tuple[str, ...] = ()

    def image_token_id(self, model) -> int:
        return int(model.config.image_token_id)

    def check_hook_points(self, model) -> str:
        """Check, at attach time, every model internal the pruning hooks rely on; returns the keyword
        the language model takes its KV cache under (:func:`~hasten.transformers_conventions.cache_keyword`).

        Raises :class:`~hasten.transformers_conventions.PatchPointError` naming the model class and
        the transformers version when one is gone (a transformers release moved it), instead of
        letting the hooks find nothing and prune nothing.
        """
        try:
            language_model, vision_tower = self.language_model(model), self.vision_tower(model)
        except AttributeError as error:
            raise patch_point_error(
                model, f"the language model or vision tower is not where the adapter looks ({error})"
            ) from None
        for owner, name in ((language_model, "layers"), (language_model, "config"), (vision_tower, "forward")):
            if getattr(owner, name, None) is None:
                raise patch_point_error(model, f"`{type(owner).__name__}` has no `{name}`")
        if getattr(model.config, "image_token_id", None) is None:
            raise patch_point_error(model, "the config has no `image_token_id` (where the visual tokens are)")
        return cache_keyword(language_model)


def _raster(rows: int, cols: int, vision_row: int, device) -> torch.Tensor:
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return torch.stack([torch.full_like(r, vision_row), r, c], 1)


def _llava_layouts(model, call, runs, position_ids):
    """One CLIP image per image token run, its patches in raster order (the CLS token dropped)."""
    layouts = []
    for index, (_, run) in enumerate(runs):
        side = int(round(len(run) ** 0.5))
        layouts.append(_raster(side, side, index, run.device) if side * side == len(run) else None)
    return layouts


def _llava_next_layouts(model, call, runs, position_ids):
    """anyres: the base image, then the unpadded sub-image grid with a newline after each row.

    Found by running the model's own ``pack_image_features`` on features that hold each patch's
    (vision row, patch row, patch column), so the layout follows transformers exactly.
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    sizes = call.get("image_sizes")
    if sizes is None or config.vision_feature_select_strategy != "default":
        return [None] * len(runs)
    side = config.vision_config.image_size // config.vision_config.patch_size
    device = runs[0][1].device if runs else "cpu"
    features, offset = [], 0
    for size in sizes:
        count = image_size_to_num_patches(
            image_size=size, grid_pinpoints=config.image_grid_pinpoints, patch_size=config.vision_config.image_size
        )
        features.append(torch.stack([_raster(side, side, offset + k, device) for k in range(count)]).float())
        offset += count
    packed, _ = model.model.pack_image_features(
        features, sizes, "default", image_newline=torch.full((3,), -1.0, device=device)
    )
    layouts = [layout.round().long() for layout in packed]
    if len(layouts) != len(runs) or any(len(layout) != len(run) for layout, (_, run) in zip(layouts, runs)):
        return [None] * len(runs)
    return layouts


def _qwen_layouts(model, call, runs, position_ids):
    """From the mRoPE positions: the last two rows are each visual token's (row, column)."""
    layouts = []
    for index, (sample, run) in enumerate(runs):
        rows, cols = position_ids[-2, sample, run], position_ids[-1, sample, run]
        layouts.append(torch.stack([torch.full_like(rows, index), rows - rows.min(), cols - cols.min()], 1))
    return layouts


ADAPTERS: dict[str, VLMAdapter] = {
    adapter.model_class: adapter
    for adapter in (
        VLMAdapter(
            "LlavaForConditionalGeneration",
            lambda m: m.model.language_model,
            lambda m: m.model.vision_tower,
            _llava_layouts,
            has_cls=True,
        ),
        VLMAdapter(
            "LlavaNextForConditionalGeneration",
            lambda m: m.model.language_model,
            lambda m: m.model.vision_tower,
            _llava_next_layouts,
            has_cls=True,
            encoder_inputs=("image_sizes",),
        ),
        VLMAdapter(
            "Qwen2VLForConditionalGeneration",
            lambda m: m.model.language_model,
            lambda m: m.model.visual,
            _qwen_layouts,
            has_cls=False,
            mrope=True,
        ),
        VLMAdapter(
            "Qwen2_5_VLForConditionalGeneration",
            lambda m: m.model.language_model,
            lambda m: m.model.visual,
            _qwen_layouts,
            has_cls=False,
            mrope=True,
        ),
    )
}


def adapter_for(model: Any) -> VLMAdapter:
    """The adapter of ``model``'s class; ``ValueError`` listing the supported classes otherwise."""
    name = type(model).__name__
    if name not in ADAPTERS:
        raise ValueError(f"unsupported model class {name}; token pruning supports {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]
