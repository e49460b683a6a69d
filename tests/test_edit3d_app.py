"""The VoxHammer Gradio app: a browser run on the tiny TRELLIS set, and bad input as gr.Error."""

from __future__ import annotations

import gradio as gr
import pytest
from browser import chromium_page, running_app  # first: puts the repository root (`apps`) on sys.path

from apps.edit3d_app import Edit3DRun, build_demo  # noqa: E402

TIMEOUT_MS = 120_000


@pytest.mark.browser
def test_edit_the_sample_and_show_both_meshes(tmp_path):
    with running_app(build_demo, model="tiny-trellis") as app, chromium_page() as page:
        page.goto(app.url)
        page.locator("#steps input").fill("3")
        page.locator("#run").click()
        report = page.locator("#report")
        report.filter(has_text="voxels changed").wait_for(timeout=TIMEOUT_MS)
        assert "outside it the shape is the source's" in report.inner_text()
        for elem_id in ("before", "after"):
            page.locator(f"#{elem_id} canvas").wait_for(timeout=TIMEOUT_MS)
        assert page.errors == []
        page.screenshot(path=tmp_path / "edit3d_app.png", full_page=True)


def test_bad_boxes_and_missing_condition():
    run = Edit3DRun("tiny-trellis")
    with pytest.raises(gr.Error, match="leaves"):
        run(None, 0, 0, 0, 40, 8, 8, "x", None, 2)
    with pytest.raises(gr.Error, match="prompt or an image"):
        run(None, 0, 0, 0, 8, 8, 8, "", None, 2)
