"""The trained micro-world VLMs: shipped weights load with from_pretrained and answer held-out
questions; training resumes exactly; the pruning-table ordering the docs claim holds."""

from __future__ import annotations

import pytest
import torch

from hasten.tiny import micro_vlm, trained
from hasten.token_pruning.evaluate import evaluate_task, format_task_table

# Measured on the shipped weights, 200 held-out questions (benchmarks/results/vlm_pruning-trained-cpu.txt):
# LLaVA colour 0.63, shape 0.25 (chance: not learned yet). Floors sit below the measurement by the
# spread of a 60-question sample and above chance (colour 1/5).
LLAVA_FLOOR = {"color": 0.45}
QWEN_FLOOR = {"all": 0.6}


@pytest.fixture(scope="module")
def llava():
    return micro_vlm.load("llava")


def test_shipped_llava_reaches_its_accuracy_floor(llava):
    model, processor = llava
    assert type(trained.load("llava")).__name__ == "LlavaForConditionalGeneration"  # the registry's loader
    accuracy = micro_vlm.accuracy(model, processor, micro_vlm.held_out_set("llava", 60))
    for kind, floor in LLAVA_FLOOR.items():
        assert accuracy[kind] >= floor, accuracy


def test_shipped_qwen_reaches_its_accuracy_floor():
    model, processor = micro_vlm.load("qwen2.5-vl")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    accuracy = micro_vlm.accuracy(model, processor, micro_vlm.held_out_set("qwen2.5-vl", 40))
    for kind, floor in QWEN_FLOOR.items():
        assert accuracy[kind] >= floor, accuracy


def test_hired_beats_random_keep_at_a_tenth_of_the_tokens(llava):
    model, processor = llava
    torch.manual_seed(0)
    samples = micro_vlm.held_out_set("llava", 60)
    rows = evaluate_task(model, processor, [("random", 1.0), ("random", 0.1), ("hired", 0.1)], samples,
                         timing_samples=1)
    full, random_keep, hired = rows
    assert hired.accuracy >= random_keep.accuracy + 0.15, format_task_table(rows)
    assert full.agreement == 1.0 and full.accuracy > hired.accuracy


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
