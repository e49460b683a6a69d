"""Cross-frame self-attention for translating a video frame by frame with an image UNet.

Every self-attention layer (``attn1``) of the UNet records its input for the frame being
generated, per denoising step. From the second frame on, the layer's keys and values come from
the FIRST frame and the PREVIOUS frame at the same layer and step (queries stay the current
frame's), so appearance is shared across frames (Text2Video-Zero uses the first frame,
rerender-a-video the first and the previous). The layers' own attention processor does the
attention: this one only swaps in the other frames' hidden states.

Reversible: :func:`apply_cross_frame` returns the :class:`CrossFrameState` the pipeline drives
(``begin_frame`` / ``step`` / ``end_frame``); :func:`remove_cross_frame` restores the original
processors exactly.

On its own, through the front door: ``hasten.apply(pipe, CrossFrameConfig())`` on a pipeline with
a UNet (Stable Diffusion 1.5 text-to-image, img2img, ControlNet, ...) makes each later call of the
pipeline the next frame of one video: the first call's self-attention states are every frame's
anchor, each call also attends the call before it. A forward pre-hook on the UNet
(:class:`FrameClock`) drives the state from the timesteps the UNet receives, so any scheduler
works. :class:`~hasten.pipelines.LatentWarpPipeline` drives the same state itself (and warps
latents as well).

Example::

    with hasten.apply(pipe, CrossFrameConfig()):
        frames = [pipe(prompt, image=frame, generator=torch.Generator().manual_seed(0)).images[0]
                  for frame in video]           # img2img, one call per frame
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .feature_cache import FeatureCache, FeatureCacheConfig

__all__ = [
    "CrossFrameAttnProcessor",
    "CrossFrameConfig",
    "CrossFrameState",
    "FrameClock",
    "apply_cross_frame",
    "remove_cross_frame",
]


@dataclass(frozen=True)
class CrossFrameConfig:
    """Cross-frame attention as a method of its own: ``hasten.apply(pipe_or_unet, CrossFrameConfig())``.

    Each pipeline call after applying is the next frame (the first call is frame 0, the anchor).
    Remove and apply again to start a new video.

    Parameters
    ----------
    cache : FeatureCacheConfig, optional
        How the first, previous and current frames' states are held (default float32 in memory:
        exact; bf16, int8 or a disk spill to bound memory).

    Examples
    --------
    >>> import hasten, hasten.tiny
    >>> pipe = hasten.tiny.pipeline("sd15")
    >>> with hasten.apply(pipe, CrossFrameConfig()) as handle:
    ...     type(handle.module).__name__
    'UNet2DConditionModel'
    """

    cache: FeatureCacheConfig | None = None


class CrossFrameState:
    """Per (layer, step) hidden states of the first, previous and current frames, each frame's in a
    bounded :class:`~hasten.hooks.feature_cache.FeatureCache` (float32 by default, so
    the translation is exact; bf16 / int8 / a disk spill through ``cache``). At most three frames'
    states are held at any time."""

    def __init__(self, enabled: bool = True, cache: FeatureCacheConfig | None = None):
        self.enabled = enabled
        self.config = cache or FeatureCacheConfig(dtype="float32")
        self.step = 0
        self.frame = 0
        self.first = FeatureCache(self.config)
        self.previous: FeatureCache | None = None
        self.current = FeatureCache(self.config)

    def begin_frame(self, index: int) -> None:
        self.frame, self.step = index, 0
        self.current.clear()

    def end_frame(self) -> None:
        if self.frame == 0:
            self.first, self.current = self.current, self.first  # frame 0's states stay as the first frame's
        elif self.previous is not None:  # the frame before this one: no longer needed
            self.previous, self.current = self.current, self.previous
        else:
            self.previous, self.current = self.current, FeatureCache(self.config)
        self.current.clear()

    def reset(self) -> None:
        for store in (self.first, self.previous, self.current):
            if store is not None:
                store.close()
        self.first, self.previous, self.current = FeatureCache(self.config), None, FeatureCache(self.config)
        self.frame = self.step = 0

    def context(self, name: str, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Record this frame's input; return the other frames' (first, previous) to attend, if any."""
        key = (name, self.step)
        self.current.put(key, hidden_states.detach())
        if not self.enabled or self.frame == 0 or key not in self.first:
            return None
        first = self.first.get(key, device=hidden_states.device)[0].to(hidden_states.dtype)
        if self.frame == 1 or self.previous is None or key not in self.previous:  # the previous frame is the first
            return first
        previous = self.previous.get(key, device=hidden_states.device)[0].to(hidden_states.dtype)
        return torch.cat([first, previous], dim=1)

    @property
    def nbytes(self) -> int:
        return sum(store.nbytes for store in (self.first, self.previous, self.current) if store is not None)


class CrossFrameAttnProcessor:
    """Wraps a self-attention layer's processor: keys and values from the first and previous frames."""

    def __init__(self, name: str, state: CrossFrameState, inner: Any):
        self.name, self.state, self.inner = name, state, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is None:  # self-attention only; cross-attention layers pass text here
            encoder_hidden_states = self.state.context(self.name, hidden_states)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


class FrameClock:
    """UNet forward pre-hook that drives a :class:`CrossFrameState` from the timesteps it receives.

    Every UNet call is the next step of the current frame; a new frame (the next pipeline call)
    starts when the timestep rises, or returns to the current frame's first timestep (a
    one-step schedule). Schedulers that evaluate a timestep twice (Heun, PNDM) repeat inner
    timesteps, never the first, so their calls stay in one frame.
    """

    def __init__(self, state: CrossFrameState):
        self.state = state
        self.calls = 0  # UNet calls in the current frame
        self.first: float | None = None  # the current frame's first timestep
        self.last: float | None = None

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        value = float(torch.as_tensor(timestep).flatten()[0])
        if self.first is None:
            self.state.begin_frame(0)
            self.first = value
        elif value > self.last or value == self.first:
            self.state.end_frame()
            self.state.begin_frame(self.state.frame + 1)
            self.first, self.calls = value, 0
        self.state.step = self.calls
        self.calls += 1
        self.last = value


def cross_frame_unet(pipe_or_unet: Any) -> torch.nn.Module:
    """The UNet cross-frame attention changes: a pipeline's ``unet``, or the UNet itself."""
    unet = pipe_or_unet if isinstance(pipe_or_unet, torch.nn.Module) else getattr(pipe_or_unet, "unet", None)
    if unet is None or not hasattr(unet, "set_attn_processor"):
        raise ValueError(
            f"cross-frame attention needs a diffusers UNet (a pipeline with `unet`); got {type(pipe_or_unet).__name__}"
        )
    return unet


def _check_self_attention(unet: torch.nn.Module) -> None:
    if not any(name.endswith("attn1.processor") for name in unet.attn_processors):
        raise ValueError(f"{type(unet).__name__} has no self-attention (attn1) layer for cross-frame attention")


def apply_cross_frame(
    unet: torch.nn.Module, enabled: bool = True, cache: FeatureCacheConfig | None = None, clock: bool = False
) -> CrossFrameState:
    """Install cross-frame processors on every ``attn1`` of ``unet``; returns their shared state.

    ``clock=True`` also registers a :class:`FrameClock` that drives the state from the UNet's
    timesteps (each pipeline call a frame); otherwise the caller drives it.
    """
    if getattr(unet, "_hasten_cross_frame", None) is not None:
        raise ValueError("cross-frame attention is already applied to this UNet; remove_cross_frame() first")
    _check_self_attention(unet)
    original = dict(unet.attn_processors)
    state = CrossFrameState(enabled, cache)
    processors = {
        name: (CrossFrameAttnProcessor(name, state, processor) if name.endswith("attn1.processor") else processor)
        for name, processor in original.items()
    }
    unet.set_attn_processor(processors)
    hook = unet.register_forward_pre_hook(FrameClock(state), with_kwargs=True) if clock else None
    unet._hasten_cross_frame = (state, original, hook)
    return state


def remove_cross_frame(unet: torch.nn.Module) -> None:
    """Restore the processors :func:`apply_cross_frame` replaced (and remove its clock)."""
    installed = unet.__dict__.pop("_hasten_cross_frame", None)
    if installed is None:
        return
    state, original, hook = installed
    unet.set_attn_processor(original)
    if hook is not None:
        hook.remove()
    state.reset()


# --- the front door's row for cross-frame attention (hasten.methods.METHODS) ---------------------------
def prepare_cross_frame(unet: torch.nn.Module, config: CrossFrameConfig) -> CrossFrameConfig:
    _check_self_attention(unet)
    return config


def attach_cross_frame(unet: torch.nn.Module, config: CrossFrameConfig) -> None:
    apply_cross_frame(unet, cache=config.cache, clock=True)


def detach_cross_frame(unet: torch.nn.Module, config: CrossFrameConfig) -> None:
    remove_cross_frame(unet)


def cross_frame_state(pipe_or_unet: Any) -> CrossFrameState | None:
    """The live :class:`CrossFrameState` of a UNet with cross-frame attention on (frame, step, bytes held)."""
    installed = getattr(cross_frame_unet(pipe_or_unet), "_hasten_cross_frame", None)
    return installed[0] if installed is not None else None
