"""Masked K/V replay editing (VoxHammer / KV-Edit): regenerate a region, replay everything else.

The source image (or video) is inverted with the second-order midpoint solver
(:mod:`.inversion`), recording at every noise level the latent and, per attention layer, the
keys and values of the PRESERVED tokens (:class:`~hasten.hooks.feature_cache.FeatureCache`:
region-only by construction, bf16 by default, int8 and disk spill on request). Editing then
denoises from the inverted noise with the target prompt, and:

- in self-attention the preserved tokens' K/V are the recorded ones (the edited tokens attend
  the source's context, so the edit blends in);
- after every step ``x <- x * M + cached_x * (1 - M)`` (``M`` = 1 on the edit region);
- at the end the preserved region is the source latent, exactly.

Works on the flow-matching families of :class:`~hasten.pipelines.flow_models.FlowModel`: SD3,
Flux (images), Wan and HunyuanVideo (videos; its dual-stream blocks replay). Mask semantics: an all-zero edit mask returns the source
(nothing to edit); a mask covering everything is a plain regeneration from the inverted noise
(no token to preserve). Both are documented behaviour, not errors.

Usage::

    editor = MaskedKVEditPipeline.from_pipe(flux_pipe, height=1024, width=1024)
    out = editor.edit(image, mask, "a photo of a tiger", source_prompt="a photo of a cat")
    out.image            # (3, H, W) in [0, 1]; out.cache_bytes, out.seconds
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._validation import check_positive_int
from ..hooks.consistedit import grid_mask, image_projection_sites
from ..hooks.feature_cache import FeatureCache, FeatureCacheConfig
from ..hooks.feature_replay import FeatureReplay
from .flow_models import FlowModel
from .inversion import invert_and_replay

__all__ = ["MaskedKVEditPipeline", "MaskedKVOutput"]


@dataclass
class MaskedKVOutput:
    """The edit (``image``: (3, H, W), or (F, 3, H, W) for videos, in [0, 1]), its latents, the
    edit region on the token grid, wall times and the bytes of the recorded source features."""

    image: torch.Tensor
    latents: torch.Tensor
    edit_region: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)
    cache_bytes: int = 0


class MaskedKVEditPipeline:
    """Masked K/V replay editing on a diffusers SD3, Flux or Wan pipeline (see the module docstring).

    Examples
    --------
    >>> import numpy as np, hasten.tiny
    >>> from hasten.tiny.motion import photo
    >>> editor = MaskedKVEditPipeline.from_pipe(hasten.tiny.pipeline("flux"), height=36, width=52)
    >>> mask = np.zeros((36, 52)); mask[10:26, 16:36] = 1
    >>> out = editor.edit(photo("chelsea"), mask, "a photo of a dog", num_inference_steps=4, progress=False)
    >>> out.image.shape
    torch.Size([3, 36, 52])
    """

    def __init__(self, model: FlowModel):
        self.model = model

    @classmethod
    def from_pipe(
        cls,
        pipe: Any,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        max_sequence_length: int | None = None,
    ) -> "MaskedKVEditPipeline":
        """Wrap an SD3, Flux, Wan or HunyuanVideo pipeline. Sizes, frames and ``max_sequence_length``
        default to the pipeline's own ``__call__`` defaults (:func:`hasten.adapters.pipeline_defaults`)."""
        if type(pipe).__name__ == "CogVideoXPipeline":
            raise ValueError(
                "masked K/V editing needs a flow-matching model (SD3, Flux, Wan, HunyuanVideo); got CogVideoXPipeline"
            )
        return cls(FlowModel(pipe, height, width, max_sequence_length, num_frames))

    @torch.no_grad()
    def edit(
        self,
        image: Any,
        mask: Any,
        prompt: str,
        source_prompt: str = "",
        num_inference_steps: int = 25,
        guidance_scale: float | None = None,
        cache: FeatureCacheConfig | None = None,
        progress: bool = True,
        height: int | None = None,
        width: int | None = None,
    ) -> MaskedKVOutput:
        """Regenerate the ``mask`` region (white / True = edit) of ``image`` with ``prompt``.

        Parameters
        ----------
        image : PIL image / (H, W, 3) uint8 array, or (T, H, W, 3) frames for Wan
        mask : image-sized or token-grid-sized edit mask (videos: optionally per frame)
        prompt : str
            What the edit region should become (the target condition).
        source_prompt : str, default ""
            The condition the source is inverted with (VoxHammer inverts with the source's).
        num_inference_steps : int, default 25
            VoxHammer's 25 steps; the inversion is the 2nd-order midpoint solver.
        guidance_scale : float, optional
            Editing guidance (default: the family's, SD3 7.0 / Flux 3.5 / Wan 5.0); the
            inversion runs at guidance 1.
        cache : FeatureCacheConfig, optional
            Storage of the recorded K/V (default bfloat16 in RAM).
        height, width : int, optional
            This call's image size (default: the size given to :meth:`from_pipe`).
        """
        model = self.model.resized(height, width)
        check_positive_int(num_inference_steps, "num_inference_steps")
        edit_region = grid_mask(mask, model.grid, model.height, model.width).to(model.device)
        preserve = (~edit_region).to(model.dtype)
        x0 = model.encode_image(image)
        if not bool(edit_region.any()):  # nothing to edit: the source, exactly
            return MaskedKVOutput(model.decode(x0)[0], x0, edit_region.view(*model.grid).cpu())
        if guidance_scale is None:
            guidance_scale = {"StableDiffusion3Pipeline": 7.0, "FluxPipeline": 3.5, "HunyuanVideoPipeline": 6.0}.get(
                model.family, 5.0
            )
        features = FeatureCache(cache or FeatureCacheConfig())
        replay = FeatureReplay(features, rows=(~edit_region).nonzero()[:, 0]).attach(
            image_projection_sites(model.pipe.transformer, model.tokens, ("k", "v"))
        )
        try:
            source = model.encode([source_prompt], guidance_scale=1.0)
            target = model.encode([prompt], guidance_scale)
            # every row of a CFG batch gets the source's K/V (the guidance-1 inversion's one row, broadcast)
            x, seconds = invert_and_replay(
                lambda y, level: model.velocity(y, level, source),
                lambda y, level: model.velocity(y, level, target),
                x0,
                model.sigmas(num_inference_steps),
                model.latent_keep(preserve),
                replay,
                progress,
            )
        finally:
            replay.detach()
            cache_bytes = features.nbytes
            features.close()
        return MaskedKVOutput(model.decode(x)[0], x, edit_region.view(*model.grid).cpu(), seconds, cache_bytes)
