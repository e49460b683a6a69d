"""The ConsistEdit Gradio app: a browser run (upload, brush strokes, edit), and the mask paths directly."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from browser import chromium_page, running_app  # first: puts the repository root (`apps`) on sys.path
from PIL import Image

import hasten.tiny  # noqa: E402
from apps.edit_app import EditRun, build_demo  # noqa: E402
from hasten.pipelines.consistedit import ConsistEditPipeline  # noqa: E402
from hasten.tiny.motion import photo  # noqa: E402

TIMEOUT_MS = 120_000


@pytest.mark.browser
def test_upload_paint_and_edit(tmp_path):
    Image.fromarray(photo("chelsea")).resize((208, 144)).save(tmp_path / "cat.png")
    with running_app(build_demo, model="tiny-flux") as app, chromium_page() as page:
        page.goto(app.url)
        page.locator("#canvas input[type=file]").first.set_input_files(str(tmp_path / "cat.png"))
        canvas = page.locator("#canvas canvas").first
        canvas.wait_for(timeout=TIMEOUT_MS)
        page.wait_for_timeout(1000)
        page.locator("#canvas button[aria-label*='Brush'], #canvas button[title*='Brush']").first.click()
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.4)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6, steps=8)
        page.mouse.up()
        page.locator("#steps input").fill("3")
        page.locator("#run").click()
        report = page.locator("#report")
        report.filter(has_text="edit region").wait_for(timeout=TIMEOUT_MS)
        text = report.inner_text()
        assert "real (inverted)" in text and "painted" in text, text
        for elem_id in ("out-source", "out-edit", "out-region"):
            page.locator(f"#{elem_id} img").wait_for(timeout=TIMEOUT_MS)
        # Gradio 6's ImageEditor front end sometimes throws while it resizes its layers after an upload
        # ("reading 'reset_layers'" / "'dimensions'"); the app keeps working (the run above completed).
        # Any other page error fails the test.
        known = ("reset_layers", "dimensions")
        assert [e for e in page.errors if not any(word in e for word in known)] == []
        page.screenshot(path=tmp_path / "edit_app.png", full_page=True)


@pytest.fixture(scope="module")
def run():
    return EditRun(ConsistEditPipeline.from_pipe(hasten.tiny.pipeline("sd3"), **hasten.tiny.default_size("sd3")), "tiny-sd3")


def test_painted_strokes_are_the_edit_region(run):
    background = np.full((72, 104, 3), 120, np.uint8)
    strokes = np.zeros((72, 104, 4), np.uint8)
    strokes[:36, :52, 3] = 255  # the top-left quarter
    source, edited, region, report = run({"background": background, "layers": [strokes], "composite": background},
                                         "a photo", "a painting", "", 0.1, 3)
    import re

    share = int(re.search(r"edit region (\d+)%", report).group(1))
    assert "real (inverted)" in report and "painted" in report and 15 <= share <= 30, report  # a quarter, on a 9 x 13 grid
    assert edited.shape == source.shape == region.shape


def test_synthetic_with_edit_words_and_errors(run):
    _, _, _, report = run(None, "a red car", "a blue car", "red", 1.0, 3)
    assert "synthetic" in report and "edit words" in report
    with pytest.raises(gr.Error, match="Paint"):
        run(None, "a red car", "a blue car", "", 1.0, 3)
    with pytest.raises(gr.Error, match="not in the prompt"):
        run(None, "a red car", "a blue car", "boat", 1.0, 3)
