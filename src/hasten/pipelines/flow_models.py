"""Flow-matching text-to-image / text-to-video pipelines as one velocity field ``v(x, sigma | prompt)``.

Inversion and editing need to call a pipeline's transformer at any noise level, in any order,
for a batch of prompts that share a forward pass. :class:`FlowModel` gives that for the
diffusers flow-matching pipelines (SD3, Flux; Wan, HunyuanVideo): encode prompts once, encode / decode
images, and evaluate the velocity (``dx/dsigma``, so ``x(sigma) = (1 - sigma) x0 + sigma
noise`` moves along it), with classifier-free guidance as one batched call when the family uses
it (SD3, Wan) or the guidance embedding (Flux-dev, HunyuanVideo). Schedules, default sizes and text
lengths are the pipeline's own (:mod:`hasten.adapters`).

Batch layout inside the transformer (what attention processors see): the prompts in order,
and with CFG the unconditional copies first: ``[uncond_0, ..., uncond_k-1, cond_0, ...]``.

Image tokens: :attr:`FlowModel.grid` is their (rows, cols) grid; :meth:`FlowModel.text_token_positions`
finds the text-sequence positions of words of a prompt, per the family's text layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..adapters import pipeline_defaults, pipeline_sigmas

__all__ = ["FLOW_FAMILIES", "FlowModel", "pixel_multiple", "token_positions", "video_latent_keep"]


def token_positions(prompt: str, words: list[str], tokenizers: list[tuple[Any, int, int]]) -> list[int]:
    """Text-sequence positions of the tokens spelling ``words`` in ``prompt``.

    ``tokenizers``: ``(tokenizer, offset, max_length)`` per text encoder whose tokens follow each
    other in the transformer's text sequence.
    """
    spans = []
    lowered = prompt.lower()
    for word in words:
        start = lowered.find(word.lower())
        if not word or start < 0:
            raise ValueError(f"edit word {word!r} is not in the prompt {prompt!r}")
        spans.append((start, start + len(word)))
    positions = []
    for tokenizer, offset, length in tokenizers:
        encoded = tokenizer(prompt, return_offsets_mapping=True, truncation=True, max_length=length)
        for index, (a, b) in enumerate(encoded["offset_mapping"]):
            if b > a and any(a < end and b > begin for begin, end in spans):
                positions.append(offset + index)
    if not positions:
        raise ValueError(f"no token of {words} found in the tokenised prompt {prompt!r}")
    return positions


FLOW_FAMILIES = ("StableDiffusion3Pipeline", "FluxPipeline", "WanPipeline", "HunyuanVideoPipeline")
_VIDEO = ("WanPipeline", "HunyuanVideoPipeline")


@dataclass
class _Conditioning:
    embeds: torch.Tensor
    pooled: torch.Tensor
    prompts: list[str]
    mask: torch.Tensor | None = None
    guidance_scale: float = 1.0
    cfg: bool = False  # guidance runs as a batched unconditional pass (the unconditional rows come first)


def pixel_multiple(pipe: Any) -> int:
    """Pixels per latent token side of an editing pipeline: heights and widths are multiples of it."""
    if type(pipe).__name__ in _VIDEO:
        return pipe.vae_scale_factor_spatial * 2
    return pipe.vae_scale_factor * (2 if type(pipe).__name__ == "FluxPipeline" else pipe.transformer.config.patch_size)


def video_latent_keep(preserve: torch.Tensor, grid: tuple[int, ...], family: str) -> torch.Tensor:
    """Video preserve flags in the latent layout (2 x 2 spatial patches): CogVideoX (B, F, C, H, W), else
    (B, C, F, H, W) (Wan, HunyuanVideo)."""
    frames, rows, cols = grid
    pixels = preserve.view(frames, rows, cols).repeat_interleave(2, 1).repeat_interleave(2, 2)
    return pixels[None, :, None] if family == "CogVideoXPipeline" else pixels[None, None]


class FlowModel:
    """A diffusers flow-matching pipeline (SD3, Flux, Wan, HunyuanVideo) at a fixed size, as a velocity field.

    ``height``, ``width``, ``num_frames`` and ``max_sequence_length`` default to what the pipeline's own
    ``__call__`` uses (:func:`hasten.adapters.pipeline_defaults`: Flux 512 text tokens, SD3 256, Wan 512,
    HunyuanVideo 256), whatever the model's size; the noise schedule is the pipeline's scheduler's.

    Examples
    --------
    >>> import hasten.tiny
    >>> model = FlowModel(hasten.tiny.pipeline("sd3"), height=36, width=52)
    >>> cond = model.encode(["a red car"], guidance_scale=1.0)
    >>> x = model.noise(seed=0)
    >>> model.velocity(x, 0.5, cond).shape == x.shape
    True
    """

    def __init__(
        self,
        pipe: Any,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int | None = None,
        num_frames: int | None = None,
    ):
        family = type(pipe).__name__
        if family not in FLOW_FAMILIES:
            raise ValueError(f"editing supports {', '.join(FLOW_FAMILIES)}; got {family}")
        self.pipe, self.family = pipe, family
        defaults = pipeline_defaults(pipe)  # what the pipeline's own __call__ would use
        height, width = height or defaults["height"], width or defaults["width"]
        max_sequence_length = max_sequence_length or defaults["max_sequence_length"]
        num_frames = num_frames or defaults.get("num_frames", 1)
        factor = pixel_multiple(pipe)
        if family in _VIDEO and (num_frames - 1) % pipe.vae_scale_factor_temporal:
            raise ValueError(f"`num_frames` must be {pipe.vae_scale_factor_temporal} k + 1, got {num_frames}")
        if height % factor or width % factor:
            raise ValueError(
                f"`height` and `width` must be multiples of {factor} for this {family}; got {height} x {width}"
            )
        self.height, self.width, self.max_sequence_length = height, width, max_sequence_length
        self.num_frames = num_frames
        self.grid: tuple[int, ...] = (height // factor, width // factor)
        if family in _VIDEO:
            self.grid = ((num_frames - 1) // pipe.vae_scale_factor_temporal + 1, *self.grid)
        self.guidance_scale = 1.0

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @property
    def uses_cfg(self) -> bool:
        """Whether guidance runs as a batched unconditional pass (SD3, Wan, and a Flux without a guidance
        embedding, as ``FluxPipeline``'s ``true_cfg_scale`` runs it) rather than an embedding (Flux-dev,
        HunyuanVideo)."""
        if self.family == "FluxPipeline":
            return not self.pipe.transformer.config.guidance_embeds and self.guidance_scale > 1.0
        return self.family != "HunyuanVideoPipeline" and self.guidance_scale > 1.0

    @property
    def tokens(self) -> int:
        """Image (video) tokens per sample."""
        return int(np.prod(self.grid))

    # --- prompts ---------------------------------------------------------------------------------
    def encode(self, prompts: list[str], guidance_scale: float, negative_prompt: str = "") -> _Conditioning:
        """Text embeddings of ``prompts`` (and the unconditional ones when CFG is on)."""
        self.guidance_scale = float(guidance_scale)
        pipe, device = self.pipe, self.device
        if self.family == "StableDiffusion3Pipeline":
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                prompts,
                prompts,
                prompts,
                device=device,
                do_classifier_free_guidance=self.uses_cfg,
                negative_prompt=[negative_prompt] * len(prompts),
                negative_prompt_2=[negative_prompt] * len(prompts),
                negative_prompt_3=[negative_prompt] * len(prompts),
                max_sequence_length=self.max_sequence_length,
            )
            if self.uses_cfg:
                embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        elif self.family == "WanPipeline":
            embeds, negative = pipe.encode_prompt(
                prompts,
                negative_prompt=[negative_prompt] * len(prompts),
                do_classifier_free_guidance=self.uses_cfg,
                max_sequence_length=self.max_sequence_length,
                device=device,
            )
            if self.uses_cfg:
                embeds = torch.cat([negative, embeds])
            pooled = embeds[:, 0]  # unused by Wan
        elif self.family == "HunyuanVideoPipeline":  # guidance is an embedding, as in Flux-dev
            embeds, pooled, mask = pipe.encode_prompt(
                prompts, prompts, device=device, max_sequence_length=self.max_sequence_length
            )
            return _Conditioning(embeds, pooled, list(prompts), mask, self.guidance_scale, False)
        else:
            embeds, pooled, _ = pipe.encode_prompt(
                prompts, prompts, device=device, max_sequence_length=self.max_sequence_length
            )
            if self.uses_cfg:
                negatives = [negative_prompt] * len(prompts)
                negative, negative_pooled, _ = pipe.encode_prompt(
                    negatives, negatives, device=device, max_sequence_length=self.max_sequence_length
                )
                embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        return _Conditioning(embeds, pooled, list(prompts), None, self.guidance_scale, self.uses_cfg)

    def text_token_positions(self, prompt: str, words: list[str]) -> list[int]:
        """Positions, in the transformer's text sequence, of the tokens that spell ``words`` in ``prompt``.

        SD3: CLIP tokens at their index, T5 tokens at ``77 + index``; Flux: T5 tokens.
        """
        pipe = self.pipe
        if self.family == "StableDiffusion3Pipeline":
            tokenizers = [(pipe.tokenizer, 0, 77), (pipe.tokenizer_3, 77, self.max_sequence_length)]
        elif self.family in _VIDEO:  # Hunyuan: the word positions of the LLaMA prompt after its template
            tokenizers = [(pipe.tokenizer, 0, self.max_sequence_length)]
        else:
            tokenizers = [(pipe.tokenizer_2, 0, self.max_sequence_length)]
        return token_positions(prompt, words, tokenizers)

    # --- images ----------------------------------------------------------------------------------
    def noise(self, seed: int = 0, batch: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial noise in the transformer's latent layout (packed for Flux, (B, C, F, H, W) for Wan), drawn
        on the CPU from ``generator`` (default: a fresh one seeded with ``seed``), so it is device-independent."""
        pipe = self.pipe
        generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        if self.family in _VIDEO:
            frames, rows, cols = self.grid
            latents = torch.randn(
                batch, pipe.transformer.config.in_channels, frames, rows * 2, cols * 2, generator=generator
            )
            return latents.to(self.device, self.dtype)
        channels = pipe.transformer.config.in_channels // (4 if self.family == "FluxPipeline" else 1)
        h, w = self.height // pipe.vae_scale_factor, self.width // pipe.vae_scale_factor
        latents = torch.randn(batch, channels, h, w, generator=generator).to(self.device, self.dtype)
        return self._pack(latents)

    @torch.no_grad()
    def encode_image(self, image: Any) -> torch.Tensor:
        """A PIL image / (H, W, 3) uint8 array -> clean latents (1, ...), resized to the model's size.

        Wan: a video, (T, H, W, 3) uint8 with ``num_frames`` frames.
        """
        pipe = self.pipe
        if self.family in _VIDEO:
            return self._encode_video(image)
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        pixels = pipe.image_processor.preprocess(image, height=self.height, width=self.width)
        pixels = pixels.to(self.device, pipe.vae.dtype)
        latents = pipe.vae.encode(pixels).latent_dist.mean
        config = pipe.vae.config
        latents = (latents - (config.shift_factor or 0.0)) * config.scaling_factor
        return self._pack(latents.to(self.dtype))

    def _encode_video(self, frames: Any) -> torch.Tensor:
        pipe = self.pipe
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[0] != self.num_frames or frames.shape[-1] != 3:
            raise ValueError(
                f"`image` must be a video of {self.num_frames} frames, (T, H, W, 3) uint8; got {frames.shape}"
            )
        video = pipe.video_processor.preprocess_video(
            [Image.fromarray(f) for f in frames], height=self.height, width=self.width
        ).to(self.device, pipe.vae.dtype)
        latents = pipe.vae.encode(video).latent_dist.mean
        if self.family == "HunyuanVideoPipeline":
            return (latents * pipe.vae.config.scaling_factor).to(self.dtype)
        mean, std = self._wan_stats(latents)
        return ((latents - mean) / std).to(self.dtype)

    def _wan_stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        return mean, std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1], float32; Wan: videos (B, F, 3, H, W)."""
        pipe = self.pipe
        if self.family in _VIDEO:
            if self.family == "HunyuanVideoPipeline":
                latents = latents / pipe.vae.config.scaling_factor
            else:
                mean, std = self._wan_stats(latents)
                latents = latents * std + mean
            video = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
            return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
        latents = self._unpack(latents)
        config = pipe.vae.config
        latents = latents / config.scaling_factor + (config.shift_factor or 0.0)
        images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def resized(self, height: int | None = None, width: int | None = None) -> "FlowModel":
        """This model at another image size (the same pipeline; nothing is copied), or itself."""
        if (height or self.height) == self.height and (width or self.width) == self.width:
            return self
        return FlowModel(
            self.pipe, height or self.height, width or self.width, self.max_sequence_length, self.num_frames
        )

    def latent_keep(self, preserve: torch.Tensor) -> torch.Tensor:
        """Per-token preserve flags ``(tokens,)`` in the latent layout, to blend latents with: packed tokens
        for Flux, patch pixels for SD3, ``(1, 1, F, H, W)`` patch pixels for the video families."""
        if self.family == "FluxPipeline":
            return preserve[None, :, None]
        if self.family in _VIDEO:
            return video_latent_keep(preserve, self.grid, self.family)
        patch = self.pipe.transformer.config.patch_size
        grid = preserve.view(*self.grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        return grid[None, None]

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        if self.family != "FluxPipeline":
            return latents
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        if self.family != "FluxPipeline":
            return latents
        return self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)

    # --- the velocity ----------------------------------------------------------------------------
    @torch.no_grad()
    def velocity(self, latents: torch.Tensor, sigma: float, cond: _Conditioning) -> torch.Tensor:
        """``dx/dsigma`` at noise level ``sigma`` for a batch of latents, one per prompt of ``cond``."""
        pipe = self.pipe
        batch = latents.shape[0]
        if batch != len(cond.prompts):
            raise ValueError(f"{batch} latents for {len(cond.prompts)} prompts")
        if self.family in ("StableDiffusion3Pipeline", "WanPipeline"):
            x = torch.cat([latents, latents]) if cond.cfg else latents
            timestep = torch.full((x.shape[0],), sigma * 1000.0, device=self.device, dtype=self.dtype)
            extra = {"pooled_projections": cond.pooled} if self.family == "StableDiffusion3Pipeline" else {}
            out = pipe.transformer(
                hidden_states=x, timestep=timestep, encoder_hidden_states=cond.embeds, return_dict=False, **extra
            )[0]
            if cond.cfg:
                uncond, conditional = out.chunk(2)
                out = uncond + cond.guidance_scale * (conditional - uncond)
            return out
        if self.family == "HunyuanVideoPipeline":
            timestep = torch.full((batch,), sigma * 1000.0, device=self.device, dtype=self.dtype)
            guidance = torch.full((batch,), cond.guidance_scale * 1000.0, device=self.device, dtype=self.dtype)
            return pipe.transformer(
                hidden_states=latents,
                timestep=timestep,
                encoder_hidden_states=cond.embeds,
                encoder_attention_mask=cond.mask,
                pooled_projections=cond.pooled,
                guidance=guidance,
                return_dict=False,
            )[0]
        h, w = self.height // pipe.vae_scale_factor, self.width // pipe.vae_scale_factor
        x = torch.cat([latents, latents]) if cond.cfg else latents
        image_ids = pipe._prepare_latent_image_ids(x.shape[0], h // 2, w // 2, self.device, self.dtype)
        text_ids = torch.zeros(cond.embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), cond.guidance_scale, device=self.device, dtype=torch.float32)
        timestep = torch.full((x.shape[0],), sigma, device=self.device, dtype=self.dtype)
        out = pipe.transformer(
            hidden_states=x,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        if cond.cfg:  # FluxPipeline's true CFG: the unconditional rows first
            uncond, conditional = out.chunk(2)
            out = uncond + cond.guidance_scale * (conditional - uncond)
        return out

    def sigmas(self, steps: int) -> torch.Tensor:
        """``steps + 1`` noise levels from 1 down to 0: the pipeline's own scheduler's, for this image size
        (:func:`hasten.adapters.pipeline_sigmas`)."""
        return pipeline_sigmas(self.pipe, steps, self.tokens)
