"""LatentWarp on the tiny SD 1.5: coherence against per-frame translation, exact invariants, errors."""

from __future__ import annotations

import numpy as np
import pytest

import hasten.tiny
from hasten.pipelines import LatentWarpPipeline
from hasten.tiny.motion import panned


@pytest.fixture(scope="module")
def warp_pipe():
    return LatentWarpPipeline.from_pipe(hasten.tiny.pipeline("sd15"))


def test_latentwarp_is_more_coherent_than_per_frame_translation(warp_pipe):
    frames, true_flows = panned(frames=5, size=(64, 96), step=(3, 0))
    kwargs = dict(prompt="a watercolor painting", num_inference_steps=8, progress=False)
    warped = warp_pipe(video=frames, **kwargs)
    independent = warp_pipe(video=frames, warp=False, cross_frame=False, **kwargs)
    assert warped.frames.shape == independent.frames.shape == (5, 64, 96, 3)
    assert warped.warp_error < 0.9 * independent.warp_error
    from hasten.video import warp_error

    assert warp_error(warped.frames, true_flows) < warp_error(independent.frames, true_flows)  # the true motion too
    assert set(warped.seconds) == {"flow", "warp", "denoise"} and warped.seconds["warp"] > 0


def test_frames_are_independent_without_warp_or_cross_frame(warp_pipe):
    frames, _ = panned(frames=3, size=(40, 56))
    kwargs = dict(prompt="a sketch", num_inference_steps=4, progress=False, warp=False, cross_frame=False)
    together = warp_pipe(video=frames, **kwargs).frames
    alone = warp_pipe(video=frames[2:], **kwargs).frames
    assert np.array_equal(together[2], alone[0])


def test_a_still_video_translates_to_still_frames(warp_pipe):
    frames, _ = panned(frames=1, size=(40, 56))
    out = warp_pipe(video=np.repeat(frames, 3, axis=0), prompt="oil paint", num_inference_steps=4, progress=False)
    assert int(np.abs(out.frames.astype(int) - out.frames[:1]).max()) <= 1


def test_from_pipe_keeps_the_callers_scheduler_and_removes_its_processors():
    pipe = hasten.tiny.pipeline("sd15")
    processors = dict(pipe.unet.attn_processors)
    warp = LatentWarpPipeline.from_pipe(pipe)
    assert type(warp.pipe.scheduler).__name__ == "DDIMScheduler"
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    frames, _ = panned(frames=2, size=(40, 56))
    warp(video=frames, prompt="x", num_inference_steps=2, progress=False)
    assert dict(pipe.unet.attn_processors).keys() == processors.keys()
    assert all(type(a) is type(b) for a, b in zip(pipe.unet.attn_processors.values(), processors.values()))


def test_controlnet_on_canny_edges_runs():
    from diffusers import ControlNetModel

    pipe = hasten.tiny.pipeline("sd15")
    controlnet = ControlNetModel.from_unet(pipe.unet)
    frames, _ = panned(frames=2, size=(40, 56))
    out = LatentWarpPipeline.from_pipe(pipe, controlnet=controlnet)(
        video=frames, prompt="x", num_inference_steps=2, progress=False)
    assert out.frames.shape == (2, 40, 56, 3)


@pytest.mark.parametrize("kwargs, name", [(dict(strength=0.0), "strength"), (dict(warp_end=1.5), "warp_end"),
                                          (dict(num_inference_steps=0), "num_inference_steps"),
                                          (dict(height=36), "height"), (dict(video=[]), "video")])
def test_bad_arguments_name_themselves(warp_pipe, kwargs, name):
    frames, _ = panned(frames=2, size=(40, 56))
    call = dict(video=frames, prompt="x", num_inference_steps=2, progress=False)
    call.update(kwargs)
    with pytest.raises(ValueError, match=name):
        warp_pipe(**call)
    with pytest.raises(ValueError, match="scheduler"):
        LatentWarpPipeline.from_pipe(hasten.tiny.pipeline("sd15"), scheduler="euler")
