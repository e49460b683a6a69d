"""The VoxHammer Gradio app in Chromium (its one-click example), the box drawn in both views, bad input as gr.Error."""

from __future__ import annotations

import re

import gradio as gr
import numpy as np
import pytest

from hasten.apps.edit3d_app import BOX_COLOUR, Edit3DRun, build_demo  # noqa: E402

from browser import TIMEOUT_MS, assert_no_errors, chromium_page, click_example, running_app, screenshot


@pytest.mark.browser
def test_example_edits_the_sample_and_shows_both_meshes(tmp_path):
    with running_app(build_demo, model="tiny-trellis") as app, chromium_page() as page:
        page.goto(app.url)
        assert "Random weights" in page.locator("#notice").inner_text()
        click_example(page)
        report = page.locator("#report")
        report.filter(has_text="voxels changed").wait_for(timeout=TIMEOUT_MS)
        text = report.inner_text()
        assert re.search(r"\d+ voxels changed inside the box, 0 outside it", text), text
        assert "box x 16-32, y 0-32, z 0-32" in text, text
        for elem_id in ("before", "after"):
            page.locator(f"#{elem_id} canvas").wait_for(timeout=TIMEOUT_MS)
        page.wait_for_timeout(6000)  # let both viewers load and draw their meshes before the picture
        assert_no_errors(page)
        screenshot(page, "edit3d", tmp_path)


@pytest.fixture(scope="module")
def run():
    return Edit3DRun("tiny-trellis")


def test_both_views_show_the_box_and_frame_the_same_extent(run):
    import trimesh

    box = [8, 0, 0, 24, 32, 20]
    source, edited, report = run(None, *box, "a rounded shape", None, 2)
    views = [trimesh.load(path) for path in (source, edited)]
    for view in views:
        edges = [g for g in view.geometry.values() if tuple(g.visual.material.baseColorFactor) == BOX_COLOUR]
        assert len(edges) == 12  # the box's twelve edges, in both views
        corners = np.concatenate([edge.bounds for edge in edges])
        assert np.allclose(corners.min(0), np.array(box[:3]) / 32, atol=0.01)
        assert np.allclose(corners.max(0), np.array(box[3:]) / 32, atol=0.01)
    # outside the box the shapes are the same, so with the box drawn both views have one extent (one framing)
    assert np.allclose(views[0].bounds, views[1].bounds)


def test_bad_boxes_steps_and_missing_condition(run):
    with pytest.raises(gr.Error, match="empty"):
        run(None, 10, 0, 0, 5, 8, 8, "x", None, 2)
    with pytest.raises(gr.Error, match="`x1` must be a whole number from 0 to 32"):
        run(None, 0, 0, 0, 40, 8, 8, "x", None, 2)
    with pytest.raises(gr.Error, match="`steps`"):
        run(None, 0, 0, 0, 8, 8, 8, "x", None, 0)
    with pytest.raises(gr.Error, match="prompt or an image"):
        run(None, 0, 0, 0, 8, 8, 8, "", None, 2)
