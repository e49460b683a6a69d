"""Video building blocks: reading/writing, DIS flow, occlusion, warping, on real photos with known motion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hasten.tiny.motion import panned, zoomed
from hasten.video import (
    backward_warp,
    flow_pair,
    occlusion_mask,
    optical_flow,
    read_video,
    resize_flow,
    warp_error,
    write_video,
)
from hasten.video.flow import warped_difference_mask


def _tensor(frame: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frame).permute(2, 0, 1)[None].float()


def test_read_back_what_was_written(tmp_path):
    frames, _ = panned(frames=4, size=(32, 48))
    path = write_video(frames, tmp_path / "clip.avi", fps=12.5)
    video = read_video(path)
    assert video.frames.shape == frames.shape and video.fps == pytest.approx(12.5)
    assert float(np.abs(video.frames.astype(float) - frames).mean()) < 12  # MJPG is lossy
    assert read_video(path, max_frames=2).frames.shape[0] == 2
    assert not list(tmp_path.glob(".*")), "no temporary file left behind"


def test_unreadable_videos_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no video"):
        read_video(tmp_path / "missing.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        read_video(corrupt)
    with pytest.raises(ValueError, match="frames"):
        write_video(np.zeros((2, 8, 8), np.uint8), tmp_path / "x.mp4")


def test_warping_a_panned_photo_by_the_true_flow_rebuilds_the_next_frame():
    frames, flows = panned(frames=2, size=(96, 128), step=(3, 2))
    rebuilt = backward_warp(_tensor(frames[0]), flows[0])[0].permute(1, 2, 0).numpy()
    inside = (slice(4, -6), slice(4, -6))
    assert float(np.abs(rebuilt[inside] - frames[1][inside]).mean()) < 0.5  # 0-255 scale
    assert float(np.abs(frames[0][inside].astype(float) - frames[1][inside]).mean()) > 5  # it did move


def test_dis_flow_recovers_the_true_motion():
    frames, flows = panned(frames=2, size=(128, 192), step=(3, 1))
    estimate = optical_flow(frames[1], frames[0])
    inside = estimate[8:-8, 8:-8]
    assert float(np.abs(inside - flows[0][8:-8, 8:-8]).mean()) < 0.3
    zoom_frames, zoom_flows = zoomed(frames=2, size=(128, 192), rate=1.04)
    zoom_estimate = optical_flow(zoom_frames[1], zoom_frames[0])
    assert float(np.abs(zoom_estimate - zoom_flows[0])[8:-8, 8:-8].mean()) < 0.3


def test_occlusion_marks_the_disoccluded_strip():
    frames, _ = panned(frames=2, size=(128, 192), step=(4, 0))
    to_previous, to_current = flow_pair(frames[0], frames[1])
    occluded = occlusion_mask(to_previous, to_current)
    assert bool(occluded[:, -3:].all()), "content entering on the right has no source"
    assert float(occluded[:, 16:-16].mean()) < 0.1


def test_warped_difference_mask_marks_the_disoccluded_strip_and_unexplained_content():
    """LatentWarp's Eq. 6 on a 4-px pan: the strip entering on the right has no source, and a patch
    pasted into the current frame differs from the warped previous frame; elsewhere the warp
    matches. The forward-backward rule, given the exact (consistent) flows, flags no patch."""
    frames, flows = panned(frames=2, size=(128, 192), step=(4, 0))
    current = frames[1].copy()
    current[40:72, 60:100] = (0, 255, 0)
    mask = warped_difference_mask(frames[0], current, flows[0])
    assert bool(mask[:, -4:].all()), "content entering on the right has no source"
    assert bool(mask[40:72, 60:100].all()), "pasted content is not explained by the flow"
    outside = np.ones_like(mask)
    outside[:, -4:] = outside[40:72, 60:100] = False
    assert float(mask[outside].mean()) < 0.01
    consistent = occlusion_mask(flows[0], -flows[0])
    assert not bool(consistent[40:72, 60:100].any())
    assert int(warped_difference_mask(frames[0], current, flows[0], threshold=1.0)[40:72, 60:100].sum()) == 0
    with pytest.raises(ValueError, match="threshold"):
        warped_difference_mask(frames[0], current, flows[0], threshold=-1)


def test_resize_flow_scales_the_vectors():
    flow = np.zeros((64, 96, 2), np.float32)
    flow[..., 0], flow[..., 1] = 8.0, -4.0
    small = resize_flow(flow, (8, 12))
    assert small.shape == (8, 12, 2)
    np.testing.assert_allclose(small[..., 0], 1.0)
    np.testing.assert_allclose(small[..., 1], -0.5)


def test_warp_error_is_zero_for_a_video_that_follows_its_flow():
    frames, flows = panned(frames=3, size=(64, 96), step=(2, 0))
    edge = np.zeros((64, 96), bool)
    edge[:, -2:] = True  # flow +2 leaves the frame there
    assert warp_error(frames, flows, [edge, edge]) < 0.001
    still = np.stack([frames[0]] * 3)
    assert warp_error(still, flows) > 0.01  # a video that does not move where the flow says
    with pytest.raises(ValueError, match="flows"):
        warp_error(frames, flows[:1])


def test_audio_passthrough_without_ffmpeg_is_one_notice(tmp_path, monkeypatch):
    from hasten.video import io

    frames, _ = panned(frames=2, size=(32, 48))
    path = write_video(frames, tmp_path / "clip.avi", fps=8)
    monkeypatch.setattr(io, "ffmpeg_executable", lambda: None)
    monkeypatch.setattr(io, "_AUDIO_NOTICE", False)
    with pytest.warns(UserWarning, match="imageio-ffmpeg"):
        assert io.copy_audio(path, path) is False
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second notice would raise here
        assert io.copy_audio(path, path) is False
    assert read_video(path).frames.shape[0] == 2
