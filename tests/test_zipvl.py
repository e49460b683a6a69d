"""ZipVL on the trained micro-world LLaVA: the sparse prefill must leave the answer's own row
attended (the last prompt token is always important), so that at budget 1.0 ZipVL reproduces
(nearly) the unpruned answers."""

from __future__ import annotations

import pytest
import torch

from hasten.tiny import micro_vlm
from hasten.token_pruning import ZipVL
from hasten.token_pruning.kv_cache import MixedPrecisionConfig


@pytest.fixture(scope="module")
def llava():
    return micro_vlm.load("llava")


def _last_row_attention_norms(model, inputs, method) -> torch.Tensor:
    """``(layers, batch)``: the norm of each decoder layer's attention output (the input of
    ``o_proj``) at the last prompt position, in one prefill with ``method`` attached."""
    layers = model.model.language_model.layers
    norms = []

    def hook(module, args):
        norms.append(args[0][:, -1].norm(dim=-1))

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(hook) for layer in layers]
    try:
        with method.apply(model), torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(norms)


def test_the_last_prompt_token_is_attended_in_every_layer(llava):
    # Independent of ZipVL's flags: read the model's own attention output at the position the first
    # answer token comes from. Before the fix, that row was outside the important set (chosen as a
    # key by its probe score) in most layers and got a zero output.
    model, processor = llava
    samples = micro_vlm.held_out_set("llava", 8)
    inputs = micro_vlm._inputs(processor, samples, micro_vlm.prompts(processor, samples))  # left padded
    sixteen_bits = MixedPrecisionConfig(high_bits=16, low_bits=16, residual=0)
    norms = _last_row_attention_norms(model, inputs, ZipVL(cache=sixteen_bits))
    dense = _last_row_attention_norms(model, inputs, ZipVL(tau=1.0, cache=sixteen_bits))
    assert (norms > 0.05 * dense).all(), norms / dense
    # and the sparse prefill is still sparse: other rows do lose their attention
    sparse = ZipVL(cache=sixteen_bits)
    with sparse.apply(model), torch.no_grad():
        model(**inputs)
    assert min(sparse.stats.layer_important) < 0.95


def test_zipvl_at_budget_1_keeps_the_unpruned_answers(llava):
    # Measured on 100 held-out questions (benchmarks/results/vlm_pruning-trained-cpu.txt): agreement
    # with the unpruned answers 0.32 before the last prompt token was kept important; the rest of the
    # disagreement is the sparse prefill's and the 4/2-bit cache's real cost.
    model, processor = llava
    samples = micro_vlm.held_out_set("llava", 16)
    unpruned = micro_vlm.answer(model, processor, samples, max_new_tokens=2)  # answer + EOS
    with ZipVL().apply(model):
        pruned = micro_vlm.answer(model, processor, samples, max_new_tokens=2)
    agreement = sum(a == b for a, b in zip(pruned, unpruned)) / len(samples)
    assert agreement >= 0.8, list(zip(unpruned, pruned))


def test_the_table_bound_counts_zipvl_sparse_prefill():
    # evaluate's prefill-FLOPs bound: ZipVL keeps every token in the projections and the MLP, and
    # its attention term shrinks to the pairs it attends (plus its probes' scoring, at half cost).
    from hasten import tiny
    from hasten.tiny.vlms import chat_prompt
    from hasten.token_pruning.evaluate import _flops_ratio, _layer_flops

    model, processor = tiny.vlm("llava")
    image = micro_vlm.held_out_set("llava", 1)[0].images[0]
    inputs = processor(images=[image], text=[chat_prompt(processor, "What is it?")], return_tensors="pt")
    ratios = {}
    for name, method in (
        ("dense", ZipVL(tau=1.0)),
        ("sparse", ZipVL(tau=0.5)),
        ("probes only", ZipVL(tau=0.5, sparse_prefill="dense")),
    ):
        with method.apply(model), torch.no_grad():
            model(**inputs)
        ratios[name] = _flops_ratio(model.config, method.stats, method)
        pairs, probes, dense = (method.attention[k] for k in ("pairs", "probe_pairs", "dense_pairs"))
    n = inputs["input_ids"].shape[1]
    assert ratios["dense"] == 1.0
    linear, attention = _layer_flops(model.config, n)
    layers = len(pairs)
    expected = sum(linear + attention * (1 + q / 2 / d) for q, d in zip(probes, dense)) / (
        layers * (linear + attention)
    )
    assert ratios["probes only"] == pytest.approx(expected) and ratios["probes only"] > 1.0
    assert ratios["sparse"] < ratios["probes only"]
