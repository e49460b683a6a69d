"""The trained micro-world VLMs: shipped weights load with from_pretrained and answer held-out
questions; training resumes exactly; the pruning-table property the docs claim holds."""

from __future__ import annotations

import pytest
import torch

from hasten.tiny import micro_vlm, trained
from hasten.tiny.vqa import COLORS, PLACES, SHAPES, held_out
from hasten.token_pruning.evaluate import evaluate_task, format_task_table

# Measured on the shipped weights (1,000 x 16 steps at lr 1e-3, then 1,500 x 16 with "Describe the
# picture." at 6e-4), 200 held-out questions: LLaVA colour 0.97, shape 0.19 (chance: not learned, so no
# shape floor). The floor sits below the measurement by over 3 standard deviations of a 30-question
# sample and above what naming any colour present in the scene gives (about 0.5 over 1-4 objects).
LLAVA_FLOOR = {"color": 0.8}
# Qwen2.5-VL (800 x 16 steps at 1e-3), 90 held-out GUI questions: menu open in an earlier screenshot
# 0.87 (yes/no; the majority answer gives 0.60), row 0.27 and check 0.47 (chance, no floor).
QWEN_MENU_FLOOR = 0.7
# HiRED over random keep at budget 0.1, colour questions: 0.86 vs 0.48 in the table (50 questions), a
# margin of 0.38; the floor leaves room for a 30-question sample's spread (about 0.12 per method).
HIRED_MARGIN = 0.15
# Descriptions: the colour-at-place pairs they name that are in the scene, over the scene's objects:
# 0.43 on the 12 scenes below (0.31 on 60); naming present colours at random places gives ~0.11.
DESCRIBE_FLOOR = 0.25
# The shipped draft, default tree: 5.7, 4.9 and 3.9 tokens per target pass on the 3 scenes below.
DRAFT_TAU_FLOOR = 3.0


@pytest.fixture(scope="module")
def llava():
    return micro_vlm.load("llava")


def test_shipped_llava_reaches_its_accuracy_floor(llava):
    model, processor = llava
    assert type(trained.load("llava")).__name__ == "LlavaForConditionalGeneration"  # the registry's loader
    accuracy = micro_vlm.accuracy(model, processor, micro_vlm.held_out_set("llava", 60))
    for kind, floor in LLAVA_FLOOR.items():
        assert accuracy[kind] >= floor, accuracy


def test_shipped_qwen25_vl_learned_the_menu_question():
    """Qwen2.5-VL (the GUI-KV target) answers whether the menu is open in an earlier screenshot; the
    row and check-box questions are at chance (no floor)."""
    model, processor = micro_vlm.load("qwen2.5-vl")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    samples = held_out("gui", 30, kinds=["menu"])
    accuracy = micro_vlm.accuracy(model, processor, samples)
    assert accuracy["menu"] >= QWEN_MENU_FLOOR, accuracy


def test_cache_eviction_keeps_one_token_answers_at_a_tenth_of_the_cache(llava):
    # GUI-KV evicts after the prefill, so a colour name (one token) comes out of the unpruned prefill;
    # only what follows reads the cache: the answer's end (at budget 0.05 answers no longer end) and
    # the later tokens of a shape name such as "triangle" (there eviction does change answers).
    model, processor = llava
    samples = held_out("scene", 16, kinds=["color"], size=micro_vlm.scene_size("llava"))
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


def test_attention_guided_pruning_beats_random_keep_at_a_tenth_of_the_tokens(llava):
    """The docs' table claim, at a fixed seed: keeping 8 of 81 visual tokens, HiRED (CLS attention)
    answers colour questions far better than random keep (table, 50 questions: 0.86 vs 0.48)."""
    model, processor = llava
    samples = held_out("scene", 30, kinds=["color"], size=micro_vlm.scene_size("llava"))
    hired, random_keep = evaluate_task(model, processor, [("hired", 0.1), ("random", 0.1)], samples, timing_samples=1)
    assert hired.visual_kept == random_keep.visual_kept < 10
    assert hired.accuracy >= random_keep.accuracy + HIRED_MARGIN, (hired, random_keep)


def test_shipped_llava_describes_scenes(llava):
    """The second training phase: "Describe the picture." answers in the description's language
    (a/size/colour/shape/"at the"/place, joined by "and") and names objects that are in the scene."""
    model, processor = llava
    samples = held_out("scene", 12, kinds=["describe"], size=micro_vlm.scene_size("llava"))
    named, found, objects = 0, 0, 0
    for text, sample in zip(micro_vlm.answer(model, processor, samples, max_new_tokens=80), samples):
        pairs = set()
        for part in text.split(" and "):
            article, size, colour, shape, place = part.split(" ", 4)
            assert (article, size, colour, shape) in {
                ("a", s, c, h) for s in ("small", "large") for c in COLORS for h in SHAPES
            }, text
            assert place.removeprefix("at the ") in PLACES, text
            pairs.add((colour, place.removeprefix("at the ")))
        truth = {(obj.color, obj.place) for obj in sample.truth.objects}
        named, found, objects = named + len(pairs), found + len(pairs & truth), objects + len(truth)
    assert found / objects >= DESCRIBE_FLOOR, (found, objects, named)


def test_shipped_draft_accepts_and_changes_nothing(llava):
    """SpecVLM with the shipped draft: the greedy description of generate(), in fewer target passes
    (the oracle: generate() itself; a draft that accepted nothing would give 1 token per pass)."""
    from hasten.speculative import speculative_generate
    from hasten.tiny.vlms import chat_prompt

    model, processor = llava
    draft = micro_vlm.load_draft(model)
    accepted = []
    for sample in held_out("scene", 3, kinds=["describe"], size=micro_vlm.scene_size("llava")):
        inputs = processor(images=sample.images, text=[chat_prompt(processor, sample.question)], return_tensors="pt")
        reference = model.generate(**inputs, max_new_tokens=48, do_sample=False)
        output, stats = speculative_generate(model, inputs, draft, max_new_tokens=48)
        assert torch.equal(output, reference)
        accepted.append(stats.mean_accepted)
    assert sum(accepted) / len(accepted) >= DRAFT_TAU_FLOOR, accepted


def test_a_fine_tune_starts_from_its_init_and_trains_only_its_kinds(tmp_path, monkeypatch):
    base = micro_vlm.train("llava", tmp_path / "base", steps=1, batch_size=2, progress=False)
    seen = []
    real = micro_vlm._train_sample
    monkeypatch.setattr(micro_vlm, "_train_sample", lambda *a: seen.append(real(*a).kind) or real(*a))
    tuned = micro_vlm.train(
        "llava", tmp_path / "tuned", steps=1, batch_size=4, lr=0.0, kinds=("describe",), init=base, progress=False
    )
    a, _ = micro_vlm.load_folder(base)
    b, _ = micro_vlm.load_folder(tuned)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # lr 0: the init
    assert seen == ["describe"] * 4
    with pytest.raises(ValueError, match="kinds"):
        micro_vlm.train("llava", tmp_path / "bad", steps=1, kinds=("menu",))
    with pytest.raises(ValueError, match="init"):
        micro_vlm.train("llava", tmp_path / "bad", steps=1, init=tmp_path / "nowhere")


def test_the_two_phase_llava_command_resumes_the_phase_that_was_interrupted(tmp_path, monkeypatch):
    from hasten.tiny.trained import CHECKPOINT

    calls = []
    monkeypatch.setattr(micro_vlm, "train", lambda name, out, **options: calls.append((out.name, options["resume"])))
    with pytest.raises(ValueError, match="no checkpoint"):
        micro_vlm.train_llava(tmp_path, resume=True, progress=False)
    (tmp_path / "answers").mkdir()
    (tmp_path / "answers" / CHECKPOINT).touch()  # interrupted in the first phase
    micro_vlm.train_llava(tmp_path, resume=True, progress=False)
    assert calls == [("answers", True), (tmp_path.name, False)]
    calls.clear()
    (tmp_path / "answers" / "model").mkdir()
    (tmp_path / "answers" / "model" / "config.json").touch()  # first phase done, second interrupted
    (tmp_path / CHECKPOINT).touch()
    micro_vlm.train_llava(tmp_path, resume=True, progress=False)
    assert calls == [(tmp_path.name, True)]


def test_the_draft_command_refuses_to_mix_runs(tmp_path):
    (tmp_path / "used" / "checkpoint").mkdir(parents=True)
    with pytest.raises(ValueError, match="resume"):
        micro_vlm.train_llava_draft(tmp_path / "used", steps=1, progress=False)
    with pytest.raises(ValueError, match="no checkpoint"):
        micro_vlm.train_llava_draft(tmp_path / "fresh", steps=1, resume=True, progress=False)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="name"):
        micro_vlm.build("blip")
    with pytest.raises(ValueError, match="steps"):
        micro_vlm.train("llava", tmp_path, steps=0)
    with pytest.raises(ValueError, match="resume"):
        micro_vlm.train("llava", tmp_path / "none", steps=1, resume=True)
    with pytest.raises(ValueError, match="config.json"):
        micro_vlm.load_folder(tmp_path)
