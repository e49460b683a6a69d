"""The LatentWarp Gradio app: a real browser upload on the tiny SD 1.5, and bad input as gr.Error."""

from __future__ import annotations

import gradio as gr
import pytest
from browser import chromium_page, running_app  # first: puts the repository root (`apps`) on sys.path

from apps.video_app import build_demo  # noqa: E402
from hasten.tiny.motion import panned  # noqa: E402
from hasten.video import write_video  # noqa: E402

TIMEOUT_MS = 120_000


@pytest.mark.browser
def test_upload_translate_and_report(tmp_path):
    frames, _ = panned(frames=5, size=(64, 96), step=(3, 0))
    clip = write_video(frames, tmp_path / "pan.webm", fps=8)
    with running_app(build_demo, model="tiny-sd15") as app, chromium_page() as page:
        page.goto(app.url)
        page.locator("#source input[type=file]").set_input_files(str(clip))
        page.locator("#source video").wait_for(timeout=TIMEOUT_MS)
        page.locator("#run").click()
        report = page.locator("#report")
        report.filter(has_text="lower").wait_for(timeout=TIMEOUT_MS)
        text = report.inner_text()
        assert "pan.webm" in text and "5 frames" in text and "LatentWarp" in text and "per-frame" in text, text
        video = page.locator("#result video")
        video.wait_for(timeout=TIMEOUT_MS)
        page.wait_for_function("v => v.readyState >= 1 && v.videoWidth > 0", arg=video.element_handle(),
                               timeout=TIMEOUT_MS)
        assert video.evaluate("v => [v.videoWidth, v.videoHeight]") == [96, 64]
        assert page.errors == []
        page.screenshot(path=tmp_path / "video_app.png", full_page=True)


def test_bad_input_is_a_gradio_error(tmp_path):
    demo = build_demo("tiny-sd15")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"garbage" * 100)
    with pytest.raises(gr.Error, match="corrupt"):
        demo(str(broken), "x", 0.75, 2, 0.3, True, False, api_name="run")
    with pytest.raises(gr.Error, match="num_inference_steps"):
        demo(None, "x", 0.75, 0, 0.3, True, False, api_name="run")
    with pytest.raises(gr.Error, match="minimum"):  # the slider itself refuses it
        demo(None, "x", 0.0, 2, 0.3, True, False, api_name="run")
