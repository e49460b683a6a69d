"""ConsistEdit: training-free, consistent editing on MM-DiT models (SD3, Flux images; CogVideoX, Wan videos).

A source branch (the source prompt) and a target branch (the target prompt) denoise side by side
in one batch. In the controlled attention layers the target's image-token Q/K/V are overwritten
by the source's (:mod:`hasten.hooks.consistedit`): V in the preserved region at
every step, Q and K on all image tokens during the first ``alpha`` of the steps and in the
preserved region after. ``alpha`` is the structural-consistency knob (paper: 1.0 for colour /
material edits, 0.3 for style / shape edits, 0.1 for real images).

- **Synthetic mode** (``seed``): both branches start from the same noise.
- **Real mode** (``image`` or ``latents``): the image is inverted first (flow-matching inversion,
  "uni" by default, :mod:`.inversion`) with the source prompt at guidance 1, recording the
  source's image Q/K/V per noise level (:class:`~hasten.hooks.feature_cache.FeatureCache`,
  bounded: bf16 by default, int8 or a disk spill on request); while editing they are put back
  into the source branch.
- **Mask**: from ``edit_words`` (attention of image tokens to the words' tokens in a source
  pass, averaged over heads, layers and steps, min-max normalised, > 0.1 = edit region) or a
  user ``mask`` (an image, white = edit, resized to the token grid).

hasten adds one thing to the paper's attention control, on by default: ``blend_latents`` puts
the source branch's latent into the target's preserved region after every step, and in real
mode pastes the input latents into it at the end. The preserved region then reconstructs
exactly (real mode) or equals the source generation (synthetic mode), and multi-round editing
(``latents=previous.latents``) does not drift. ``blend_latents=False`` is attention control
alone, as in the paper.

Usage::

    from diffusers import FluxPipeline
    from hasten.pipelines import ConsistEditPipeline
    editor = ConsistEditPipeline.from_pipe(FluxPipeline.from_pretrained(...).to("cuda"), height=1024, width=1024)
    out = editor.edit("a red car on a street", "a blue car on a street", edit_words=["red car"], alpha=1.0)
    out.target            # (3, H, W) in [0, 1]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .._validation import check_positive_int
from ..adapters import pipeline_defaults
from ..hooks.consistedit import ConsistEditControl, grid_mask
from ..hooks.feature_cache import FeatureCache, FeatureCacheConfig
from ..hooks.feature_replay import FeatureReplay
from .flow_models import FlowModel, token_positions, video_latent_keep
from .inversion import SOLVERS, invert, regenerate

__all__ = ["ConsistEditPipeline", "EditOutput", "grid_mask"]


@dataclass
class EditOutput:
    """One edit.

    Attributes
    ----------
    source, target : Tensor (3, H, W)
        The source reconstruction (real mode) or generation (synthetic), and the edit, in [0, 1].
    latents : Tensor
        The target's final latents: pass them as ``latents=`` to edit again without a VAE round trip.
    source_latents : Tensor
    edit_region : BoolTensor (rows, cols)
        The token grid's edit region (True = edited).
    seconds : dict
        ``invert``, ``mask`` and ``edit`` wall times.
    cache_bytes : int
        Bytes of recorded source features (real mode).
    """

    source: torch.Tensor
    target: torch.Tensor
    latents: torch.Tensor
    source_latents: torch.Tensor
    edit_region: torch.Tensor
    seconds: dict[str, float] = field(default_factory=dict)
    cache_bytes: int = 0


class ConsistEditPipeline:
    """ConsistEdit on a loaded SD3 or Flux (images) or CogVideoX or Wan (videos) pipeline (see the module docstring).

    Examples
    --------
    >>> import hasten.tiny
    >>> editor = ConsistEditPipeline.from_pipe(hasten.tiny.pipeline("flux"), height=36, width=52)
    >>> out = editor.edit("a red car", "a blue car", edit_words=["red"], num_inference_steps=4, progress=False)
    >>> out.target.shape, out.edit_region.dtype
    (torch.Size([3, 36, 52]), torch.bool)
    """

    def __init__(self, model: FlowModel | None = None, video: "_VideoEditor | None" = None):
        self.model, self.video = model, video

    @classmethod
    def from_pipe(
        cls,
        pipe: Any,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
        num_frames: int | None = None,
    ) -> "ConsistEditPipeline":
        """Wrap a diffusers ``StableDiffusion3Pipeline``, ``FluxPipeline``, ``CogVideoXPipeline`` or
        ``WanPipeline``. Sizes, frames and ``max_sequence_length`` default to the pipeline's own
        ``__call__`` defaults (:func:`hasten.adapters.pipeline_defaults`; e.g. Flux 512 text tokens,
        SD3 256, CogVideoX 226), whatever the model's size: pass them for small models."""
        if type(pipe).__name__ in _VIDEO_FAMILIES:
            video = _VideoEditor(pipe, height, width, num_frames, max_sequence_length)
            model = None
            if type(pipe).__name__ == "WanPipeline":  # flow matching: real videos can be inverted
                model = FlowModel(pipe, video.height, video.width, video.max_sequence_length, video.num_frames)
            return cls(model=model, video=video)
        return cls(FlowModel(pipe, height, width, max_sequence_length))

    # --- the edit ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def edit(
        self,
        source_prompt: str,
        target_prompt: str,
        edit_words: Sequence[str] | None = None,
        mask: Any | None = None,
        alpha: float | None = None,
        image: Any | None = None,
        latents: torch.Tensor | None = None,
        seed: int = 0,
        num_inference_steps: int = 28,
        guidance_scale: float | None = None,
        solver: str = "uni",
        mask_threshold: float = 0.1,
        blend_latents: bool = True,
        cache: FeatureCacheConfig | None = None,
        region_only: bool = False,
        progress: bool = True,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
    ) -> EditOutput:
        """Edit: the source prompt's image into the target prompt's, keeping what the mask preserves.

        Parameters
        ----------
        source_prompt, target_prompt : str
        edit_words : list of str, optional
            Words of ``source_prompt`` whose attention gives the edit region.
        mask : image, optional
            The edit region (white / True = edit), image-sized or token-grid-sized. One of
            ``edit_words`` and ``mask`` is required.
        alpha : float, optional
            Structural consistency: the fraction of steps in which Q/K of all image tokens come
            from the source. Default: 1.0 synthetic, 0.1 real (the paper's values).
        image, latents : optional
            Real mode: the image to edit, or latents from a previous :class:`EditOutput`.
        seed : int
            Synthetic mode: the shared noise.
        num_inference_steps : int, default 28
        guidance_scale : float, optional
            Default: 1.0 in real mode (inversion and editing, as ConsistEdit), else the family's
            (SD3 7.0 with CFG, Flux 3.5 embedded).
        solver : {"uni", "euler", "midpoint"}, default "uni"
            Inversion solver (real mode).
        mask_threshold : float, default 0.1
        blend_latents : bool, default True
            Keep the target's preserved region on the source's latent (see the module docstring).
        cache : FeatureCacheConfig, optional
            How the source features are stored in real mode (default bfloat16 in RAM).
        height, width : int, optional
            This call's image size (images only; default: the size given to :meth:`from_pipe`).
        generator : torch.Generator, optional
            Synthetic mode: the noise is drawn from it (on the CPU) instead of from ``seed``.
        region_only : bool, default False
            Real mode with a user ``mask``: record only what the edit reads back (V in the preserved
            region; Q and K of every token only in the first ``alpha`` of the steps). The source
            branch then reconstructs the preserved region from its features and computes the rest.
        """
        if self.video is not None and (height or width or generator is not None):
            raise ValueError(
                "per-call `height` / `width` / `generator` are for images; give video sizes to from_pipe() "
                "and the noise as `seed`"
            )
        if self.video is not None and (image is not None or latents is not None) and self.model is None:
            raise ValueError(
                f"real (inverted) video editing is not available for {self.video.family} (it samples "
                "with DDIM, not flow matching): give a `seed` (synthetic mode)"
            )
        if self.video is not None and image is None and latents is None:
            return self.video.edit(
                source_prompt,
                target_prompt,
                edit_words,
                mask,
                1.0 if alpha is None else alpha,
                seed,
                num_inference_steps,
                guidance_scale,
                mask_threshold,
                blend_latents,
                progress,
            )
        model = self.model.resized(height, width)
        real = image is not None or latents is not None
        if edit_words is None and mask is None:
            raise ValueError("give `edit_words` (words of the source prompt) or a `mask` of the edit region")
        if solver not in SOLVERS:
            raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}")
        check_positive_int(num_inference_steps, "num_inference_steps")
        alpha = (0.1 if real else 1.0) if alpha is None else float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}")
        if guidance_scale is None:
            guidance_scale = 1.0 if real else (7.0 if model.family == "StableDiffusion3Pipeline" else 3.5)
        word_positions = model.text_token_positions(source_prompt, list(edit_words)) if mask is None else []
        user_edit = grid_mask(mask, model.grid, model.height, model.width) if mask is not None else None

        control = ConsistEditControl(model.pipe.transformer, model.tokens).install()
        frames = model.grid[0] if len(model.grid) == 3 else 1
        feature_cache = FeatureCache(cache or FeatureCacheConfig()) if real else None
        sigmas = model.sigmas(num_inference_steps)
        seconds = {"invert": 0.0, "mask": 0.0, "edit": 0.0}
        try:
            source_cond = model.encode([source_prompt], guidance_scale)
            if real:
                start = time.perf_counter()
                x0 = latents.to(model.device, model.dtype) if latents is not None else model.encode_image(image)
                # the conditional row is recorded (inversion runs at guidance 1, so it is the only row)
                control.mode, control.features = "record", FeatureReplay(feature_cache)
                control.source_rows = [1] if model.uses_cfg else [0]
                if region_only and user_edit is not None:  # only what the edit will read back
                    control.record_preserved = (~user_edit).nonzero()[:, 0]
                    control.record_levels = {round(float(s), 6): i for i, s in enumerate(sigmas[:-1])}
                    control.alpha, control.steps = alpha, num_inference_steps

                def observed(x, sigma):
                    control.sigma = sigma
                    return model.velocity(x, sigma, source_cond)

                noise = invert(observed, x0, sigmas, solver, progress)
                control.mode = "off"
                seconds["invert"] = time.perf_counter() - start
            else:
                x0, noise = None, model.noise(seed, generator=generator)

            if user_edit is None:  # the mask pass: the source branch alone, its word attention recorded
                start = time.perf_counter()
                control.mode, control.word_positions = "mask", word_positions
                control.mask_rows = [1] if model.uses_cfg else [0]  # the conditional row
                control.replay, control.source_rows, control.preserve = real, [0], None

                def masked(x, sigma):
                    control.sigma = sigma
                    return model.velocity(x, sigma, source_cond)

                regenerate(masked, noise, sigmas, solver, progress)
                edit_region = control.edit_mask(mask_threshold, frames=frames)
                seconds["mask"] = time.perf_counter() - start
            else:
                edit_region = user_edit.to(model.device)
            if user_edit is None and not bool(edit_region.any()):
                raise ValueError(
                    "the edit words' attention marks no edit region; lower `mask_threshold` or give a `mask`"
                )
            preserve = (~edit_region).to(model.device, model.dtype)

            start = time.perf_counter()
            both = model.encode([source_prompt, target_prompt], guidance_scale)
            control.mode, control.preserve, control.alpha = "edit", preserve, alpha
            control.steps, control.replay = num_inference_steps, real
            control.source_rows, control.target_rows = ([0, 2], [1, 3]) if model.uses_cfg else ([0], [1])
            keep = model.latent_keep(preserve)
            x = torch.cat([noise, noise])
            levels = [float(s) for s in sigmas]
            for index, (sigma, following) in enumerate(
                tqdm(list(zip(levels[:-1], levels[1:])), desc="editing", disable=not progress)
            ):
                control.step, control.sigma = index, sigma
                x = x + (following - sigma) * model.velocity(x, sigma, both)
                if blend_latents:
                    x[1:2] = keep * x[0:1] + (1 - keep) * x[1:2]
            if blend_latents and x0 is not None:
                x[1:2] = keep * x0 + (1 - keep) * x[1:2]
            seconds["edit"] = time.perf_counter() - start
        finally:
            control.remove()
            cache_bytes = feature_cache.nbytes if feature_cache is not None else 0
            if feature_cache is not None:
                feature_cache.close()
        images = model.decode(x)
        return EditOutput(
            source=images[0],
            target=images[1],
            latents=x[1:2],
            source_latents=x[0:1],
            edit_region=edit_region.view(*model.grid).cpu(),
            seconds=seconds,
            cache_bytes=cache_bytes,
        )

    @torch.no_grad()
    def generate(
        self, prompt: str, seed: int = 0, num_inference_steps: int = 28, guidance_scale: float | None = None
    ) -> torch.Tensor:
        """A plain generation with this pipeline's sampler (Euler on the same schedule), (3, H, W) in [0, 1]."""
        model = self.model
        if guidance_scale is None:
            guidance_scale = 7.0 if model.family == "StableDiffusion3Pipeline" else 3.5
        cond = model.encode([prompt], guidance_scale)
        x = regenerate(
            lambda x, s: model.velocity(x, s, cond), model.noise(seed), model.sigmas(num_inference_steps), "euler"
        )
        return model.decode(x)[0]


_VIDEO_FAMILIES = {"CogVideoXPipeline": 6.0, "WanPipeline": 5.0}  # the pipelines' default guidance scales


class _VideoEditor:
    """Synthetic-mode ConsistEdit on a video pipeline's own sampling loop (CogVideoX, Wan).

    Both prompts run as one batch through the pipeline's ``__call__`` from one shared noise; the
    step index and the latent blend come from ``callback_on_step_end``. Masks are per latent
    frame (edit words: min-max normalised per frame).
    """

    def __init__(
        self, pipe: Any, height: int | None, width: int | None, num_frames: int | None, max_sequence_length: int
    ):
        self.pipe, self.family = pipe, type(pipe).__name__
        self.default_guidance = _VIDEO_FAMILIES[self.family]
        defaults = pipeline_defaults(pipe)  # the pipeline's own __call__ defaults
        self.height, self.width = height or defaults["height"], width or defaults["width"]
        self.num_frames = num_frames or defaults["num_frames"]
        self.max_sequence_length = max_sequence_length or defaults["max_sequence_length"]
        spatial = pipe.vae_scale_factor_spatial * 2
        if self.height % spatial or self.width % spatial:
            raise ValueError(f"`height` and `width` must be multiples of {spatial}, got {self.height} x {self.width}")
        temporal = pipe.vae_scale_factor_temporal
        if (self.num_frames - 1) % temporal:
            raise ValueError(f"`num_frames` must be {temporal} k + 1, got {self.num_frames}")
        self.grid = ((self.num_frames - 1) // temporal + 1, self.height // spatial, self.width // spatial)

    def _noise(self, seed: int) -> torch.Tensor:
        pipe = self.pipe
        generator = torch.Generator().manual_seed(seed)
        channels = pipe.transformer.config.in_channels
        dtype = pipe.transformer.dtype
        if self.family == "CogVideoXPipeline":
            latents = pipe.prepare_latents(
                1, channels, self.num_frames, self.height, self.width, torch.float32, "cpu", generator
            )
        else:
            latents = pipe.prepare_latents(
                1, channels, self.height, self.width, self.num_frames, torch.float32, "cpu", generator
            )
        return latents.to(pipe.transformer.device, dtype)

    @torch.no_grad()
    def edit(
        self,
        source_prompt,
        target_prompt,
        edit_words,
        mask,
        alpha,
        seed,
        steps,
        guidance_scale,
        mask_threshold,
        blend_latents,
        progress,
    ) -> EditOutput:
        pipe = self.pipe
        if edit_words is None and mask is None:
            raise ValueError("give `edit_words` (words of the source prompt) or a `mask` of the edit region")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}")
        guidance = self.default_guidance if guidance_scale is None else guidance_scale
        frames, rows, cols = self.grid
        tokens = frames * rows * cols
        control = ConsistEditControl(pipe.transformer, tokens).install()
        calls = {"in_step": 0}
        cfg_in_batch = self.family == "CogVideoXPipeline" and guidance > 1.0

        def count(module, args, kwargs):
            control.mask_enabled = calls["in_step"] == 0  # Wan: the conditional call comes first
            calls["in_step"] += 1

        counter = pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
        noise = self._noise(seed)
        seconds = {"invert": 0.0, "mask": 0.0, "edit": 0.0}
        common = dict(
            height=self.height,
            width=self.width,
            num_frames=self.num_frames,
            num_inference_steps=steps,
            guidance_scale=guidance,
            max_sequence_length=self.max_sequence_length,
        )
        keep_holder: dict[str, torch.Tensor] = {}

        def step_end(pipeline, index, timestep, kwargs):
            control.step, calls["in_step"] = index + 1, 0
            latents = kwargs["latents"]
            if "keep" in keep_holder and latents.shape[0] == 2:
                keep = keep_holder["keep"].to(latents.dtype)
                latents = torch.cat([latents[:1], keep * latents[:1] + (1 - keep) * latents[1:]])
            return {"latents": latents}

        try:
            pipe.set_progress_bar_config(disable=not progress)
            if mask is None:
                start = time.perf_counter()
                control.word_positions = token_positions(
                    source_prompt, list(edit_words), [(pipe.tokenizer, 0, self.max_sequence_length)]
                )
                control.mode, control.mask_rows, control.step = "mask", [1] if cfg_in_batch else [0], 0
                pipe(
                    prompt=[source_prompt], latents=noise, output_type="latent", callback_on_step_end=step_end, **common
                )
                edit_region = control.edit_mask(mask_threshold, frames=frames)
                if not bool(edit_region.any()):
                    raise ValueError(
                        "the edit words' attention marks no edit region; lower `mask_threshold` or give a `mask`"
                    )
                seconds["mask"] = time.perf_counter() - start
            else:
                edit_region = grid_mask(mask, self.grid, self.height, self.width)
            start = time.perf_counter()
            preserve = (~edit_region).to(noise.device, noise.dtype)
            control.mode, control.preserve, control.alpha, control.steps, control.step = (
                "edit",
                preserve,
                alpha,
                steps,
                0,
            )
            control.source_rows, control.target_rows = ([0, 2], [1, 3]) if cfg_in_batch else ([0], [1])
            if blend_latents:
                keep_holder["keep"] = video_latent_keep(preserve, self.grid, self.family)
            calls["in_step"] = 0
            video = pipe(
                prompt=[source_prompt, target_prompt],
                negative_prompt=["", ""],
                latents=torch.cat([noise, noise]),
                output_type="pt",
                callback_on_step_end=step_end,
                **common,
            ).frames
            seconds["edit"] = time.perf_counter() - start
        finally:
            control.remove()
            counter.remove()
        video = torch.as_tensor(video).float()
        return EditOutput(
            source=video[0],
            target=video[1],
            latents=torch.empty(0),
            source_latents=torch.empty(0),
            edit_region=edit_region.view(frames, rows, cols).cpu(),
            seconds=seconds,
        )
