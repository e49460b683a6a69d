"""`hasten vlm ask` / `hasten vlm eval` and the evaluation harness behind them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hasten.cli import main
from hasten.token_pruning.evaluate import evaluate, load_vlm, sample_images


def test_full_budget_has_perfect_fidelity_and_the_kv_cache_shrinks_with_the_budget():
    model, processor = load_vlm("tiny-llava", "cpu")
    rows = evaluate(model, processor, [("random", 1.0), ("hired", 0.2)], sample_images()[:2], max_new_tokens=4)
    full, pruned = rows
    assert (full.top1_agreement, full.mean_kl, full.exact_match) == (1.0, 0.0, 1.0)
    assert pruned.visual_kept / pruned.visual_in <= 0.2
    assert pruned.kv_bytes < full.kv_bytes and pruned.flops_ratio < 1.0
    assert 0.0 <= pruned.top1_agreement <= 1.0 and pruned.mean_kl >= 0.0


def test_ask_with_pruning_prints_the_stats(tmp_path, capsys):
    image = tmp_path / "photo.png"
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(image)
    assert (
        main(
            [
                "vlm",
                "ask",
                "--image",
                str(image),
                "--model",
                "tiny-qwen2-vl",
                "--prune",
                "pool",
                "--budget",
                "0.25",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert "visual tokens 4/25" in capsys.readouterr().out  # 5 x 5 grid, 3 x 3 windows -> 2 x 2


def test_ask_errors(tmp_path):
    with pytest.raises(SystemExit):
        main(["vlm", "ask", "--budget", "1.5"])
    with pytest.raises(SystemExit):
        main(["vlm", "ask", "--image", str(tmp_path / "missing.png"), "--model", "tiny-llava"])
    with pytest.raises(SystemExit):
        main(["vlm", "ask", "--model", "tiny-blip"])


def test_eval_prints_a_table(capsys):
    assert (
        main(
            [
                "vlm",
                "eval",
                "--model",
                "tiny-llava",
                "--methods",
                "hired",
                "--budgets",
                "0.5",
                "--max-new-tokens",
                "2",
                "--json",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "hired" in out and "top1" in out and '"method": "hired"' in out


def test_ask_defaults_to_the_trained_llava_on_a_generated_scene(capsys):
    from hasten.cli.vlm import default_question

    assert main(["vlm", "ask", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    _, question, truth = default_question("trained-llava")
    assert f"Q: {question}" in out and f"[ground truth: {truth} - right]" in out, out
    assert main(["vlm", "ask", "--prune", "hired", "--budget", "0.5", "--max-new-tokens", "4"]) == 0
    assert "visual tokens 40/81" in capsys.readouterr().out


def test_ask_gives_the_trained_qwen_its_three_screenshots(capsys):
    assert main(["vlm", "ask", "--model", "trained-qwen2.5-vl", "--prune", "guikv", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "Q: In screenshot" in out and "visual tokens" in out and "/144," in out, out  # 3 x 48 visual tokens


def test_eval_on_a_trained_model_prints_task_accuracy(capsys):
    assert (
        main(
            [
                "vlm",
                "eval",
                "--model",
                "trained-llava",
                "--methods",
                "hired",
                "--budgets",
                "0.25",
                "--samples",
                "10",
                "--json",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "acc" in out and "agree" in out and "color" in out and "shape" in out and '"accuracy"' in out
