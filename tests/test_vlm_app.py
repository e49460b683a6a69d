"""The VLM pruning Gradio app: a real browser run on the tiny LLaVA, and errors as gr.Error."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from browser import chromium_page, running_app  # first: puts the repository root (`apps`) on sys.path

from apps.vlm_app import VLMRun, build_demo  # noqa: E402
from hasten.token_pruning.evaluate import load_vlm  # noqa: E402

TIMEOUT_MS = 120_000


@pytest.mark.browser
def test_run_shows_answer_overlay_and_stats(tmp_path):
    from hasten.cli.vlm import default_question

    _, question, truth = default_question("trained-llava")
    with running_app(build_demo) as app, chromium_page() as page:  # the default: the trained LLaVA on a scene
        page.goto(app.url)
        assert page.locator("#question textarea").input_value() == question
        page.locator("#run").click()
        stats = page.locator("#stats")
        stats.filter(has_text="visual tokens").wait_for(timeout=TIMEOUT_MS)
        overlay = page.locator("#overlay img")
        overlay.wait_for(timeout=TIMEOUT_MS)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle(),
                               timeout=TIMEOUT_MS)
        assert overlay.evaluate("img => img.naturalHeight") == 384
        text = stats.inner_text()
        assert "hired" in text and "16/81" in text, text  # default budget 0.2 of 81 tokens
        assert page.locator("#answer textarea").input_value() == truth  # right at 20% of the tokens
        assert truth in page.locator("#truth").inner_text()
        assert page.errors == []
        page.screenshot(path=tmp_path / "vlm_app.png", full_page=True)


def test_overlay_darkens_dropped_tokens_and_errors():
    run = VLMRun(*load_vlm("tiny-qwen2-vl", "cpu"), "tiny-qwen2-vl")  # the Run button's function
    image = np.full((64, 64, 3), 200, np.uint8)
    answer, overlay, stats = run(image, "What?", "pool", 0.25)
    assert "visual tokens 16/64" in stats
    kept_cell, dropped_cell = overlay[10, 10], overlay[10, 60]  # 8 x 8 grid, 2 x 2 windows: top-left kept
    assert int(kept_cell[0]) > int(dropped_cell[0])
    with pytest.raises(gr.Error, match="Upload"):
        run(None, "What?", "pool", 0.25)
    with pytest.raises(gr.Error, match="budget"):
        run(image, "What?", "random", 0.0)


def test_speculative_decoding_reports_accepted_length_and_speedup(tmp_path):
    from apps.vlm_app import SPECULATIVE
    from hasten import tiny
    from hasten.token_pruning.evaluate import sample_images
    from hasten.speculative.specvlm import DraftModel, train_draft

    model, processor = tiny.vlm("llava")
    draft = DraftModel.for_target(model)
    train_draft(model, processor, sample_images(), draft, steps=30, out=tmp_path / "draft", progress=False)
    run = VLMRun(model, processor, "tiny-llava", DraftModel.from_pretrained(tmp_path / "draft", model))
    answer, overlay, report = run(np.asarray(sample_images()[0][0]), "What is in the picture?", SPECULATIVE, 0.2)
    assert "tokens per target pass" in report and "identical to" in report and "x**" in report, report
    with pytest.raises(gr.Error, match="draft"):
        VLMRun(model, processor, "tiny-llava")(np.asarray(sample_images()[0][0]), "What?", SPECULATIVE, 0.2)
