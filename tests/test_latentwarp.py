"""LatentWarp on the tiny SD 1.5: coherence against per-frame translation, exact invariants, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hasten.tiny
from hasten.pipelines import LatentWarpPipeline, latentwarp
from hasten.pipelines.latentwarp import warped_steps
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


def test_a_generator_draws_the_noise_in_place_of_the_seed(warp_pipe):
    frames, _ = panned(frames=2, size=(40, 56))
    kwargs = dict(prompt="a sketch", num_inference_steps=3, progress=False)
    seeded = warp_pipe(video=frames, seed=7, **kwargs).frames
    generated = warp_pipe(video=frames, generator=torch.Generator().manual_seed(7), **kwargs).frames
    other = warp_pipe(video=frames, generator=torch.Generator().manual_seed(8), **kwargs).frames
    assert np.array_equal(seeded, generated) and not np.array_equal(seeded, other)
    with pytest.raises(ValueError, match="generator"):
        warp_pipe(video=frames, generator=7, **kwargs)


def test_a_still_video_translates_to_still_frames(warp_pipe):
    frames, _ = panned(frames=1, size=(40, 56))
    out = warp_pipe(video=np.repeat(frames, 3, axis=0), prompt="oil paint", num_inference_steps=4, progress=False)
    assert int(np.abs(out.frames.astype(int) - out.frames[:1]).max()) <= 1


def test_the_vae_encodes_each_frame_in_its_own_value_range(warp_pipe, monkeypatch):
    """The VAE sees each source frame as SD does, pixels mapped from 0..255 to -1..1 (frame / 127.5 - 1):
    uint8 frames passed as they are to the image processor came out as -1..509 (the source lost)."""
    frames, _ = panned(frames=2, size=(40, 56))
    seen = []
    encode = warp_pipe.pipe.vae.encode
    monkeypatch.setattr(warp_pipe.pipe.vae, "encode", lambda x, *a, **k: seen.append(x.clone()) or encode(x, *a, **k))
    warp_pipe(video=frames, prompt="a sketch", num_inference_steps=2, progress=False)
    assert len(seen) == 2
    for image, frame in zip(seen, frames):
        expected = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 127.5 - 1
        assert torch.allclose(image, expected, atol=1e-6)


def test_a_vae_that_downsamples_by_2_gets_noise_and_flow_on_its_own_latent_grid():
    """SD 1.5's VAE downsamples 8x, the micro-world's 2x: the noise and the warped latents follow the VAE."""
    from hasten.tiny.micro_sd15 import build_pipeline

    pipe = LatentWarpPipeline.from_pipe(build_pipeline())  # untrained: only the shapes matter here
    assert pipe.pipe.vae_scale_factor == 2
    frames, _ = panned(frames=3, size=(32, 48), step=(2, 0))
    out = pipe(video=frames, prompt="a red circle", num_inference_steps=3, progress=False)
    assert out.frames.shape == (3, 32, 48, 3) and out.warped_steps > 0 and out.seconds["warp"] > 0


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


def _live_controlnet(unet):
    """A ControlNet whose zero-initialised convolutions are given seeded weights: it changes the UNet."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(0)
    zero_convs = [
        controlnet.controlnet_cond_embedding.conv_out,
        controlnet.controlnet_mid_block,
        *controlnet.controlnet_down_blocks,
    ]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
    return controlnet


def test_controlnet_guides_the_translation_by_the_canny_edges(monkeypatch):
    pipe = hasten.tiny.pipeline("sd15")
    frames, _ = panned(frames=2, size=(40, 56))
    assert all(latentwarp.canny_map(frame).any() for frame in frames), "the test video has edges to guide by"
    common = dict(video=frames, prompt="x", num_inference_steps=2, progress=False)
    plain = LatentWarpPipeline.from_pipe(pipe)(**common).frames
    guided_pipe = LatentWarpPipeline.from_pipe(pipe, controlnet=_live_controlnet(pipe.unet))
    guided = guided_pipe(**common).frames
    assert guided.shape == (2, 40, 56, 3)
    assert np.abs(guided.astype(int) - plain.astype(int)).max() > 0, "the ControlNet residuals reach the UNet"
    assert np.array_equal(guided_pipe(controlnet_conditioning_scale=0.0, **common).frames, plain), (
        "scale 0 switches the ControlNet off"
    )
    monkeypatch.setattr(latentwarp, "canny_map", lambda frame, *a, **k: np.zeros_like(frame))  # no edges
    assert not np.array_equal(guided_pipe(**common).frames, guided), "the edges are what guides"


def _count_warps(monkeypatch) -> list[int]:
    """Count the pipeline's latent warps (one backward_warp call per warped step and frame)."""
    calls = []
    original = latentwarp.backward_warp

    def counting(image, flow, *args, **kwargs):
        calls.append(1)
        return original(image, flow, *args, **kwargs)

    monkeypatch.setattr(latentwarp, "backward_warp", counting)
    return calls


@pytest.mark.parametrize("strength, expected", [(1.0, 16), (0.75, 11)])
def test_paper_warp_schedule_warps_the_first_16_of_20_steps(warp_pipe, monkeypatch, strength, expected):
    """LatentWarp Sec. 5.1: 20 steps, the first 16 warped. The window is counted on the full schedule:
    at strength 0.75 the run starts at step 6 of 20, so steps 6-16 (11 of 15) are warped."""
    assert warped_steps(20, strength) == expected
    calls = _count_warps(monkeypatch)
    frames, _ = panned(frames=3, size=(40, 56))
    out = warp_pipe(
        video=frames, prompt="x", num_inference_steps=20, strength=strength, cross_frame=False, progress=False
    )
    assert out.warped_steps == expected
    assert len(calls) == 2 * expected  # frames 1 and 2, each warped at `expected` steps


def test_former_run_window_is_an_option(warp_pipe, monkeypatch):
    """hasten's former rule: warp_end counted on the steps run, 0.3 of 15 -> 4 (4.5 rounds to even)."""
    assert warped_steps(20, 0.75, 0.3, "run") == 4
    assert warped_steps(20, 0.75, 0.3, "schedule") == 1  # the first 6 of 20 steps, 5 of them skipped by img2img
    calls = _count_warps(monkeypatch)
    frames, _ = panned(frames=2, size=(40, 56))
    out = warp_pipe(
        video=frames,
        prompt="x",
        num_inference_steps=20,
        warp_end=0.3,
        warp_window="run",
        cross_frame=False,
        progress=False,
    )
    assert out.warped_steps == 4 and len(calls) == 4


def test_default_occlusion_is_the_papers_warped_difference(warp_pipe):
    """LatentWarp Eq. 6 by default (|warp(I_{i-1}) - I_i| > 0.05 on the source frames); forward-backward
    consistency (hasten's former rule) as the option. A patch appears on a still camera: the paper's
    mask flags it."""
    from hasten.video import flow_pair, occlusion_mask
    from hasten.video.flow import warped_difference_mask

    frames, _ = panned(frames=2, size=(64, 96), step=(2, 0))
    frames = frames.copy()
    frames[1, 16:40, 24:56] = (255, 0, 255)
    kwargs = dict(prompt="x", num_inference_steps=2, cross_frame=False, progress=False)
    paper = warp_pipe(video=frames, **kwargs)
    former = warp_pipe(video=frames, occlusion="forward-backward", **kwargs)
    to_previous, to_current = flow_pair(frames[0], frames[1])
    assert np.array_equal(paper.occlusions[0], warped_difference_mask(frames[0], frames[1], to_previous))
    assert np.array_equal(former.occlusions[0], occlusion_mask(to_previous, to_current))
    assert not np.array_equal(paper.occlusions[0], former.occlusions[0])
    assert bool(paper.occlusions[0][20:36, 28:52].all())
    assert float(warp_pipe(video=frames, occlusion_threshold=1.0, **kwargs).occlusions[0][20:36, 28:52].mean()) == 0


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(strength=0.0), "strength"),
        (dict(warp_end=1.5), "warp_end"),
        (dict(warp_window="steps"), "warp_window"),
        (dict(occlusion="fb"), "occlusion"),
        (dict(occlusion_threshold=-0.1), "occlusion_threshold"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(height=36), "height"),
        (dict(video=[]), "video"),
    ],
)
def test_bad_arguments_name_themselves(warp_pipe, kwargs, name):
    frames, _ = panned(frames=2, size=(40, 56))
    call = dict(video=frames, prompt="x", num_inference_steps=2, progress=False)
    call.update(kwargs)
    with pytest.raises(ValueError, match=name):
        warp_pipe(**call)
    with pytest.raises(ValueError, match="scheduler"):
        LatentWarpPipeline.from_pipe(hasten.tiny.pipeline("sd15"), scheduler="euler")
