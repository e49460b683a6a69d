"""Speculative Jacobi Decoding: exactness (greedy), losslessness (sampling), cache, counting, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from hasten import tiny
from hasten.pipelines import SJDConfig, SJDPipeline
from hasten.tiny.ar_image import janus_config
from hasten.transformers_conventions import cache_keyword

SIGNIFICANCE = 0.001  # chi-square tests reject "same distribution" only below this p-value


@pytest.fixture(scope="module", params=tiny.AR_IMAGE_KINDS)
def pipe(request):
    """Each tiny model in float64, so that batched and one-token forwards agree to ~1e-15."""
    pipe = SJDPipeline(*tiny.ar_image_model(request.param, dtype=torch.float64))
    pipe.progress_bar = False
    return pipe


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_greedy_sjd_equals_greedy_autoregressive(pipe, guidance_scale):
    sjd = pipe("a red fox in the snow", sjd=SJDConfig(greedy=True), guidance_scale=guidance_scale, seed=0)
    ar = pipe("a red fox in the snow", sjd=None, greedy=True, guidance_scale=guidance_scale)
    assert torch.equal(sjd.tokens, ar.tokens)
    assert ar.stats.forwards == ar.stats.tokens + 1  # one pass per token plus the prefill
    assert sjd.stats.forwards < ar.stats.forwards
    assert torch.allclose(sjd.images, ar.images)


@pytest.mark.parametrize("init", ["repeat_vertical", "sample_horizontal"])
def test_greedy_equality_holds_for_every_init(pipe, init):
    sjd = pipe("a cat", sjd=SJDConfig(greedy=True, init=init, window=5), guidance_scale=2.0, seed=1)
    ar = pipe("a cat", sjd=None, greedy=True, guidance_scale=2.0)
    assert torch.equal(sjd.tokens, ar.tokens)


def test_a_generator_drives_every_draw_in_place_of_the_seed(pipe):
    sampled = dict(sjd=SJDConfig(window=6), guidance_scale=2.0, decode=False)
    seeded = pipe("a fox", seed=11, **sampled).tokens
    generated = pipe("a fox", generator=torch.Generator(pipe.model.device).manual_seed(11), **sampled).tokens
    other = pipe("a fox", generator=torch.Generator(pipe.model.device).manual_seed(12), **sampled).tokens
    assert torch.equal(seeded, generated) and not torch.equal(seeded, other)
    with pytest.raises(ValueError, match="not both"):
        pipe("a fox", seed=1, generator=torch.Generator(pipe.model.device), **sampled)
    with pytest.raises(ValueError, match="generator"):
        pipe("a fox", generator=11, **sampled)


def test_layout_tokens_are_placed_not_sampled():
    pipe = SJDPipeline(*tiny.ar_image_model("emu3"))
    pipe.progress_bar = False
    out = pipe("a boat", sjd=SJDConfig(), seed=3, height=32, width=48)
    layout = pipe.adapter.layout(32, 48)
    assert (layout.rows, layout.cols) == (4, 6)
    rows = out.tokens.view(4, 7)
    assert (rows[:, -1] == pipe.adapter.eol_id).all()
    assert torch.isin(rows[:, :-1], pipe.adapter.vocab_ids).all()
    assert out.images.shape == (1, 3, 32, 48)


def test_every_model_call_is_counted(pipe):
    calls = []
    handle = pipe.adapter.language_model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        out = pipe(["a fox", "a dog"], sjd=SJDConfig(window=8), seed=0)
        assert out.stats.forwards == len(calls)
        assert out.stats.forwards == sum(s.forwards for s in out.per_image)
        length = pipe.adapter.layout(None, None).length
        assert sum(out.stats.accepted_per_forward) == out.stats.tokens == 2 * length
        assert out.images.shape[0] == 2
        calls.clear()
        batched = pipe(["a fox", "a dog", "a cat"], sjd=SJDConfig(window=8), seed=0, batch_size=2)
    finally:
        handle.remove()
    assert batched.stats.forwards == len(calls)  # two batches; an image's stats are its batch's
    assert batched.per_image[0].forwards == batched.per_image[1].forwards
    assert batched.stats.forwards == batched.per_image[0].forwards + batched.per_image[2].forwards
    assert sum(batched.stats.accepted_per_forward) == batched.stats.tokens == 3 * length
    assert batched.tokens.shape == (3, length) and batched.images.shape[0] == 3


def test_batched_greedy_rows_equal_batch_one(pipe):
    """Three prompts of different lengths (left-padded) in one batch: each row's tokens are the
    batch-1 greedy tokens, and the batch advances by its shortest accepted run."""
    prompts = ["a fox", "an old lighthouse on a cliff at night", "a cat"]
    sjd = SJDConfig(greedy=True, window=6)
    batched = pipe(prompts, sjd=sjd, guidance_scale=2.0, seed=0, batch_size=3, decode=False)
    alone = pipe(prompts, sjd=sjd, guidance_scale=2.0, seed=0, batch_size=1, decode=False)
    assert torch.equal(batched.tokens, alone.tokens)
    assert batched.stats.forwards < len(prompts) * (pipe.adapter.layout(None, None).length + 1)
    slowest = max(len(s.accepted_per_forward) for s in alone.per_image)
    assert len(batched.per_image[0].accepted_per_forward) >= slowest  # shared advance: the slowest row bounds it
    with pytest.raises(ValueError, match="batch_size"):
        pipe("a fox", batch_size=0)


def test_cache_after_rejections_equals_autoregressive_cache(pipe):
    """The cache holds exactly prompt + emitted tokens: no rejected draft's K/V survives.

    (The last token is in it when it was an accepted draft, and missing when it was drawn as a
    replacement or extra token, which the next pass would feed first.)
    """
    out = pipe("a lighthouse", sjd=SJDConfig(window=6), guidance_scale=2.0, temperature=0.2, seed=5, return_cache=True)
    assert max(out.stats.accepted_per_forward) > 1 and len(out.stats.accepted_per_forward) > 1
    adapter = pipe.adapter
    layout = adapter.layout(None, None)
    embeds, mask = adapter.encode_prompt("a lighthouse", None, True, layout)
    fed = out.cache.get_seq_length() - embeds.shape[1]
    assert fed in (layout.length - 1, layout.length)
    span = out.tokens[0, :fed]
    inputs = torch.cat([embeds, adapter.embed(span.expand(embeds.shape[0], -1))], 1)
    full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], len(span))], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    from transformers import DynamicCache

    reference = DynamicCache()
    with torch.no_grad():
        adapter.language_model(
            inputs_embeds=inputs,
            attention_mask=full_mask,
            position_ids=positions,
            **{cache_keyword(adapter.language_model): reference},
            use_cache=True,
        )
    assert out.cache.get_seq_length() == reference.get_seq_length()
    for ours, theirs in zip(out.cache.layers, reference.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=0, atol=1e-9)
        torch.testing.assert_close(ours.values, theirs.values, rtol=0, atol=1e-9)


# --- losslessness ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_janus():
    """A 2 x 2-token Janus with a 4-entry codebook: the joint of its first two tokens has 16 cells."""
    from transformers import JanusForConditionalGeneration

    _, processor = tiny.ar_image_model("janus")
    config = janus_config(processor.tokenizer, grid=2, codebook=4)
    torch.manual_seed(11)
    model = JanusForConditionalGeneration(config).eval().double()
    pipe = SJDPipeline(model, processor)
    pipe.progress_bar = False
    return pipe


@torch.no_grad()
def _exact_first_two(pipe, prompt, scale, temperature):
    """P(x0, x1) computed directly from the model, independently of the decoding loop."""
    model, adapter = pipe.model, pipe.adapter
    embeds, mask = adapter.encode_prompt(prompt, None, scale > 1, adapter.layout(None, None))

    def probs(inputs):
        with torch.no_grad():
            hidden = adapter.language_model(inputs_embeds=inputs).last_hidden_state[:, -1]
        logits = model.model.generation_head(hidden)
        if scale > 1:
            logits = logits[1] + scale * (logits[0] - logits[1])
        return torch.softmax(logits.squeeze(0) / temperature, -1)

    p0 = probs(embeds.detach())
    joint = torch.zeros(4, 4, dtype=torch.float64)
    for x0 in range(4):
        step = adapter.embed(torch.full((embeds.shape[0], 1), x0))
        joint[x0] = p0[x0] * probs(torch.cat([embeds, step], 1))
    return joint.flatten().detach().numpy()


def _chi_square_p(samples: np.ndarray, expected_probs: np.ndarray) -> float:
    counts = np.bincount(samples, minlength=len(expected_probs)).astype(float)
    expected = expected_probs / expected_probs.sum() * counts.sum()
    keep = expected >= 5  # pool the rare cells so the chi-square approximation holds
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return float(scipy_stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("init", ["random", "repeat_horizontal"])
def test_sjd_sampling_matches_the_model_distribution(small_janus, init):
    """Chi-square goodness of fit of SJD's first two tokens to the exact joint, alpha = 0.001."""
    # Random tiny weights give near-uniform logits: a low temperature makes the joint peaked
    # (max cell ~0.4), so uniform random drafts are rejected often.
    scale, temperature, n = 2.0, 0.02, 1000
    exact = _exact_first_two(small_janus, "a red fox", scale, temperature)
    assert exact.max() < 0.9, "a near-deterministic joint would make the test toothless"
    out = small_janus(
        ["a red fox"] * n,
        sjd=SJDConfig(window=4, init=init),
        guidance_scale=scale,
        temperature=temperature,
        seed=2024,
        batch_size=500,
        decode=False,
    )
    first_two = (out.tokens[:, 0] * 4 + out.tokens[:, 1]).numpy()
    assert len(out.per_image[0].accepted_per_forward) > 1, "no rejection: the residual path would go untested"
    assert _chi_square_p(first_two, exact) > SIGNIFICANCE


def test_autoregressive_sampling_matches_the_same_exact_distribution(small_janus):
    scale, temperature = 2.0, 0.02
    exact = _exact_first_two(small_janus, "a red fox", scale, temperature)
    out = small_janus(
        ["a red fox"] * 600,
        sjd=None,
        guidance_scale=scale,
        temperature=temperature,
        seed=7,
        batch_size=300,
        decode=False,
    )
    assert _chi_square_p((out.tokens[:, 0] * 4 + out.tokens[:, 1]).numpy(), exact) > SIGNIFICANCE


@pytest.fixture(scope="module")
def peaked_janus():
    """A 2 x 2-token Janus with a 5-entry codebook whose image head is scaled up (x100): the whole
    image has an exact joint of 5^4 cells that is far from uniform (max cell ~0.09 at temperature
    0.8 and top-k 3, where 81 cells are possible)."""
    from transformers import JanusForConditionalGeneration

    _, processor = tiny.ar_image_model("janus")
    torch.manual_seed(11)
    model = JanusForConditionalGeneration(janus_config(processor.tokenizer, grid=2, codebook=5)).eval().double()
    with torch.no_grad():
        model.model.generation_head.vision_head.weight.mul_(100.0)
    pipe = SJDPipeline(model, processor)
    pipe.progress_bar = False
    return pipe


@torch.no_grad()
def _exact_image_joint(pipe, prompt, scale, temperature, top_k):
    """P(x0, x1, x2, x3) of the whole 2 x 2 image, by enumeration (every prefix in one forward per
    step), with the warpers written out here, independently of hasten's Sampling."""
    adapter, vocab = pipe.adapter, len(pipe.adapter.vocab_ids)
    embeds, _ = adapter.encode_prompt(prompt, None, True, adapter.layout(None, None))
    joint = {(): 1.0}
    for step in range(4):
        prefixes = list(joint)
        ids = torch.tensor(prefixes, dtype=torch.long).reshape(len(prefixes), step)
        inputs = torch.cat([embeds.repeat_interleave(len(prefixes), 0), adapter.embed(ids.repeat(2, 1))], 1)
        logits = pipe.model.model.generation_head(adapter.language_model(inputs_embeds=inputs).last_hidden_state[:, -1])
        cond, uncond = logits[: len(prefixes)], logits[len(prefixes) :]
        logits = (uncond + scale * (cond - uncond)) / temperature
        logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf"))
        probs = logits.softmax(-1)
        joint = {
            p + (x,): joint[p] * float(probs[i, x])
            for i, p in enumerate(prefixes)
            for x in range(vocab)
            if probs[i, x] > 0
        }
    return joint


def _joint_p_value(tokens: torch.Tensor, joint: dict) -> float:
    cells = sorted(joint)
    index = {cell: i for i, cell in enumerate(cells)}
    samples = [index.get(tuple(row), -1) for row in tokens.tolist()]
    assert -1 not in samples, "a sampled image lies outside the top-k support"
    return _chi_square_p(np.array(samples), np.array([joint[c] for c in cells]))


@pytest.mark.parametrize(
    "init, window, batch_size, n",
    [("repeat_horizontal", 4, 1, 500), ("random", 2, 1000, 3000)],
    ids=["one-at-a-time", "batched"],
)
def test_whole_image_sampling_is_lossless_at_moderate_temperature_with_top_k(peaked_janus, init, window, batch_size, n):
    """Every token of the image (not only the first two), temperature 0.8, top-k 3: SJD's joint
    frequencies fit the exact joint (chi-square). With window 2, drafts re-drawn by the Jacobi
    update are verified in later passes; batched, rows advance by the batch's shortest run. The
    same samples reject the temperature-1 joint (the test can fail)."""
    scale, temperature, top_k = 2.0, 0.8, 3
    joint = _exact_image_joint(peaked_janus, "a red fox", scale, temperature, top_k)
    assert max(joint.values()) > 0.08 and len(joint) == 81
    out = peaked_janus(
        ["a red fox"] * n,
        sjd=SJDConfig(window=window, init=init),
        guidance_scale=scale,
        temperature=temperature,
        top_k=top_k,
        seed=3,
        batch_size=batch_size,
        decode=False,
    )
    if batch_size == 1:
        passes = [len(s.accepted_per_forward) for s in out.per_image]
        assert 1 < np.mean(passes) < 4, "no multi-token acceptance, or no rejection: a path would go untested"
    else:
        assert len(out.per_image[0].accepted_per_forward) > 2, "re-drawn drafts never verified"
    assert _joint_p_value(out.tokens, joint) > SIGNIFICANCE
    if batch_size > 1:
        wrong = _exact_image_joint(peaked_janus, "a red fox", scale, 1.0, top_k)
        assert _joint_p_value(out.tokens, wrong) < SIGNIFICANCE, "the test cannot tell temperature 0.8 from 1.0"


def test_grouped_acceptance_is_opt_in_and_runs(pipe):
    out = pipe("a fox", sjd=SJDConfig(grouped=True), temperature=0.5, seed=0)
    assert out.stats.tokens == pipe.adapter.layout(None, None).length


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=0), "window"),
        (dict(window=1.5), "window"),
        (dict(init="diagonal"), "init"),
        (dict(grouped=True, greedy=True), "grouped"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SJDConfig(**kwargs)


def test_call_errors():
    pipe = SJDPipeline(*tiny.ar_image_model("emu3"))
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe("a fox", guidance_scale=0.5)
    with pytest.raises(ValueError, match="negative_prompt"):
        pipe("a fox", guidance_scale=1.0, negative_prompt="blurry")
    with pytest.raises(ValueError, match="height"):
        pipe("a fox", height=30, width=32)
    with pytest.raises(ValueError, match="temperature"):
        pipe("a fox", temperature=0)
    with pytest.raises(ValueError, match="prompt"):
        pipe([])
    janus = SJDPipeline(*tiny.ar_image_model("janus"))
    with pytest.raises(ValueError, match="8 x 8"):
        janus("a fox", height=16)
    with pytest.raises(ValueError, match="negative_prompt"):
        janus("a fox", negative_prompt="blurry")


def test_unsupported_model_class():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="JanusForConditionalGeneration"):
        SJDPipeline(model, None)


def test_seeded_sampling_is_reproducible():
    pipe = SJDPipeline(*tiny.ar_image_model("janus"))
    pipe.progress_bar = False
    a, b = (pipe("a fox", seed=9, temperature=0.7) for _ in range(2))
    assert torch.equal(a.tokens, b.tokens)
    assert a.stats.accepted_per_forward == b.stats.accepted_per_forward


def test_tiny_models_load_with_processors():
    for kind, cls in zip(tiny.AR_IMAGE_KINDS, ("JanusForConditionalGeneration", "Emu3ForConditionalGeneration")):
        model, processor = tiny.ar_image_model(kind)
        assert type(model).__name__ == cls
        assert processor.tokenizer.pad_token_id is not None
    with pytest.raises(ValueError, match="kind"):
        tiny.ar_image_model("parti")
    assert list(itertools.islice(tiny.AR_IMAGE_KINDS, 2)) == ["janus", "emu3"]


def test_cli_compare_writes_both_images(tmp_path, capsys):
    from hasten.cli import main

    out = tmp_path / "fox.png"
    assert (
        main(["t2i-ar", "--compare", "--model", "tiny-emu3", "--height", "32", "--width", "32", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "fewer forward passes" in printed
    assert (tmp_path / "fox-sjd.png").is_file() and (tmp_path / "fox-ar.png").is_file()
    with pytest.raises(SystemExit):
        main(["t2i-ar", "--window", "0"])


@pytest.mark.parametrize("init", ["repeat_horizontal", "sample_horizontal", "repeat_vertical"])
def test_spatial_prior_drafts_follow_new_neighbours(init):
    """A window of new slots on one row: every slot's prior comes from the last known token to its
    left (the official repeat_horizon copies it into EVERY new slot), not only the first slot's."""
    from hasten.pipelines.sjd import _Decoder
    from hasten.pipelines.sjd_adapters import ImageLayout
    from hasten.speculative import Sampling

    pipe = SJDPipeline(*tiny.ar_image_model("janus"))
    vocab = len(pipe.adapter.vocab_ids)
    layout = ImageLayout(rows=4, cols=8, length=32, row_stride=8)
    decoder = _Decoder(pipe.adapter, layout, SJDConfig(init=init), 1.0, Sampling(), torch.Generator().manual_seed(0))
    span_idx = torch.full((2, 32), -1, dtype=torch.long)  # two rows: the second one knows other tokens
    span_idx[0, :10] = torch.arange(10) + 3  # row 0 and the first two tokens of row 1 are known
    span_idx[1, :10] = torch.arange(10) + 20
    known = torch.zeros(2, vocab)
    known[0, 5] = known[1, 7] = 1.0
    dists = {9: known, 2: known}  # the last distribution of span position 9 (and 2, above 10)
    indices, probs = decoder._fresh_drafts(10, 6, span_idx, dists)  # row 1, columns 2-7
    assert indices.shape == (2, 6) and probs.shape == (2, 6, vocab)
    if init == "repeat_horizontal":
        assert indices.tolist() == [[12] * 6, [29] * 6], "span position 9's token, copied into every new slot"
        assert bool((probs.argmax(-1) == indices).all()) and bool((probs.max(-1).values == 1).all())
    elif init == "sample_horizontal":
        assert indices.tolist() == [[5] * 6, [7] * 6], "every slot drawn from position 9's distribution"
    else:  # the upper neighbours (row 0) are all known
        assert indices.tolist() == [(torch.arange(2, 8) + 3).tolist(), (torch.arange(2, 8) + 20).tolist()]
    # a whole new row with no known left neighbour: one random root, copied along the row
    indices, probs = _Decoder(
        pipe.adapter, layout, SJDConfig(init="repeat_horizontal"), 1.0, Sampling(), torch.Generator().manual_seed(1)
    )._fresh_drafts(16, 8, span_idx[:1], {})
    assert len(set(indices[0].tolist())) == 1
    assert float(probs[0, 0].max()) < 1 and bool((probs[0, 1:].max(-1).values == 1).all()), (
        "the root is a uniform draw, the rest point masses on it"
    )


def test_greedy_is_honoured_with_sjd(pipe):
    """`greedy=True` on the call means argmax decoding whether or not SJD runs."""
    sjd = pipe("a cat", sjd=SJDConfig(window=4), greedy=True, guidance_scale=2.0, seed=5)
    ar = pipe("a cat", sjd=None, greedy=True, guidance_scale=2.0)
    assert torch.equal(sjd.tokens, ar.tokens)
    with pytest.raises(ValueError, match="grouped"):
        pipe("a cat", sjd=SJDConfig(grouped=True), greedy=True)
