"""The GRAT Gradio app: a real browser run on the tiny model, and bad input reported as gr.Error."""

from __future__ import annotations

import gradio as gr
import pytest
from browser import chromium_page, running_app  # first: puts the repository root (`apps`) on sys.path

from apps.grat_app import build_demo  # noqa: E402
from hasten import tiny

SIZE = tiny.default_size("flux")

TIMEOUT_MS = 120_000


@pytest.mark.browser
def test_run_shows_both_images_and_timing(tmp_path):
    with running_app(build_demo, model="tiny-flux") as app, chromium_page() as page:
        page.goto(app.url)
        page.locator("#prompt textarea").fill("a red fox in the snow")
        page.locator("#run").click()

        timing = page.locator("#timing")
        timing.filter(has_text="PSNR").wait_for(timeout=TIMEOUT_MS)
        for elem_id in ("dense-image", "grat-image"):
            image = page.locator(f"#{elem_id} img")
            image.wait_for(timeout=TIMEOUT_MS)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                                   timeout=TIMEOUT_MS)
            width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            scale = width // SIZE["width"]  # tiny outputs are shown enlarged by a whole factor
            assert scale >= 1 and (width, height) == (SIZE["width"] * scale, SIZE["height"] * scale)
        text = timing.inner_text()
        assert "speedup" in text and "PSNR" in text and "attention bound" in text, text
        assert page.errors == []
        page.screenshot(path=tmp_path / "grat_app.png", full_page=True)


def test_bad_group_size_is_a_gradio_error():
    demo = build_demo("tiny-flux")
    with pytest.raises(gr.Error, match="group_size"):
        demo("a cat", SIZE["height"], SIZE["width"], "cross", 0, 1, 2, 0, api_name="run")
