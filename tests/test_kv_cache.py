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
from hasten.token_pruning.scoring import mass_count, normalized_probe_attention, probe_attention, probe_queries
from hasten.token_pruning.zipvl import block_verdict, select_important
from hasten.transformers_conventions import cache_keyword, output_cache


def _image(seed: int, height: int = 48, width: int = 64) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def _inputs(processor, images, questions):
    return processor(
        images=images, text=[chat_prompt(processor, q) for q in questions], return_tensors="pt", padding=True
    )


def _generate(model, inputs, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs
    )


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
            expected += packed_bytes(padded, 16, bits, 8, "channel", lead=3) + packed_bytes(
                count, 16, bits, 8, "token", lead=3
            )
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


def test_probes_are_64_recent_and_64_random_by_default():
    """ZipVL's 64 + 64 probe queries; ZipCache's 5% + 5% (hasten's former default) as the option."""
    valid = torch.zeros(2, 400, dtype=torch.bool)
    valid[0, 20:] = True  # 380 real tokens (left padding)
    valid[1, 300:] = True  # 100 real tokens: all of them probe
    long, short = probe_queries(valid, seed=3)
    assert len(long) == 128 and torch.equal(long[-64:], torch.arange(336, 400))
    assert bool((long[:64] >= 20).all() and (long[:64] < 336).all())
    assert torch.equal(short, torch.arange(300, 400))
    fraction = probe_queries(valid, 0.05, seed=3)[0]
    assert len(fraction) == 38 and torch.equal(fraction[-19:], torch.arange(381, 400))
    assert ZipVL().probe_fraction is None and (ZipVL().probe_recent, ZipVL().probe_random) == (64, 64)


def test_important_count_uses_column_sums_and_the_choice_normalised_scores():
    """ZipVL Eqs. 6-8 on a planted probe attention. Probes at positions 2 and 5 (rows sum to 1):
    column sums [.15 .15 .85 .05 .45 .35] (total 2), normalised by visibility [2 2 2 1 1 1]:
    [.075 .075 .425 .05 .45 .35]. tau = 0.4: Eq. 6 needs 0.8 of the sums -> p = 1 (0.85); the one
    token is the top NORMALISED score, position 4 (0.45), not position 2. Counting on the normalised
    scores (hasten's former rule) needs 0.57 of 1.425 -> p = 2 (0.45 + 0.425)."""
    attention = torch.tensor([[0.10, 0.10, 0.80, 0.00, 0.00, 0.00], [0.05, 0.05, 0.05, 0.05, 0.45, 0.35]])
    visible = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    sums, seen = attention.sum(0), visible.sum(0)
    assert select_important(sums, seen, 0.4).tolist() == [4]
    assert select_important(sums, seen, 0.4, "normalized").tolist() == [2, 4]
    assert select_important(sums, seen, 0.6).tolist() == [2, 4]  # 0.85 + 0.45 >= 1.2
    assert select_important(sums, seen, 0.4, cap=1).tolist() == [4]
    with pytest.raises(ValueError, match="count_scores"):
        select_important(sums, seen, 0.4, "raw")


def test_zipvl_counts_on_column_sums_by_default():
    """ZipVL.important (prompt tokens of one layer) follows select_important with Eq. 6's count."""
    generator = torch.Generator().manual_seed(0)
    query, key = torch.randn(1, 4, 200, 16, generator=generator) * 3, torch.randn(1, 2, 200, 16, generator=generator)
    valid = torch.ones(1, 200, dtype=torch.bool)
    counts = {}
    for rule in ("column_sums", "normalized"):
        method = ZipVL(tau=0.9, count_scores=rule)
        method._state = dict(valid=valid, probes=probe_queries(valid, seed=0))
        flags = method.important(query, key, 0.25)[0]
        sums, seen = probe_attention(query[0], key[0], method._state["probes"][0], 0.25, valid[0])
        expected = torch.zeros(200, dtype=torch.bool)
        expected[select_important(sums, seen, 0.9, rule)] = True
        expected[0] = True  # the attention sink
        expected[-1] = True  # the last prompt token (its row gives the next token)
        assert torch.equal(flags, expected)
        counts[rule] = int(flags.sum())
    assert counts["column_sums"] < counts["normalized"]
    assert ZipVL().count_scores == "column_sums"


def _fixed_flags(method, every: int = 3):
    """Make ``method`` flag every ``every``-th real token (and the first) important in every layer."""
    recorded = {}

    def important(query, key, scaling):
        valid = method._state["valid"]
        flags = torch.zeros_like(valid)
        for row in range(valid.shape[0]):
            positions = valid[row].nonzero()[:, 0]
            flags[row, positions[::every]] = True
        recorded[len(recorded)] = flags
        return flags

    method.important = important
    return recorded


def test_prefill_attends_the_important_pairs_only():
    """Attention pairs (and FLOPs) of the prefill: the paper's Attention(Q[T], K[T], V[T]) costs
    p(p+1)/2 causal pairs per layer; hasten's former rule (every query over the important keys)
    sum_i |{j in T, j <= i}|; the dense attention n(n+1)/2."""
    model, processor = tiny.vlm("llava", dtype=torch.float64)
    inputs = _inputs(processor, [_image(4)], ["What is it?"])
    n = inputs["input_ids"].shape[1]
    important = torch.arange(0, n, 3)
    p = len(important)
    keys_pairs = sum(int((important <= i).sum()) for i in range(n))
    layers = len(model.model.language_model.layers)
    text = model.config.text_config
    width = text.num_attention_heads * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    flops = {}
    for variant, pairs in (("important", p * (p + 1) // 2), ("keys", keys_pairs), ("dense", n * (n + 1) // 2)):
        method = ZipVL(tau=0.6, sparse_prefill=variant)
        _fixed_flags(method)
        with method.apply(model), torch.no_grad():
            model(**inputs)
        assert method.attention["pairs"] == [pairs] * layers, variant
        assert method.attention["dense_pairs"] == [n * (n + 1) // 2] * layers
        flops[variant] = method.prefill_flops()
        assert flops[variant]["sparse"] == 4 * width * pairs * layers
        assert flops[variant]["dense"] == 4 * width * n * (n + 1) // 2 * layers
    assert flops["important"]["sparse"] < flops["keys"]["sparse"] < flops["dense"]["sparse"]
    assert ZipVL().sparse_prefill == "important"


def _zipvl_prefill_recording_flags(**kwargs):
    """A 16-bit ZipVL prefill on the tiny LLaVA (tau 0.6, ``kwargs`` for ZipVL) that records each
    layer's important-token flags: (model, inputs, prefill logits, {layer: flags})."""
    model, processor = tiny.vlm("llava", dtype=torch.float64)
    inputs = _inputs(processor, [_image(4)], ["What is it?"])
    method = ZipVL(tau=0.6, cache=MixedPrecisionConfig(high_bits=16, low_bits=16), **kwargs)
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
    return model, inputs, pruned, recorded


def test_zipvl_sparse_prefill_is_attention_among_the_important_tokens():
    """With 16-bit storage, ZipVL's prefill logits equal the model run with every layer's attention
    masked to important queries x important keys (causal) and the other rows' attention output
    zeroed before o_proj: Algorithm 1's Attention(Q[T], K[T], V[T]), gathered exactly."""
    model, inputs, pruned, recorded = _zipvl_prefill_recording_flags()
    layers = model.model.language_model.layers

    def mask_hook(index):
        def hook(module, args, kwargs):
            flags = recorded[index][0]
            n = flags.shape[0]
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            allowed = torch.where(flags[:, None], causal & flags[None], causal)  # rows outside T: zeroed below
            kwargs["attention_mask"] = torch.zeros(1, 1, n, n, dtype=torch.float64).masked_fill(
                ~allowed, torch.finfo(torch.float64).min
            )
            return args, kwargs

        return hook

    def zero_rows(index):
        def hook(module, args):
            return (args[0] * recorded[index][0][None, :, None],)

        return hook

    handles = [layer.register_forward_pre_hook(mask_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.self_attn.o_proj.register_forward_pre_hook(zero_rows(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            reference = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(pruned, reference, rtol=1e-7, atol=1e-7)


def test_zipvl_sparse_prefill_keys_equals_masking_the_unimportant_keys():
    """hasten's former rule (sparse_prefill="keys"), with 16-bit storage: the prefill logits equal
    attention that masks every layer's unimportant keys (the flags it recorded) for every query."""
    model, inputs, pruned, recorded = _zipvl_prefill_recording_flags(sparse_prefill="keys")
    layers = model.model.language_model.layers

    def hook_for(index):
        def mask_hook(module, args, kwargs):
            n = recorded[index].shape[1]
            allowed = torch.ones(n, n, dtype=torch.bool).tril() & recorded[index][0][None]
            kwargs["attention_mask"] = torch.zeros(1, 1, n, n, dtype=torch.float64).masked_fill(
                ~allowed, torch.finfo(torch.float64).min
            )
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


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(tau=0.0), "tau"),
        (dict(tau=1.5), "tau"),
        (dict(budget=0.0), "budget"),
        (dict(probe_fraction=0.9), "probe_fraction"),
        (dict(probe_recent=0), "probe_recent"),
        (dict(probe_random=-1), "probe_random"),
        (dict(count_scores="raw"), "count_scores"),
        (dict(sparse_prefill=True), "sparse_prefill"),
        (dict(split_generated="yes"), "split_generated"),
        (dict(renumber=True), "renumber"),
    ],
)
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


def test_block_verdict_is_the_mass_rule_on_the_current_querys_attention():
    probabilities = torch.tensor([[0.02, 0.30, 0.01, 0.25, 0.02], [0.1, 0.1, 0.1, 0.1, 0.1]])
    flags = block_verdict(probabilities, 0.9)  # row 0: 0.30 + 0.25 = 0.55 >= 0.9 * 0.60 -> 2 tokens
    assert flags[0].tolist() == [False, True, False, True, False]
    assert int(flags[1].sum()) == 5  # uniform: 4 tokens hold 0.8 < 0.9 of the mass
    assert block_verdict(probabilities, 0.5)[0].tolist() == [False, True, False, False, False]  # 0.30 >= 0.30


@pytest.mark.parametrize("fused", [False, True])
def test_generated_blocks_are_split_by_the_current_querys_attention(fused):
    """ZipVL: every `recompress_every` generated tokens (m = 4, 8 here; 100 by default) the block is
    compressed whole (no full-precision window), important tokens at 4 bits and the others at 2,
    as the mass rule on the attention of the query of that step says. split_generated=False
    (hasten's former rule) stores the blocks at 4 bits only."""
    model, processor = tiny.vlm("qwen2-vl", dtype=torch.float64)
    inputs = _inputs(processor, [_image(8)], ["What is it?"])
    n = inputs["input_ids"].shape[1]
    blocks = {}
    for split in (True, False):
        method = ZipVL(
            tau=0.5,
            fused_decode=fused,
            split_generated=split,
            cache=MixedPrecisionConfig(residual=0, recompress_every=4, group=8),
        )
        with method.apply(model), torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=11, min_new_tokens=11, do_sample=False, return_dict_in_generate=True
            )
        layer = output_cache(out).layers[0]
        assert layer._prefix == n + 8 and layer.keys.shape[-2] == 10 - 8  # 10 generated tokens cached
        decoded = [(slots, segment) for slots, segment in layer._rows[0] if int(slots.min()) >= n]
        assert sorted(int(t) for slots, _ in decoded for t in slots) == list(range(n, n + 8))
        blocks[split] = sorted(segment.keys.bits for _, segment in decoded)
    assert 2 in blocks[True] and 4 in blocks[True]
    assert blocks[False] == [4, 4]
    defaults = ZipVL()
    assert defaults.split_generated and (defaults.cache.residual, defaults.cache.recompress_every) == (0, 100)


def test_block_verdict_sees_the_attention_of_the_step_that_fills_the_block(monkeypatch):
    """At m = 4 each layer passes block_verdict the step's query attention over the block (softmax over
    the whole cache, head-averaged): the fused decode (window keys + the merged log-sum-exp) and the
    dequantised read (every key) give the same probabilities, and the flags follow the mass rule."""
    from hasten.token_pruning import zipvl

    model, processor = tiny.vlm("llava", dtype=torch.float64)
    inputs = _inputs(processor, [_image(9)], ["What is it?"])
    layers = len(model.model.language_model.layers)
    seen = {}
    original = zipvl.block_verdict
    for fused in (False, True):
        calls = seen[fused] = []

        def spy(probabilities, tau, calls=calls):
            flags = original(probabilities, tau)
            calls.append((probabilities.clone(), flags))
            return flags

        monkeypatch.setattr(zipvl, "block_verdict", spy)
        method = ZipVL(tau=0.5, fused_decode=fused, cache=MixedPrecisionConfig(residual=0, recompress_every=4, group=8))
        with method.apply(model), torch.no_grad():
            model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert len(calls) == layers  # one block of 4, once per layer
    for (dequantised, flags), (fused, _) in zip(seen[False], seen[True]):
        torch.testing.assert_close(fused, dequantised, rtol=1e-4, atol=1e-6)
        assert dequantised.shape == (1, 4) and 0.0 < float(dequantised.sum()) <= 1.0
        kept = dequantised[flags]
        assert float(kept.sum()) >= 0.5 * float(dequantised.sum()) - 1e-12
        if bool((~flags).any()):
            assert float(kept.min()) >= float(dequantised[~flags].max())
