"""Masked K/V replay editing (VoxHammer / KV-Edit): regenerate a region, replay everything else.

The source image (or video) is inverted with the second-order midpoint solver (part 1's
:mod:`.inversion`), recording at every noise level the latent and, per attention layer, the
keys and values of the PRESERVED tokens (:class:`~hasten.attention_processors.feature_cache.FeatureCache`:
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

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..attention_processors.consistedit import ConsistEditControl
from ..attention_processors.feature_cache import FeatureCache, FeatureCacheConfig
from .consistedit import ConsistEditPipeline, grid_mask
from .flow_models import FlowModel
from .inversion import invert

__all__ = ["MaskedKVEditPipeline", "MaskedKVResult"]


@dataclass
class MaskedKVResult:
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
    >>> editor = MaskedKVEditPipeline.from_pipe(hasten.tiny.pipeline("flux"))
    >>> mask = np.zeros((36, 52)); mask[10:26, 16:36] = 1
    >>> out = editor.edit(photo("chelsea"), mask, "a photo of a dog", num_inference_steps=4, progress=False)
    >>> out.image.shape
    torch.Size([3, 36, 52])
    """

    def __init__(self, model: FlowModel):
        self.model = model

    @classmethod
    def from_pipe(cls, pipe: Any, height: int | None = None, width: int | None = None, num_frames: int | None = None,
                  max_sequence_length: int = 77) -> "MaskedKVEditPipeline":
        """Wrap an SD3, Flux, Wan or HunyuanVideo pipeline (sizes default as for :class:`ConsistEditPipeline`;
        HunyuanVideo: the tiny model's, else 544 x 960 x 61 frames)."""
        if type(pipe).__name__ == "HunyuanVideoPipeline":
            from .. import tiny

            small = tiny.default_size("hunyuan-video") if sum(
                p.numel() for p in pipe.transformer.parameters()) < 10**7 else {}
            return cls(FlowModel(pipe, height or small.get("height", 544), width or small.get("width", 960),
                                 max_sequence_length, num_frames or small.get("num_frames", 61)))
        editor = ConsistEditPipeline.from_pipe(pipe, height, width, max_sequence_length, num_frames)
        if editor.model is None:
            raise ValueError(f"masked K/V editing needs a flow-matching model (SD3, Flux, Wan); got {type(pipe).__name__}")
        return cls(editor.model)

    def _keep(self, preserve: torch.Tensor) -> torch.Tensor:
        return ConsistEditPipeline(self.model)._latent_keep(preserve)

    @torch.no_grad()
    def edit(self, image: Any, mask: Any, prompt: str, source_prompt: str = "", num_inference_steps: int = 25,
             guidance_scale: float | None = None, cache: FeatureCacheConfig | None = None,
             progress: bool = True) -> MaskedKVResult:
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
        """
        model = self.model
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}")
        edit_region = grid_mask(mask, model.grid, model.height, model.width).to(model.device)
        preserve = (~edit_region).to(model.dtype)
        x0 = model.encode_image(image)
        if not bool(edit_region.any()):  # nothing to edit: the source, exactly
            return MaskedKVResult(model.decode(x0)[0], x0, edit_region.view(*model.grid).cpu())
        sigmas = model.sigmas(num_inference_steps)
        levels = {round(float(s), 6) for s in sigmas}
        control = ConsistEditControl(model.pipe.transformer, model.tokens).install()
        features = FeatureCache(cache or FeatureCacheConfig())
        latents: dict[float, torch.Tensor] = {}
        seconds = {"invert": 0.0, "edit": 0.0}
        try:
            start = time.perf_counter()
            source = model.encode([source_prompt], guidance_scale=1.0)
            control.mode, control.cache, control.source_rows = "record", features, [0]
            control.record_kinds = {"k", "v"}
            control.record_preserved = (~edit_region).nonzero()[:, 0]
            control.alpha, control.steps = 0.0, num_inference_steps

            def recorded(x, sigma):
                control.sigma = sigma
                if round(sigma, 6) in levels:
                    latents[round(sigma, 6)] = x
                return model.velocity(x, sigma, source)

            noise = invert(recorded, x0, sigmas, "midpoint", progress)
            latents[round(float(sigmas[0]), 6)] = noise
            seconds["invert"] = time.perf_counter() - start

            start = time.perf_counter()
            if guidance_scale is None:
                guidance_scale = {"StableDiffusion3Pipeline": 7.0, "FluxPipeline": 3.5,
                                  "HunyuanVideoPipeline": 6.0}.get(model.family, 5.0)
            target = model.encode([prompt], guidance_scale)
            control.mode, control.replay, control.preserve = "edit", True, None
            control.source_rows = [0, 1] if model.uses_cfg else [0]  # every row gets the source's K/V
            keep = self._keep(preserve)
            x = noise
            steps = [(float(a), float(b)) for a, b in zip(sigmas[:-1], sigmas[1:])]
            for index, (sigma, following) in enumerate(tqdm(steps, desc="editing", disable=not progress)):
                control.step = index

                def velocity(y, level):
                    control.sigma = level
                    return model.velocity(y, level, target)

                middle = x + (following - sigma) / 2 * velocity(x, sigma)
                x = x + (following - sigma) * velocity(middle, sigma + (following - sigma) / 2)
                cached = latents.get(round(following, 6), x0 if following == 0.0 else None)
                if cached is not None:
                    x = keep * cached + (1 - keep) * x
            x = keep * x0 + (1 - keep) * x  # the preserved region is the source, exactly
            seconds["edit"] = time.perf_counter() - start
        finally:
            control.remove()
            cache_bytes = features.nbytes
            features.close()
        return MaskedKVResult(model.decode(x)[0], x, edit_region.view(*model.grid).cpu(), seconds, cache_bytes)
