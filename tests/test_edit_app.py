"""The ConsistEdit Gradio app in Chromium (micro-flux's one-click example; an upload painted with the brush),
and the mask paths directly."""

from __future__ import annotations

import re

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import hasten.tiny  # noqa: E402
from hasten.apps.edit_app import REGION_COLOUR, EditRun, build_demo  # noqa: E402
from hasten.pipelines.consistedit import ConsistEditPipeline  # noqa: E402
from hasten.tiny.micro_diffusion import DRAW_SIZE  # noqa: E402
from hasten.tiny.motion import photo  # noqa: E402

from browser import TIMEOUT_MS, assert_no_errors, chromium_page, click_example, running_app, screenshot, shown_image

# Gradio 6's ImageEditor front end sometimes throws while it resizes its layers after an upload
# ("reading 'reset_layers'" / "'dimensions'"); the app keeps working. Any other page error fails a test.
KNOWN_EDITOR_ERRORS = ("reset_layers", "dimensions")


@pytest.mark.browser
def test_example_recolours_one_object_and_keeps_the_rest(tmp_path):
    with running_app(build_demo) as app, chromium_page() as page:  # the default: micro-flux on a rendered scene
        page.goto(app.url)
        assert page.locator("#notice").count() == 0  # trained weights: no random-weights notice
        click_example(page)
        report = page.locator("#report")
        report.filter(has_text="outside it PSNR").wait_for(timeout=TIMEOUT_MS)
        text = report.inner_text()
        assert "real (inverted)" in text and "painted" in text and f"{DRAW_SIZE[0]} x {DRAW_SIZE[1]}" in text, text
        region = int(re.search(r"edit region (\d+)%", text).group(1))
        assert 5 <= region <= 25, text  # one grid cell and a margin, not the whole picture
        assert float(re.search(r"outside it PSNR (\d+\.\d) dB", text).group(1)) > 25, text  # the rest is kept
        assert re.search(r"prompt accuracy \(classifier\): source \d+% of its objects, edit \d+%", text), text
        for elem_id in ("out-source", "out-edit", "out-region"):
            image = shown_image(page, elem_id)
            shown = (image["width"], image["height"])
            assert shown == (2 * DRAW_SIZE[1], 2 * DRAW_SIZE[0]) and image["std"] > 5, (elem_id, image)  # shown 2x
        page.errors[:] = [e for e in page.errors if not any(word in e for word in KNOWN_EDITOR_ERRORS)]
        assert_no_errors(page)
        screenshot(page, "edit", tmp_path)


@pytest.mark.browser
def test_upload_paint_and_edit(tmp_path):
    Image.fromarray(photo("chelsea")).resize((208, 144)).save(tmp_path / "cat.png")
    with running_app(build_demo, model="tiny-flux") as app, chromium_page() as page:
        page.goto(app.url)
        assert "Random weights" in page.locator("#notice").inner_text()
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
        assert "real (inverted)" in text and "painted" in text and "36 x 52" in text, text
        for elem_id in ("out-source", "out-edit", "out-region"):
            assert shown_image(page, elem_id)["std"] > 5, elem_id
        page.errors[:] = [e for e in page.errors if not any(word in e for word in KNOWN_EDITOR_ERRORS)]
        assert_no_errors(page)


@pytest.fixture(scope="module")
def run():
    editor = ConsistEditPipeline.from_pipe(hasten.tiny.pipeline("sd3"), **hasten.tiny.default_size("sd3"))
    return EditRun(editor, "tiny-sd3")


def test_painted_strokes_are_the_edit_region_drawn_in_cyan(run):
    background = np.full((72, 104, 3), 120, np.uint8)
    strokes = np.zeros((72, 104, 4), np.uint8)
    strokes[:36, :52, 3] = 255  # the top-left quarter
    source, edited, region, report = run(
        {"background": background, "layers": [strokes], "composite": background}, "a photo", "a painting", "", 0.1, 3
    )
    share = int(re.search(r"edit region (\d+)%", report).group(1))
    assert "real (inverted)" in report and "painted" in report and 15 <= share <= 30, report  # a quarter, 9 x 13 grid
    assert edited.shape == source.shape == region.shape
    tint = region.astype(int) - source.astype(int)  # the overlay moves the region towards cyan, not red
    rows, cols = region.shape[0] // 8, region.shape[1] // 8
    corner, far = tint[:rows, :cols], tint[-rows:, -cols:]
    assert REGION_COLOUR[0] < REGION_COLOUR[2] and corner[..., 2].mean() > 20 and corner[..., 0].mean() < 0
    assert np.abs(far).max() == 0  # outside the region the overlay is the source


def test_synthetic_with_edit_words_and_errors(run):
    _, _, _, report = run(None, "a red car", "a blue car", "red", 1.0, 3)
    assert "synthetic" in report and "edit words" in report
    with pytest.raises(gr.Error, match="Paint"):
        run(None, "a red car", "a blue car", "", 1.0, 3)
    with pytest.raises(gr.Error, match="not in the prompt"):
        run(None, "a red car", "a blue car", "boat", 1.0, 3)
    with pytest.raises(gr.Error, match="`steps`"):
        run(None, "a red car", "a blue car", "red", 1.0, 0)
