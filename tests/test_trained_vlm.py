"""The trained micro-world VLMs: shipped weights load with from_pretrained and answer held-out
questions; training resumes exactly; the pruning-table property the docs claim holds."""

from __future__ import annotations

import pytest
import torch

from hasten.tiny import micro_vlm, trained
from hasten.token_pruning.evaluate import evaluate_task, format_task_table

# Measured on the shipped weights (1,000 x 16 steps, lr 1e-3), 200 held-out questions: LLaVA colour
# 0.81, shape 0.25 (chance: not learned yet, so no shape floor). The floor sits below the
# measurement by about 3 standard deviations of a 30-question sample and above what naming any
# colour present in the scene gives (about 0.5 over 1-4 objects).
LLAVA_FLOOR = {"color": 0.6}


@pytest.fixture(scope="module")
def llava():
    return micro_vlm.load("llava")


def test_shipped_llava_reaches_its_accuracy_floor(llava):
    model, processor = llava
    assert type(trained.load("llava")).__name__ == "LlavaForConditionalGeneration"  # the registry's loader
    accuracy = micro_vlm.accuracy(model, processor, micro_vlm.held_out_set("llava", 60))
    for kind, floor in LLAVA_FLOOR.items():
        assert accuracy[kind] >= floor, accuracy


def test_cache_eviction_cannot_change_a_one_token_answer(llava):
    # The docs' table: GUI-KV agrees with the unpruned model at every budget on this task, because
    # the one answer token comes out of the (unpruned) prefill; only later tokens read the cache.
    model, processor = llava
    samples = micro_vlm.held_out_set("llava", 16)
    rows = evaluate_task(
        model, processor, [("random", 1.0), ("guikv", 0.1), ("random", 0.05)], samples, timing_samples=1
    )
    full, guikv, random_keep = rows
    assert guikv.agreement == 1.0 and guikv.visual_kept < full.visual_in, format_task_table(rows)
    assert random_keep.agreement < 1.0  # dropping tokens before the LLM does change answers


def test_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    options = dict(steps=2, batch_size=2, checkpoint_every=1, progress=False)
    whole = micro_vlm.train("llava", tmp_path / "whole", **options)
    calls = []
    real = micro_vlm._training_batch

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(micro_vlm, "_training_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        micro_vlm.train("llava", tmp_path / "split", **options)
    monkeypatch.setattr(micro_vlm, "_training_batch", real)
    assert trained.load_checkpoint(tmp_path / "split")["step"] == 1
    resumed = micro_vlm.train("llava", tmp_path / "split", resume=True, **options)
    a, _ = micro_vlm.load_folder(whole)
    b, _ = micro_vlm.load_folder(resumed)
    fresh, _ = micro_vlm.build("llava")
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(x, y), name
    assert any(not torch.equal(x, z) for x, z in zip(a.state_dict().values(), fresh.state_dict().values()))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="name"):
        micro_vlm.build("blip")
    with pytest.raises(ValueError, match="steps"):
        micro_vlm.train("llava", tmp_path, steps=0)
    with pytest.raises(ValueError, match="resume"):
        micro_vlm.train("llava", tmp_path / "none", steps=1, resume=True)
    with pytest.raises(ValueError, match="config.json"):
        micro_vlm.load_folder(tmp_path)
