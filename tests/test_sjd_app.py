"""The SJD Gradio app in Chromium (trained-janus, its one-click example) and bad input reported as gr.Error."""

from __future__ import annotations

import re

import gradio as gr
import pytest

from hasten.apps.sjd_app import build_demo  # noqa: E402

from browser import TIMEOUT_MS, assert_no_errors, chromium_page, click_example, running_app, screenshot, shown_image


@pytest.mark.browser
def test_example_shows_sjd_and_ar_side_by_side_with_passes(tmp_path):
    with running_app(build_demo) as app, chromium_page() as page:  # the default: trained-janus
        page.goto(app.url)
        assert page.locator("#notice").count() == 0  # trained weights: no random-weights notice
        click_example(page)
        report = page.locator("#report")
        report.filter(has_text="fewer forward passes").wait_for(timeout=TIMEOUT_MS)
        for elem_id in ("sjd-image", "ar-image"):
            image = shown_image(page, elem_id)
            assert image["width"] == image["height"] >= 256, image  # shown enlarged, square
            assert image["std"] > 5, image  # a scene, not a blank canvas
        text = report.inner_text()
        sjd, ar = (int(re.search(rf"{name}: (\d+) forward passes", text).group(1)) for name in ("SJD", "AR"))
        assert sjd < ar, text
        assert re.search(r"SJD: \d+\.\d\dx fewer forward passes, \d+\.\d\dx faster", text), text
        assert "trained-janus" in text and "32 x 32 pixels" in text, text  # the micro Janus draws 32 x 32
        assert_no_errors(page)
        screenshot(page, "sjd", tmp_path)


def test_bad_window_is_a_gradio_error():
    demo = build_demo("tiny-janus")
    with pytest.raises(gr.Error, match="window"):
        demo("a cat", 0, "random", 5.0, 0, False, api_name="run")
    with pytest.raises(gr.Error, match="guidance_scale"):
        demo("a cat", 4, "random", 0.5, 0, False, api_name="run")
    with pytest.raises(gr.Error, match="seed"):
        demo("a cat", 4, "random", 5.0, -1, False, api_name="run")


def test_without_compare_only_sjd_runs():
    demo = build_demo("tiny-emu3")
    sjd, ar, report = demo("a cat", 8, "repeat_vertical", 3.0, 1, False, api_name="run")
    assert ar is None and "AR" not in report.split("\n")[0]
    assert any("Random weights" in str(getattr(block, "value", "")) for block in demo.blocks.values())
