"""The LatentWarp Gradio app in Chromium (the example, an mp4v upload that must play) and bad input as gr.Error."""

from __future__ import annotations

import gradio as gr
import pytest

from hasten.apps.video_app import build_demo  # noqa: E402
from hasten.tiny.motion import panned  # noqa: E402
from hasten.video import read_video, write_video  # noqa: E402

from browser import TIMEOUT_MS, assert_no_errors, chromium_page, click_example, playing_video, running_app, screenshot


@pytest.mark.browser
def test_example_shows_input_latentwarp_and_per_frame_side_by_side(tmp_path):
    with running_app(build_demo, model="tiny-sd15") as app, chromium_page() as page:
        page.goto(app.url)
        assert playing_video(page, "input") == (96, 64)  # the default input is shown before any run
        assert "Random weights" in page.locator("#notice").inner_text()
        click_example(page)  # one click: loads the example and runs it
        report = page.locator("#report")
        report.filter(has_text="than per-frame").wait_for(timeout=TIMEOUT_MS)
        text = report.inner_text()
        assert "panned-photo.mp4" in text and "8 frames of 64 x 96" in text, text
        assert "LatentWarp" in text and "per-frame" in text and "warp error" in text, text
        for elem_id in ("input", "result", "per-frame"):
            assert playing_video(page, elem_id) == (96, 64), elem_id
        assert_no_errors(page)
        screenshot(page, "video", tmp_path)


@pytest.mark.browser
def test_mp4v_upload_plays_in_the_browser(tmp_path):
    frames, _ = panned(frames=5, size=(64, 96), step=(3, 0))
    clip = write_video(frames, tmp_path / "opencv.mp4", fps=8)  # OpenCV's mp4v: no browser decodes it
    with running_app(build_demo, model="tiny-sd15") as app, chromium_page() as page:
        page.goto(app.url)
        page.locator("#source input[type=file]").set_input_files(str(clip))
        first = page.locator("#input video").get_attribute("src")
        page.wait_for_function(
            "first => document.querySelector('#input video').src !== first", arg=first, timeout=TIMEOUT_MS
        )  # the shown input becomes the upload's re-encoding
        assert playing_video(page, "input") == (96, 64)
        page.wait_for_timeout(1000)  # time for a late "Video not playable" toast to appear
        assert_no_errors(page)


def test_preview_reencodes_the_upload_to_a_browser_codec(tmp_path):
    frames, _ = panned(frames=5, size=(64, 96), step=(3, 0))
    demo = build_demo("tiny-sd15")
    shown = demo(str(write_video(frames, tmp_path / "clip.avi", fps=12)), api_name="preview")  # MJPG in, VP9 out
    assert shown.endswith(".webm")
    video = read_video(shown)
    assert video.frames.shape == (5, 64, 96, 3) and video.fps == 12.0
    assert abs(video.frames.astype(int) - frames.astype(int)).mean() < 8  # the same pictures (lossy codecs)


def test_bad_input_is_a_gradio_error(tmp_path):
    demo = build_demo("tiny-sd15")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"garbage" * 100)
    with pytest.raises(gr.Error, match="corrupt"):
        demo(str(broken), "x", 0.75, 2, 0.3, True, False, api_name="run")
    with pytest.raises(gr.Error, match="corrupt"):
        demo(str(broken), api_name="preview")
    with pytest.raises(gr.Error, match="num_inference_steps"):
        demo(None, "x", 0.75, 0, 0.3, True, False, api_name="run")
    with pytest.raises(gr.Error, match="minimum"):  # the slider itself refuses it
        demo(None, "x", 0.0, 2, 0.3, True, False, api_name="run")


def test_micro_world_default_recolours_its_panning_scene_and_says_how_often():
    from hasten.apps.video_app import MICRO_SD15, micro_example

    clip = micro_example()
    demo = build_demo(MICRO_SD15)  # the default model: no "Random weights" notice, a judged example
    shown, warped, per_frame, report = demo(None, clip.prompt, 0.75, 20, 0.8, True, True, api_name="run")
    assert read_video(shown).frames.shape == clip.video.frames.shape
    assert f"a camera panning over {clip.video.scene.objects[0].noun_phrase}" in report, report
    assert f"object reads as {clip.target}" in report, report
    rows = [line for line in report.splitlines() if line.startswith(("| LatentWarp", "| per-frame"))]
    assert len(rows) == 2 and all(row.rstrip().endswith("of frames |") for row in rows), report
