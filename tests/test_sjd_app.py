"""The SJD Gradio app: a real browser run on the tiny Janus, and bad input reported as gr.Error."""

from __future__ import annotations

import gradio as gr
import pytest
from browser import chromium_page, running_app  # first: puts the repository root (`apps`) on sys.path

from apps.sjd_app import build_demo  # noqa: E402

TIMEOUT_MS = 120_000


@pytest.mark.browser
def test_run_shows_sjd_and_ar_side_by_side(tmp_path):
    with running_app(build_demo, model="tiny-janus") as app, chromium_page() as page:
        page.goto(app.url)
        page.locator("#prompt textarea").fill("a lighthouse at dusk")
        page.locator("#run").click()
        report = page.locator("#report")
        report.filter(has_text="fewer forward passes").wait_for(timeout=TIMEOUT_MS)
        for elem_id in ("sjd-image", "ar-image"):
            image = page.locator(f"#{elem_id} img")
            image.wait_for(timeout=TIMEOUT_MS)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                                   timeout=TIMEOUT_MS)
            width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert width == height and width % 64 == 0 and width >= 256  # 64 x 64 shown enlarged
        text = report.inner_text()
        assert "SJD" in text and "AR" in text and "forward passes" in text, text
        assert page.errors == []
        page.screenshot(path=tmp_path / "sjd_app.png", full_page=True)


def test_bad_window_is_a_gradio_error():
    demo = build_demo("tiny-janus")
    with pytest.raises(gr.Error, match="window"):
        demo("a cat", 0, "random", 5.0, 0, False, api_name="run")
    with pytest.raises(gr.Error, match="guidance_scale"):
        demo("a cat", 4, "random", 0.5, 0, False, api_name="run")


def test_without_compare_only_sjd_runs():
    demo = build_demo("tiny-emu3")
    sjd, ar, report = demo("a cat", 8, "repeat_vertical", 3.0, 1, False, api_name="run")
    assert ar is None and "AR" not in report.split("\n")[0]
