"""LatentWarp: temporally coherent video-to-video translation with an image diffusion model.

Each frame is translated with Stable Diffusion img2img (optionally with a ControlNet on the
frame's Canny edges), from the SAME initial noise. Two things tie the frames together:

- **Latent warping** (LatentWarp): during the first ``warp_end`` of the denoising schedule, the
  previous frame's latent at the same step is warped onto the current frame along the SOURCE
  video's optical flow (OpenCV DIS, resized to the latent grid) and replaces the current latent
  wherever the occlusion mask trusts it. The paper's choice, followed here: the noisy latent at
  the same timestep, not the predicted ``x0`` (which rerender-a-video warps), because it
  constrains the queries of every later attention layer at that step directly.
- **Cross-frame attention** (:mod:`hasten.hooks.cross_frame`): self-attention
  keys and values come from the first and the previous frame.

The paper's rules are the defaults (Bao et al., arXiv 2311.00353):

- **Warp schedule** (Sec. 5.1): 20 DDIM steps, latents warped in the first 16 (``warp_end =
  0.8``). The window is counted on the full ``num_inference_steps`` schedule, so it covers the
  same timesteps (noise levels) whatever the img2img ``strength``: 20 steps at strength 1.0 warp
  16 of 20, at strength 0.75 (the run starts at step 6 of 20) 11 of 15.
  ``warp_window="run"`` counts ``warp_end`` on the steps actually run instead (hasten's former
  rule, with its former ``warp_end = 0.3``, rerender-a-video's shape-aware-fusion window: 4 of
  15 steps at strength 0.75).
- **Occlusion mask** (Sec. 4.2, Eq. 6): a pixel is occluded where the previous SOURCE frame,
  warped onto the current one, differs from it by more than ``occlusion_threshold``
  (:func:`hasten.video.flow.warped_difference_mask`). ``occlusion="forward-backward"`` uses
  forward-backward flow consistency instead (hasten's former rule, rerender-a-video's; it costs a
  second optical flow per frame pair).

The default scheduler is DDIM (deterministic, as the paper and the video-editing literature
use); ``scheduler="keep"`` keeps the pipeline's own.

Usage::

    from diffusers import StableDiffusionPipeline
    from hasten.pipelines import LatentWarpPipeline
    pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    warp = LatentWarpPipeline.from_pipe(pipe.to("cuda"))
    out = warp(video=frames, prompt="a watercolor painting", strength=0.75)
    out.frames          # (T, H, W, 3) uint8
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .._validation import check_int, check_number, check_positive_int
from ..hooks.cross_frame import apply_cross_frame, remove_cross_frame
from ..video.flow import (
    backward_warp,
    flow_pair,
    occlusion_mask,
    optical_flow,
    resize_flow,
    warp_error,
    warped_difference_mask,
)

__all__ = ["OCCLUSION_RULES", "WARP_WINDOWS", "LatentWarpOutput", "LatentWarpPipeline", "canny_map", "warped_steps"]

OCCLUSION_RULES = ("warped-difference", "forward-backward")
WARP_WINDOWS = ("schedule", "run")


def warped_steps(
    num_inference_steps: int, strength: float, warp_end: float = 0.8, warp_window: str = "schedule"
) -> int:
    """How many of the denoising steps run for a frame get the warped latent.

    The img2img run skips the first ``num_inference_steps - int(num_inference_steps * strength)``
    steps of the schedule. ``warp_window="schedule"`` (LatentWarp, Sec. 5.1: the first 16 of 20
    steps): the steps of the full schedule before ``round(warp_end * num_inference_steps)`` that
    the run reaches. ``"run"``: ``round(warp_end * steps run)`` (hasten's former rule).

    Examples
    --------
    >>> warped_steps(20, 1.0), warped_steps(20, 0.75), warped_steps(20, 0.75, 0.3, "run")
    (16, 11, 4)
    """
    if warp_window not in WARP_WINDOWS:
        raise ValueError(f"`warp_window` must be one of {WARP_WINDOWS}, got {warp_window!r}")
    begin = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
    run = num_inference_steps - begin
    if warp_window == "run":
        return int(round(warp_end * run))
    return max(0, min(int(round(warp_end * num_inference_steps)) - begin, run))


@dataclass
class LatentWarpOutput:
    """Translated frames and what ties them together.

    Attributes
    ----------
    frames : ndarray (T, H, W, 3) uint8
    flows : list of ndarray (H, W, 2)
        Per frame ``t >= 1``, the source video's flow from frame ``t`` to ``t - 1``.
    occlusions : list of ndarray (H, W) bool
        Where that flow is not trusted (by the ``occlusion`` rule used).
    seconds : dict
        Wall time of ``flow`` (optical flow + occlusion), ``warp`` (latent warping) and
        ``denoise`` (everything else).
    warp_error : float
        Occlusion-masked warp error of the output along the source flow (0-1 scale).
    warped_steps : int
        Denoising steps per frame (after the first) that received the warped latent.
    """

    frames: np.ndarray
    flows: list[np.ndarray] = field(default_factory=list)
    occlusions: list[np.ndarray] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    warp_error: float = 0.0
    warped_steps: int = 0


def canny_map(frame: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """The Canny edges of an RGB uint8 frame as a 3-channel uint8 image (ControlNet's input)."""
    edges = cv2.Canny(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), low, high)
    return np.repeat(edges[..., None], 3, axis=-1)


def _frames_array(video: Any) -> np.ndarray:
    """A list of PIL images / arrays, or a (T, H, W, 3) array -> (T, H, W, 3) uint8."""
    if isinstance(video, np.ndarray) and video.ndim == 4:
        frames = video
    else:
        frames = (
            np.stack([np.asarray(frame.convert("RGB") if hasattr(frame, "convert") else frame) for frame in video])
            if len(video)
            else np.zeros((0,))
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(
            "`video` must be a non-empty list of RGB frames (PIL images or (H, W, 3) uint8 arrays) "
            f"or a (T, H, W, 3) uint8 array; got shape {getattr(frames, 'shape', None)}"
        )
    return frames


class LatentWarpPipeline:
    """Video-to-video translation on Stable Diffusion 1.5 components (see the module docstring).

    Build with :meth:`from_pipe` from a loaded ``StableDiffusionPipeline`` (shares its modules).

    Examples
    --------
    >>> import hasten.tiny
    >>> from hasten.tiny.motion import panned
    >>> pipe = LatentWarpPipeline.from_pipe(hasten.tiny.pipeline("sd15"))
    >>> frames, _ = panned(frames=3, size=(40, 56))
    >>> out = pipe(video=frames, prompt="a painting", num_inference_steps=4, progress=False)
    >>> out.frames.shape
    (3, 40, 56, 3)
    """

    def __init__(self, pipe: Any, controlnet: Any | None = None):
        self.pipe = pipe
        self.controlnet = controlnet

    @classmethod
    def from_pipe(cls, pipe: Any, controlnet: Any | None = None, scheduler: str = "ddim") -> "LatentWarpPipeline":
        """Wrap a ``StableDiffusionPipeline`` (any SD 1.x/2.x checkpoint), optionally with a ``ControlNetModel``.

        ``scheduler="ddim"`` (default) swaps in a DDIM scheduler from the pipeline's config;
        ``"keep"`` keeps the pipeline's own.
        """
        from diffusers import DDIMScheduler

        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if getattr(pipe, name, None) is None:
                raise ValueError(
                    f"LatentWarpPipeline needs a Stable Diffusion pipeline with a `{name}`; got {type(pipe).__name__}"
                )
        if not hasattr(pipe.unet, "attn_processors") or getattr(pipe.unet.config, "in_channels", 4) != 4:
            raise ValueError(f"LatentWarpPipeline needs a 4-channel text-to-image UNet; got {type(pipe.unet).__name__}")
        if scheduler not in ("ddim", "keep"):
            raise ValueError(f"`scheduler` must be 'ddim' or 'keep', got {scheduler!r}")
        if scheduler == "ddim":
            import copy

            pipe = copy.copy(pipe)  # the caller's pipeline keeps its scheduler
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        return cls(pipe, controlnet)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @torch.no_grad()
    def __call__(
        self,
        video: Sequence[Any] | np.ndarray,
        prompt: str,
        negative_prompt: str = "",
        strength: float = 0.75,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        warp: bool = True,
        warp_end: float = 0.8,
        warp_window: str = "schedule",
        cross_frame: bool = True,
        flow_preset: str = "medium",
        occlusion: str = "warped-difference",
        occlusion_threshold: float = 0.05,
        occlusion_alpha: float = 0.01,
        occlusion_beta: float = 0.5,
        controlnet_conditioning_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        seed: int = 0,
        progress: bool = True,
        frame_callback: Callable[[int, int], None] | None = None,
        generator: torch.Generator | None = None,
    ) -> LatentWarpOutput:
        """Translate ``video`` with ``prompt``.

        Parameters
        ----------
        video : list of PIL images / (H, W, 3) uint8 arrays, or a (T, H, W, 3) uint8 array
        prompt, negative_prompt : str
        strength : float, default 0.75
            img2img strength in (0, 1]: how far each frame is noised before denoising.
        num_inference_steps : int, default 20
        guidance_scale : float, default 7.5
        warp : bool, default True
            Latent warping (off: cross-frame attention alone, or plain per-frame translation).
        warp_end : float, default 0.8
            Fraction of the denoising schedule (from its first step) during which latents are
            warped. LatentWarp (Sec. 5.1): the first 16 of 20 steps.
        warp_window : {"schedule", "run"}, default "schedule"
            What ``warp_end`` is a fraction of: the full ``num_inference_steps`` schedule (the
            paper's: the same timesteps at any ``strength``; see :func:`warped_steps`) or the
            steps the img2img run takes (hasten's former rule).
        cross_frame : bool, default True
            First + previous frame keys/values in self-attention.
        flow_preset : {"ultrafast", "fast", "medium"}, default "medium"
            OpenCV DIS preset.
        occlusion : {"warped-difference", "forward-backward"}, default "warped-difference"
            Where the warped latent is not used. LatentWarp (Eq. 6): where the previous source
            frame warped onto the current one differs from it by more than
            ``occlusion_threshold`` (:func:`hasten.video.flow.warped_difference_mask`).
            ``"forward-backward"``: where the forward and backward flows disagree
            (:func:`hasten.video.occlusion_mask`, rerender-a-video's rule; hasten's former
            default; one more optical flow per frame pair). Both also mask pixels whose source
            leaves the frame.
        occlusion_threshold : float, default 0.05
            The warped-difference rule's threshold, mean absolute RGB difference on a 0-1 scale
            (the paper gives no value; see :func:`hasten.video.flow.warped_difference_mask`).
        occlusion_alpha, occlusion_beta : float, default 0.01, 0.5
            Forward-backward consistency constants (``occlusion="forward-backward"`` only).
        controlnet_conditioning_scale : float, default 1.0
            With a ControlNet: the weight of its residuals (its input: each frame's Canny edges).
        height, width : int, optional
            Working size, multiples of 8; default: the video's, rounded down to multiples of 8.
        seed : int, default 0
            Seeds the one initial noise every frame shares (drawn on the CPU, so a seed gives the
            same video on every device).
        progress : bool, default True
            A progress bar over frames.
        frame_callback : callable, optional
            Called as ``frame_callback(done, total)`` after each frame.
        generator : torch.Generator, optional
            Draws that noise instead of ``seed`` (diffusers' convention; a CPU generator seeded
            with ``s`` gives the same video as ``seed=s``).
        """
        frames = _frames_array(video)
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"`strength` must be in (0, 1], got {strength!r}")
        if not 0.0 <= warp_end <= 1.0:
            raise ValueError(f"`warp_end` must be in [0, 1], got {warp_end!r}")
        if warp_window not in WARP_WINDOWS:
            raise ValueError(f"`warp_window` must be one of {WARP_WINDOWS}, got {warp_window!r}")
        if occlusion not in OCCLUSION_RULES:
            raise ValueError(f"`occlusion` must be one of {OCCLUSION_RULES}, got {occlusion!r}")
        check_number(occlusion_threshold, "occlusion_threshold", 0)
        check_positive_int(num_inference_steps, "num_inference_steps")
        height = height or frames.shape[1] // 8 * 8
        width = width or frames.shape[2] // 8 * 8
        if height % 8 or width % 8 or height < 8 or width < 8:
            raise ValueError(f"`height` and `width` must be positive multiples of 8, got {height} x {width}")
        if frames.shape[1:3] != (height, width):
            frames = np.stack([cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA) for frame in frames])

        pipe, device = self.pipe, self.device
        seconds = {"flow": 0.0, "warp": 0.0, "denoise": 0.0}
        start = time.perf_counter()
        flows, occlusions = [], []
        for index in range(1, len(frames)):
            if occlusion == "forward-backward":
                to_previous, to_current = flow_pair(frames[index - 1], frames[index], flow_preset)
                occluded = occlusion_mask(to_previous, to_current, occlusion_alpha, occlusion_beta)
            else:
                to_previous = optical_flow(frames[index], frames[index - 1], flow_preset)
                occluded = warped_difference_mask(frames[index - 1], frames[index], to_previous, occlusion_threshold)
            flows.append(to_previous)
            occlusions.append(occluded)
        seconds["flow"] = time.perf_counter() - start

        guided = guidance_scale > 1.0
        prompt_embeds, negative_embeds = pipe.encode_prompt(prompt, device, 1, guided, negative_prompt)
        embeds = torch.cat([negative_embeds, prompt_embeds]) if guided else prompt_embeds
        latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        if generator is None:
            generator = torch.Generator().manual_seed(check_int(seed, "seed", 0))
        elif not isinstance(generator, torch.Generator):
            raise ValueError(f"`generator` must be a torch.Generator, got {type(generator).__name__}")
        noise = randn_tensor((1, pipe.unet.config.in_channels, *latent_size), generator=generator, device=device)
        noise = noise.to(embeds.dtype)
        scaling = pipe.vae.config.scaling_factor
        state = apply_cross_frame(pipe.unet, enabled=cross_frame)
        previous_steps: list[torch.Tensor] = []
        outputs = []
        try:
            bar = tqdm(range(len(frames)), desc="frames", unit="frame", disable=not progress)
            for index in bar:
                state.begin_frame(index)
                # uint8 frames as floats in [0, 1]: the image processor maps those to the VAE's [-1, 1]
                # (it would map raw 0-255 values to -1..509)
                frame = frames[index].astype(np.float32) / 255.0
                image = pipe.image_processor.preprocess(frame).to(device, pipe.vae.dtype)
                source = pipe.vae.encode(image).latent_dist.mean * scaling
                timesteps = self._timesteps(num_inference_steps, strength)
                latents = pipe.scheduler.add_noise(source.to(noise.dtype), noise, timesteps[:1])
                control = self._control(frames[index], guided) if self.controlnet is not None else None
                order = getattr(pipe.scheduler, "order", 1)  # timesteps per step (2 for Heun-like schedulers)
                warp_steps = (
                    order * warped_steps(num_inference_steps, strength, warp_end, warp_window)
                    if warp and index > 0
                    else 0
                )
                if warp_steps:
                    keep, flow = self._latent_flow(flows[index - 1], occlusions[index - 1], latent_size, device)
                current_steps = []
                for step, t in enumerate(timesteps):
                    if step < warp_steps:
                        tic = time.perf_counter()
                        warped = backward_warp(previous_steps[step], flow)
                        latents = torch.where(keep, warped, latents)
                        seconds["warp"] += time.perf_counter() - tic
                    current_steps.append(latents)
                    state.step = step
                    latents = self._denoise(
                        latents, t, embeds, guided, guidance_scale, control, controlnet_conditioning_scale
                    )
                previous_steps = current_steps
                state.end_frame()
                decoded = pipe.vae.decode(latents.to(pipe.vae.dtype) / scaling).sample
                outputs.append(pipe.image_processor.postprocess(decoded, output_type="np")[0])
                if frame_callback is not None:
                    frame_callback(index + 1, len(frames))
        finally:
            remove_cross_frame(pipe.unet)
        seconds["denoise"] = time.perf_counter() - start - seconds["flow"] - seconds["warp"]
        out_frames = (np.stack(outputs) * 255).round().clip(0, 255).astype(np.uint8)
        error = warp_error(out_frames, flows, occlusions) if len(out_frames) > 1 else 0.0
        count = warped_steps(num_inference_steps, strength, warp_end, warp_window) if warp and len(frames) > 1 else 0
        return LatentWarpOutput(out_frames, flows, occlusions, seconds, error, count)

    # --- steps ---------------------------------------------------------------------------------------
    def _timesteps(self, steps: int, strength: float) -> torch.Tensor:
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(steps, device=self.device)
        begin = steps - min(int(steps * strength), steps)
        timesteps = scheduler.timesteps[begin * scheduler.order :]
        if len(timesteps) == 0:
            raise ValueError(f"`strength` {strength} leaves no denoising step of {steps}; raise either")
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin * scheduler.order)
        return timesteps

    def _latent_flow(self, flow: np.ndarray, occluded: np.ndarray, size: tuple[int, int], device):
        """The flow on the latent grid and where its warp is kept (not occluded on most of the cell)."""
        latent_flow = resize_flow(flow, size)
        cover = cv2.resize(occluded.astype(np.float32), size[::-1], interpolation=cv2.INTER_AREA)
        keep = torch.from_numpy(cover < 0.5).to(device)[None, None]
        return keep, latent_flow

    def _control(self, frame: np.ndarray, guided: bool) -> torch.Tensor:
        edges = torch.from_numpy(canny_map(frame)).permute(2, 0, 1)[None].float() / 255
        edges = edges.to(self.device, self.controlnet.dtype)
        return torch.cat([edges, edges]) if guided else edges

    def _denoise(self, latents, t, embeds, guided, guidance_scale, control, control_scale):
        pipe = self.pipe
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = pipe.scheduler.scale_model_input(model_input, t)
        extra: dict[str, Any] = {}
        if control is not None:
            down, mid = self.controlnet(
                model_input,
                t,
                encoder_hidden_states=embeds,
                controlnet_cond=control,
                conditioning_scale=control_scale,
                return_dict=False,
            )
            extra = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        noise_pred = pipe.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False, **extra)[0]
        if guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (cond - uncond)
        return pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
