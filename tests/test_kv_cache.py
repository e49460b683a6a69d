"""Mixed-precision KV cache and ZipVL on the tiny VLMs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hasten import tiny
from hasten.kernels.kv_quant import packed_bytes
from hasten.tiny.vlms import chat_prompt
from hasten.token_pruning import ZipVL
from hasten.token_pruning.kv_cache import MixedPrecisionConfig, MixedPrecisionLayer, mixed_precision_cache
from hasten.token_pruning.scoring import mass_count, normalized_probe_attention, probe_queries
from hasten.transformers_conventions import cache_keyword, output_cache


def _image(seed: int, height: int = 48, width: int = 64) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def _inputs(processor, images, questions):
    return processor(images=images, text=[chat_prompt(processor, q) for q in questions], return_tensors="pt",
                     padding=True)


def _generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kwargs)


# --- the cache layer -------------------------------------------------------------------------------

def test_byte_count_is_the_formula():
    config = MixedPrecisionConfig(high_bits=4, low_bits=2, residual=4, group=8)
    layer = MixedPrecisionLayer(config)
    keys, values = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 40, 16)
    layer.update(keys, values)
    important = torch.zeros(2, 40, dtype=torch.bool)
    important[0, :16] = True
    important[1, :8] = True
    layer.compress(important)
    expected = 0
    for high in (16, 8):  # row 0: 16 high + 24 low; row 1: 8 high + 32 low
        for count, bits in ((high, 4), (40 - high, 2)):
            padded = -(-count // 8) * 8
            expected += packed_bytes(padded, 16, bits, 8, "channel", lead=3) + packed_bytes(count, 16, bits, 8, "token",
                                                                                             lead=3)
    assert layer.nbytes == expected
    assert layer.get_seq_length() == 40
    out_k, _ = layer.update(torch.randn(2, 3, 1, 16), torch.randn(2, 3, 1, 16))  # a decoding step
    assert out_k.shape == (2, 3, 41, 16) and layer.get_seq_length() == 41


def test_reads_back_each_token_at_its_precision_in_order():
    layer = MixedPrecisionLayer(MixedPrecisionConfig(high_bits=8, low_bits=2, group=8))
    keys = torch.randn(1, 2, 24, 16, generator=torch.Generator().manual_seed(0))
    layer.update(keys, keys.clone())
    important = torch.zeros(1, 24, dtype=torch.bool)
    important[0, ::3] = True
    layer.compress(important)
    read, _ = layer._read()
    error = (read - keys).abs().amax((1, 3))[0]
    assert float(error[important[0]].max()) < 0.1 < float(error[~important[0]].min())


def test_all_16_bit_cache_reproduces_the_full_cache():
    model, processor = tiny.vlm("llava", dtype=torch.float64)
    inputs = _inputs(processor, [_image(0)], ["What is it?"])
    reference = _generate(model, inputs)
    cache = mixed_precision_cache(MixedPrecisionConfig(high_bits=16, low_bits=16, residual=0, recompress_every=2))
    out = _generate(model, inputs, **{cache_keyword(model): cache})
    assert torch.equal(out.sequences, reference.sequences)
    for a, b in zip(out.logits, reference.logits):
        assert torch.equal(a, b)
    assert cache.layers[0]._prefix > 0, "the cache did compress (at 16 bits: a no-op on values)"


@pytest.mark.parametrize("kind", tiny.VLM_KINDS)
def test_generate_runs_with_the_mixed_cache(kind):
    model, processor = tiny.vlm(kind)
    inputs = _inputs(processor, [_image(1)], ["What is it?"])
    full = _generate(model, inputs)
    cache = mixed_precision_cache(MixedPrecisionConfig(residual=2, recompress_every=2, group=8))
    out = _generate(model, inputs, **{cache_keyword(model): cache})
    full_bytes = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in output_cache(full).layers)
    assert out.sequences.shape == full.sequences.shape
    assert sum(layer.nbytes for layer in cache.layers) < full_bytes / 3  # 4-bit codes + scales vs fp32


def test_config_errors():
    with pytest.raises(ValueError, match="high_bits"):
        MixedPrecisionConfig(high_bits=3)
    with pytest.raises(ValueError, match="recompress_every"):
        MixedPrecisionConfig(recompress_every=0)
    with pytest.raises(ValueError, match="key_layout"):
        MixedPrecisionConfig(key_layout="rows")
    layer = MixedPrecisionLayer()
    layer.update(torch.randn(1, 1, 4, 32), torch.randn(1, 1, 4, 32))
    with pytest.raises(ValueError, match="important"):
        layer.compress(torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="cropped"):
        layer.crop(1)


# --- ZipVL ----------------------------------------------------------------------------------------

def test_mass_rule_on_planted_scores():
    scores = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    assert mass_count(scores, 0.5) == 1
    assert mass_count(scores, 0.8) == 2
    assert mass_count(scores, 0.85) == 3
    assert mass_count(scores, 1.0) == 5


def test_probe_attention_is_normalised_by_visibility():
    """Uniform attention gives every key the same normalised score, however many probes see it."""
    valid = torch.ones(1, 40, dtype=torch.bool)
    probes = probe_queries(valid, 0.05, seed=1)[0]
    assert len(probes) == 4 and int(probes[-1]) == 39 and int(probes[-2]) == 38
    query, key = torch.zeros(2, 40, 8), torch.zeros(2, 40, 8)  # equal logits: uniform rows
    scores = normalized_probe_attention(query, key, probes, 1.0, valid[0])
    seen = scores[: int(probes[0]) + 1]
    torch.testing.assert_close(seen, torch.full_like(seen, float(scores[0])))


@pytest.mark.parametrize("kind", tiny.VLM_KINDS)
def test_zipvl_at_tau_1_and_16_bits_is_the_unpruned_model(kind):
    model, processor = tiny.vlm(kind, dtype=torch.float64)
    inputs = _inputs(processor, [_image(2), _image(3, 40, 40)], ["What is it?", "Describe the picture in detail."])
    reference = _generate(model, inputs)
    method = ZipVL(tau=1.0, cache=MixedPrecisionConfig(high_bits=16, low_bits=16))
    with method.apply(model):
        out = _generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, reference.logits))
    assert method.stats.layer_important == [1.0] * len(model.model.language_model.layers)
    with torch.no_grad():  # detached: the original attention implementation is back
        assert model.model.language_model.config._attn_implementation == "sdpa"


def test_zipvl_sparse_prefill_equals_masking_the_unimportant_keys():
    """With 16-bit storage, ZipVL's prefill logits equal attention that masks every layer's
    unimportant keys (the flags it recorded), i.e. the gathered attention is exact."""
    model, processor = tiny.vlm("llava", dtype=torch.float64)
    inputs = _inputs(processor, [_image(4)], ["What is it?"])
    method = ZipVL(tau=0.6, cache=MixedPrecisionConfig(high_bits=16, low_bits=16))
    recorded = {}
    original = method.important

    def important(query, key, scaling):
        flags = original(query, key, scaling)
        recorded[len(recorded)] = flags
        return flags

    method.important = important
    with method.apply(model), torch.no_grad():
        pruned = model(**inputs).logits
    assert 0.0 < min(method.stats.layer_important) < 1.0
    layers = model.model.language_model.layers

    def hook_for(index):
        def mask_hook(module, args, kwargs):
            n = recorded[index].shape[1]
            allowed = torch.ones(n, n, dtype=torch.bool).tril() & recorded[index][0][None]
            kwargs["attention_mask"] = torch.zeros(1, 1, n, n, dtype=torch.float64).masked_fill(
                ~allowed, torch.finfo(torch.float64).min)
            return args, kwargs
        return mask_hook

    handles = [layer.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            reference = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(pruned, reference, rtol=1e-7, atol=1e-7)


def test_zipvl_defaults_shrink_the_cache_below_a_third_of_16_bit():
    model, processor = tiny.vlm("llava", dtype=torch.bfloat16)
    inputs = _inputs(processor, [_image(5)], ["What is it?"])
    with ZipVL(tau=0.5).apply(model) as method, torch.no_grad():
        model(**inputs, use_cache=True)
    layers = len(model.model.language_model.layers)
    sixteen_bit = 2 * layers * inputs["input_ids"].shape[1] * 2 * 16 * 2  # K and V, 2 kv heads x 16 dims, 2 bytes
    assert method.stats.kv_cache_bytes < sixteen_bit / 3


@pytest.mark.parametrize("kwargs, name", [(dict(tau=0.0), "tau"), (dict(tau=1.5), "tau"),
                                          (dict(budget=0.0), "budget"), (dict(probe_fraction=0.9), "probe_fraction"),
                                          (dict(renumber=True), "renumber")])
def test_zipvl_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ZipVL(**kwargs)


def test_fused_decode_equals_dequantising_the_cache():
    model, processor = tiny.vlm("qwen2-vl", dtype=torch.float64)
    inputs = _inputs(processor, [_image(6), _image(7, 40, 40)], ["What is it?", "Describe the picture in detail."])
    outs = {}
    for fused in (False, True):
        with ZipVL(tau=0.7, fused_decode=fused).apply(model):
            outs[fused] = _generate(model, inputs)
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    for a, b in zip(outs[True].logits, outs[False].logits):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
