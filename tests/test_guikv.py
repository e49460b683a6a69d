"""GUI-KV on synthetic GUI trajectories: exact decoding against per-head masking, planted redundancy."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hasten import tiny
from hasten.tiny.gui import GUIState, render, trajectory
from hasten.tiny.vlms import chat_prompt
from hasten.token_pruning import GUIKV
from hasten.token_pruning.scoring import subspace_residuals, z_saliency

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from guikv_gqa import official_sets  # noqa: E402  (the reference rule, shared with the GQA benchmark)


def test_trajectory_changes_little_between_steps():
    import numpy as np

    shots, actions = trajectory(steps=5, size=(160, 120), seed=1)
    assert len(shots) == 5 and len(actions) == 4
    for before, after in zip(shots, shots[1:]):
        changed = (np.asarray(before) != np.asarray(after)).any(-1).mean()
        assert changed < 0.25, "a step changes a small part of the screen"
    assert render(GUIState(), (80, 60)).size == (80, 60)
    with pytest.raises(ValueError, match="steps"):
        trajectory(steps=0)


def test_a_repeated_screenshot_has_zero_residual_and_goes_first():
    generator = torch.Generator().manual_seed(0)
    current = torch.randn(2, 12, 32, generator=generator)
    different = torch.randn(2, 12, 32, generator=generator)
    residual = subspace_residuals(current, torch.cat([current, different], 1), rank=32)
    assert float(residual[:, :12].max()) < 1e-4
    assert float(residual[:, 12:].min()) > 0.1
    # GUI-KV zeroes the (1 - budget) most redundant earlier tokens: here exactly the repeats.
    redundant = residual.topk(12, dim=-1, largest=False).indices
    assert bool((redundant < 12).all())


def test_saliency_raises_planted_high_norm_tokens():
    norms = torch.ones(20)
    norms[[3, 11]] = 5.0
    saliency = z_saliency(norms, 3.5)
    assert set(saliency.topk(2).indices.tolist()) == {3, 11}
    torch.testing.assert_close(saliency.sum(), torch.tensor(1.0))


def _inputs(processor, shots, steps):
    return processor(
        images=shots, text=[chat_prompt(processor, "What is the next action?", images=steps)], return_tensors="pt"
    )


@pytest.mark.parametrize("kind", ["llava", "qwen2.5-vl"])
def test_decoding_equals_per_head_masking_of_the_dropped_tokens(kind):
    """Every generated token at every layer and head sees exactly that head's kept prompt tokens."""
    model, processor = tiny.vlm(kind, dtype=torch.float64)
    shots, _ = trajectory(steps=3, size=(48, 40), seed=2)
    inputs = _inputs(processor, shots, 3)
    method = GUIKV(budget=0.3, rank=4)
    with method.apply(model):
        out = model.generate(
            **inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    kept = [slots[0] for slots in method.stats.kv_kept_positions]  # per layer (kv_heads, slots)
    length = inputs["input_ids"].shape[1]
    # the reference's budget: int(L * budget) entries per head over ALL prompt tokens, window included
    assert all(tuple(slots.shape) == (slots.shape[0], int(0.3 * length)) for slots in kept)
    assert all(
        bool((slots[:, -method.window :] == torch.arange(length - method.window, length)).all()) for slots in kept
    ), "the last `window` prompt tokens are always kept"
    full = dict(inputs)
    full["input_ids"] = out.sequences[:, :-1]
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    if "mm_token_type_ids" in full:
        extra = full["input_ids"].shape[1] - length
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, extra, dtype=torch.long)], 1)
    layers = model.model.language_model.layers
    heads = model.config.text_config.num_attention_heads

    def hook_for(index):
        def mask_hook(module, args, kwargs):
            size = (args[0] if args else kwargs["hidden_states"]).shape[1]
            visible = torch.zeros(kept[index].shape[0], size, dtype=torch.bool)
            visible.scatter_(1, kept[index], True)
            visible[:, length:] = True
            causal = torch.ones(size, size, dtype=torch.bool).tril()
            prompt_rows = torch.arange(size)[:, None] < length
            allowed = causal & (prompt_rows | visible[:, None, :])  # (kv_heads, size, size)
            allowed = allowed.repeat_interleave(heads // allowed.shape[0], 0)[None]
            kwargs["attention_mask"] = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(
                ~allowed, torch.finfo(torch.float64).min
            )
            return args, kwargs

        return mask_hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            teacher = model(**full).logits
    finally:
        for handle in handles:
            handle.remove()
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0].double(), teacher[0, length - 1 + step], rtol=1e-6, atol=1e-6)


def test_batch_of_two_trajectories_matches_each_alone():
    model, processor = tiny.vlm("qwen2.5-vl", dtype=torch.float64)
    first, _ = trajectory(steps=3, size=(48, 40), seed=4)
    second, _ = trajectory(steps=2, size=(40, 40), seed=5)
    prompts = [chat_prompt(processor, "Next action?", images=3), chat_prompt(processor, "What now, agent?", images=2)]
    batch = processor(images=first + second, text=prompts, return_tensors="pt", padding=True)
    with GUIKV(budget=0.25).apply(model) as method:
        together = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
        kept_together = list(method.stats.visual_tokens_kept)
    for index, (shots, prompt) in enumerate(((first, prompts[0]), (second, prompts[1]))):
        alone = processor(images=shots, text=[prompt], return_tensors="pt")
        with GUIKV(budget=0.25).apply(model) as method:
            single = model.generate(**alone, max_new_tokens=4, do_sample=False)[:, alone["input_ids"].shape[1] :]
        assert torch.equal(together[index], single[0])
        assert method.stats.visual_tokens_kept == [kept_together[index]]


def test_one_screenshot_and_full_budget():
    model, processor = tiny.vlm("qwen2.5-vl")
    shots, _ = trajectory(steps=1, size=(48, 40))
    inputs = _inputs(processor, shots, 1)
    reference = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with GUIKV(budget=1.0).apply(model):
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), reference)
    with GUIKV(budget=0.5).apply(model) as method:  # no earlier screenshot: no temporal term
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    length = inputs["input_ids"].shape[1]
    assert all(slots.shape[-1] == int(0.5 * length) for slots in method.stats.kv_kept_positions)


@pytest.mark.parametrize("kind", ["llava", "qwen2.5-vl"])
@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_kept_entries_equal_the_reference_rule_on_eager_attention(kind, alpha):
    model, processor = tiny.vlm(kind, dtype=torch.float64, attn_implementation="eager")
    shots, _ = trajectory(steps=1, size=(48, 40), seed=3)
    inputs = _inputs(processor, shots, 1)
    expected = official_sets(model, inputs, budget=0.3, alpha=alpha, per_kv_head=True)
    with GUIKV(budget=0.3, alpha=alpha).apply(model) as method:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    for layer, (ours, theirs) in enumerate(zip(method.stats.kv_kept_positions, expected)):
        assert torch.equal(ours[0], theirs), f"layer {layer}"


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(budget=0.0), "budget"),
        (dict(window=0), "window"),
        (dict(temperature=0), "temperature"),
        (dict(rank=0), "rank"),
        (dict(renumber=True), "renumber"),
    ],
)
def test_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GUIKV(**kwargs)
