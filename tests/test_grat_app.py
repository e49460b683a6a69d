"""The GRAT Gradio app in Chromium (micro-flux, its one-click example) and bad input reported as gr.Error."""

from __future__ import annotations

import re

import gradio as gr
import pytest

from hasten import tiny
from hasten.apps.grat_app import build_demo  # noqa: E402
from hasten.apps.launcher import random_weights_notice  # noqa: E402
from hasten.tiny.micro_diffusion import DRAW_SIZE  # noqa: E402

from browser import TIMEOUT_MS, assert_no_errors, chromium_page, click_example, running_app, screenshot, shown_image

SIZE = tiny.default_size("flux")


@pytest.mark.browser
def test_example_shows_dense_grat_difference_and_the_numbers(tmp_path):
    with running_app(build_demo) as app, chromium_page() as page:  # the default: micro-flux at DRAW_SIZE
        page.goto(app.url)
        assert page.locator("#notice").count() == 0  # trained weights: no random-weights notice
        click_example(page)
        timing = page.locator("#timing")
        # four 8-step calls at 192 x 192: about 20 seconds on a quiet CPU
        timing.filter(has_text="PSNR").wait_for(timeout=3 * TIMEOUT_MS)
        dense, grat = shown_image(page, "dense-image"), shown_image(page, "grat-image")
        difference = shown_image(page, "difference-image")
        height, width = DRAW_SIZE
        for image in (dense, grat, difference):
            assert (image["width"], image["height"]) == (2 * width, 2 * height)  # 192 x 192 shown 2x (256 px at least)
        assert dense["std"] > 1 and grat["std"] > 1, (dense, grat)  # pictures, not a blank canvas
        text = timing.inner_text()
        for pattern in (
            r"speedup \d+\.\d\dx",
            r"attention bound \d+\.\d\dx",
            r"PSNR \d+\.\d\d dB",
            r"prompt accuracy \(classifier\): dense \d+%, GRAT \d+%",
            rf"{height} x {width}, 8 steps",
        ):
            assert re.search(pattern, text), (pattern, text)
        assert_no_errors(page)
        screenshot(page, "grat", tmp_path)


def test_bad_settings_are_gradio_errors_naming_the_field():
    demo = build_demo("tiny-flux")
    with pytest.raises(gr.Error, match="group_size"):
        demo("a cat", SIZE["height"], SIZE["width"], "cross", 0, 1, 2, 0, api_name="run")
    with pytest.raises(gr.Error, match="`height` must be a whole number of at least 16"):
        demo("a cat", 0, SIZE["width"], "cross", 4, 1, 2, 0, api_name="run")
    with pytest.raises(gr.Error, match="`steps`"):
        demo("a cat", SIZE["height"], SIZE["width"], "cross", 4, 1, 0, 0, api_name="run")
    notices = [block.value for block in demo.blocks.values() if getattr(block, "elem_id", None) == "notice"]
    assert notices == [random_weights_notice("tiny-flux")]
