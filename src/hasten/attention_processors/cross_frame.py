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
"""

from __future__ import annotations

from typing import Any

import torch

from .feature_cache import FeatureCache, FeatureCacheConfig

__all__ = ["CrossFrameAttnProcessor", "CrossFrameState", "apply_cross_frame", "remove_cross_frame"]


class CrossFrameState:
    """Per (layer, step) hidden states of the first, previous and current frames, each frame's in a
    bounded :class:`~hasten.attention_processors.feature_cache.FeatureCache` (float32 by default, so
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


def apply_cross_frame(unet: torch.nn.Module, enabled: bool = True,
                      cache: FeatureCacheConfig | None = None) -> CrossFrameState:
    """Install cross-frame processors on every ``attn1`` of ``unet``; returns their shared state."""
    if getattr(unet, "_hasten_cross_frame", None) is not None:
        raise ValueError("cross-frame attention is already applied to this UNet; remove_cross_frame() first")
    original = dict(unet.attn_processors)
    state = CrossFrameState(enabled, cache)
    processors = {name: (CrossFrameAttnProcessor(name, state, processor) if name.endswith("attn1.processor")
                         else processor) for name, processor in original.items()}
    if not any(isinstance(p, CrossFrameAttnProcessor) for p in processors.values()):
        raise ValueError(f"{type(unet).__name__} has no self-attention (attn1) layer for cross-frame attention")
    unet.set_attn_processor(processors)
    unet._hasten_cross_frame = (state, original)
    return state


def remove_cross_frame(unet: torch.nn.Module) -> None:
    """Restore the processors :func:`apply_cross_frame` replaced."""
    installed = getattr(unet, "_hasten_cross_frame", None)
    if installed is None:
        return
    unet.set_attn_processor(installed[1])
    unet._hasten_cross_frame = None
