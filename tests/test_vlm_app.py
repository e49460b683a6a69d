"""The VLM pruning Gradio app: a real browser run on the tiny LLaVA, and errors as gr.Error."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest

from hasten.apps.vlm_app import VLMRun, build_demo  # noqa: E402
from hasten.token_pruning.evaluate import load_vlm  # noqa: E402

from browser import TIMEOUT_MS, assert_no_errors, chromium_page, click_example, running_app, screenshot, shown_image


@pytest.mark.browser
def test_example_answers_right_with_kept_tokens_at_several_budgets(tmp_path):
    from hasten.cli.vlm import default_question

    _, question, truth = default_question("trained-llava")
    with running_app(build_demo) as app, chromium_page() as page:  # the default: the trained LLaVA on a scene
        page.goto(app.url)
        assert page.locator("#question textarea").input_value() == question
        assert page.locator("#truth textarea").input_value() == truth
        assert page.locator("#notice").count() == 0  # trained weights: no random-weights notice
        click_example(page)  # held-out scene 0, hired at 20%
        stats = page.locator("#stats")
        stats.filter(has_text="visual tokens").wait_for(timeout=TIMEOUT_MS)
        overlay = shown_image(page, "overlay")
        assert overlay["height"] == 384 and overlay["std"] > 5, overlay
        text = stats.inner_text()
        assert "hired" in text and "16/81" in text and "Answer right" in text, text  # 0.2 of 81 tokens
        assert page.locator("#answer textarea").input_value() == truth  # right at 20% of the tokens
        captions = page.locator("#sweep .caption-label, #sweep figcaption").all_inner_texts()
        if not captions:  # Gradio shows captions on hover in some versions: read the alt texts
            captions = [
                page.locator("#sweep img").nth(i).get_attribute("alt") or ""
                for i in range(page.locator("#sweep img").count())
            ]
        assert len(captions) == 4 and all("(right)" in caption for caption in captions), captions
        assert [caption.split(":")[0] for caption in captions] == ["100%", "50%", "20%", "10%"]
        assert_no_errors(page)
        screenshot(page, "vlm", tmp_path)


@pytest.mark.browser
def test_the_description_example_decodes_speculatively_with_the_shipped_draft():
    with running_app(build_demo) as app, chromium_page() as page:  # trained-llava: its shipped draft is loaded
        page.goto(app.url)
        click_example(page, row=2)  # "Describe the picture.", speculative (SpecVLM)
        stats = page.locator("#stats")
        stats.filter(has_text="tokens per target pass").wait_for(timeout=TIMEOUT_MS)
        text = stats.inner_text()
        assert "identical to" in text, text
        accepted = float(text.split("tokens per target pass")[0].split()[-1])
        assert accepted >= 2.0, text  # the draft accepts (shipped: ~4-7 on held-out descriptions)
        answer = page.locator("#answer textarea").input_value()
        assert answer.startswith("a ") and " at the " in answer, answer  # a description, not a word
        assert_no_errors(page)


def test_overlay_darkens_dropped_tokens_and_errors():
    run = VLMRun(*load_vlm("tiny-qwen2-vl", "cpu"), "tiny-qwen2-vl")  # the Run button's function
    image = np.full((64, 64, 3), 200, np.uint8)
    answer, overlay, stats, sweep = run(image, "What?", "pool", 0.25)
    assert "visual tokens 16/64" in stats
    assert [caption.split(":")[0] for _, caption in sweep] == ["100%", "50%", "25%", "20%", "10%"]
    dark = [(picture.astype(int).sum(-1) < overlay.astype(int).sum(-1).max() * 0.5).mean() for picture, _ in sweep]
    assert dark[0] == 0 and dark[-1] > dark[1], dark  # fewer tokens kept, more of the picture darkened
    kept_cell, dropped_cell = overlay[10, 10], overlay[10, 60]  # 8 x 8 grid, 2 x 2 windows: top-left kept
    assert int(kept_cell[0]) > int(dropped_cell[0])
    with pytest.raises(gr.Error, match="Upload"):
        run(None, "What?", "pool", 0.25)
    with pytest.raises(gr.Error, match="budget"):
        run(image, "What?", "random", 0.0)
    with pytest.raises(gr.Error, match="`budget`"):
        run(image, "What?", "random", None)


def test_speculative_decoding_reports_accepted_length_and_speedup(tmp_path):
    from hasten import tiny
    from hasten.apps.vlm_app import SPECULATIVE
    from hasten.speculative.specvlm import DraftModel, train_draft
    from hasten.token_pruning.evaluate import sample_images

    model, processor = tiny.vlm("llava")
    draft = DraftModel.for_target(model)
    train_draft(model, processor, sample_images(), draft, steps=30, out=tmp_path / "draft", progress=False)
    run = VLMRun(model, processor, "tiny-llava", DraftModel.from_pretrained(tmp_path / "draft", model))
    answer, overlay, report, sweep = run(np.asarray(sample_images()[0][0]), "What is in the picture?", SPECULATIVE, 0.2)
    assert sweep == []
    assert "tokens per target pass" in report and "identical to" in report and "x**" in report, report
    with pytest.raises(gr.Error, match="draft"):
        VLMRun(model, processor, "tiny-llava")(np.asarray(sample_images()[0][0]), "What?", SPECULATIVE, 0.2)
