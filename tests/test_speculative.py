"""The shared speculative core: sampling settings, the chain rule (batched, shortest-run advance), the
point-mass tree rule, and the host-sync budget of the SJD and SpecVLM loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from hasten.speculative import HostProfile, Sampling, chain_verify, residual, tree_accept

SIGNIFICANCE = 1e-3


def test_sampling_is_generates_warpers_in_order():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    ours = Sampling(temperature=0.7, top_k=20, top_p=0.8).probs(logits)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)])
    torch.testing.assert_close(ours, warpers(None, logits.clone()).softmax(-1))
    assert ((ours > 0).sum(-1) <= 20).all() and ((ours > 0).sum(-1) < 20).any()  # top-p cut deeper somewhere
    assert Sampling().probs(logits.double()).dtype == torch.float64
    assert Sampling(greedy=True).draw(ours).tolist() == ours.argmax(-1).tolist()
    assert Sampling().draw(ours[:, None].expand(-1, 4, -1), torch.Generator().manual_seed(1)).shape == (3, 4)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(greedy=1), "greedy"),
    ],
)
def test_sampling_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Sampling(**kwargs)


def test_residual_is_the_positive_part_or_the_target():
    q, p = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])
    torch.testing.assert_close(residual(q, p), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(residual(q, q), q)


def test_chain_rule_emits_the_target_distribution_and_accepts_at_sum_min():
    """One draft per row drawn from p, 20000 rows in one call: the emitted token follows q, drafts
    pass at rate sum(min(p, q)), and a token q gives no mass is never emitted."""
    q = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0], dtype=torch.float64)
    p = torch.tensor([0.1, 0.4, 0.1, 0.2, 0.2], dtype=torch.float64)
    rows, generator = 20000, torch.Generator().manual_seed(0)
    drafts = torch.multinomial(p.expand(rows, -1), 1, replacement=True, generator=generator)
    verdict = chain_verify(drafts, p.expand(rows, 1, -1), q.expand(rows, 2, -1), generator=generator)
    emitted = torch.where(verdict.advance == 1, drafts[:, 0], verdict.tokens)
    counts = np.bincount(emitted.numpy(), minlength=5)
    assert counts[4] == 0
    assert chisquare(counts[:4], q[:4].numpy() * rows).pvalue > SIGNIFICANCE
    assert abs(float(verdict.lengths.double().mean()) - float(torch.minimum(p, q).sum())) < 0.015
    drawn_from_p = np.bincount(drafts[:, 0].numpy(), minlength=5)  # the test's power: p is far from q
    assert chisquare(drawn_from_p[:4] + 1, q[:4].numpy() * drawn_from_p[:4].sum() + 1).pvalue < SIGNIFICANCE


def test_shortest_run_advance_keeps_every_row_exact():
    """Batches of 4 rows advance by their shortest run: each row's first token follows q0 and its
    second (when the batch got that far) follows q1 given the first, although rows whose own run
    was longer emit their accepted draft where the batch stops."""
    vocab, rows, batches = 4, 4, 4000
    generator = torch.Generator().manual_seed(1)
    q0 = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    q1 = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.25] * 4, [0.1, 0.1, 0.1, 0.7]], dtype=torch.float64
    )  # q1[x0]: the target after the first token
    p = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    n = rows * batches
    drafts = torch.multinomial(p.expand(n, -1), 2, replacement=True, generator=generator)
    target = torch.stack([q0.expand(n, -1), q1[drafts[:, 0]], q0.expand(n, -1)], 1)  # the last row: unused here
    first, pairs, disagreed = [], [], 0
    for batch in range(batches):
        rows_slice = slice(batch * rows, (batch + 1) * rows)
        verdict = chain_verify(
            drafts[rows_slice], p.expand(rows, 2, -1), target[rows_slice], generator=generator, shortest=True
        )
        advance = int(verdict.advance[0])
        assert bool((verdict.advance == advance).all())
        disagreed += int(verdict.lengths.unique().numel() > 1)
        sequences = torch.cat([drafts[rows_slice, :advance], verdict.tokens[:, None]], 1)
        first += sequences[:, 0].tolist()
        if advance >= 1:
            pairs += sequences[:, :2].tolist()
    assert disagreed > batches // 2, "rows rarely disagreed: the shared-advance path would go untested"
    counts = np.bincount(first, minlength=vocab)
    assert chisquare(counts, q0.numpy() * len(first)).pvalue > SIGNIFICANCE
    observed = np.zeros((vocab, vocab))
    for a, b in pairs:
        observed[a, b] += 1
    expected = observed.sum(1, keepdims=True) * q1.numpy()
    keep = expected > 0
    assert chisquare(observed[keep], expected[keep]).pvalue > SIGNIFICANCE
    assert len(pairs) > 1000


def test_greedy_chain_and_forced_positions():
    q = torch.zeros(2, 4, 3)
    q[:, :, 0] = 1.0
    q[1, 1] = torch.tensor([0.0, 0.0, 1.0])
    drafts = torch.tensor([[0, 2, 0], [0, 0, 0]])
    verdict = chain_verify(drafts, None, q, greedy=True)
    assert verdict.lengths.tolist() == [1, 1] and verdict.tokens.tolist() == [0, 2]
    forced = torch.tensor([False, True, False])  # a layout token at position 1: accepted whatever q says
    verdict = chain_verify(drafts, None, q, greedy=True, forced=forced)
    assert verdict.lengths.tolist() == [3, 3] and verdict.tokens.tolist() == [0, 0]
    verdict = chain_verify(torch.tensor([[0, 0, 0], [0, 1, 0]]), None, q, greedy=True, shortest=True)
    assert verdict.lengths.tolist() == [3, 1] and verdict.advance.tolist() == [1, 1]
    assert verdict.tokens.tolist() == [0, 2], "row 0 passed position 1: its draft there is its token"
    with pytest.raises(ValueError, match="draft_probs"):
        chain_verify(drafts, None, q)
    with pytest.raises(ValueError, match="target_probs"):
        chain_verify(drafts, None, q[:, :3], greedy=True)


def test_tree_walk_follows_the_choices_and_stops_at_the_first_miss():
    """Random trees and random choices: the accepted path is exactly the chain of children carrying
    the choice at each node (checked against a plain Python walk), for many rows at once."""
    generator = torch.Generator().manual_seed(3)
    rows, vocab = 200, 3
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3])  # depth 3; siblings carry distinct tokens
    tokens = torch.tensor([9, 0, 1, 0, 2, 1, 0])
    choices = torch.randint(vocab, (rows, len(parents)), generator=generator)
    path, length, following = tree_accept(parents.expand(rows, -1), tokens.expand(rows, -1), choices, 3)
    for row in range(rows):
        node, walk = 0, [0]
        while True:
            child = [c for c in range(len(parents)) if parents[c] == node and tokens[c] == choices[row, node]]
            if not child:
                break
            node = child[0]
            walk.append(node)
        assert path[row, : length[row] + 1].tolist() == walk and int(following[row]) == int(choices[row, node])
    assert length.max() == 3 and length.min() == 0


def test_host_profile_counts_reads_and_splits_model_time():
    layer = torch.nn.Linear(4, 4)
    with HostProfile([layer]) as profile:
        out = layer(torch.ones(1, 4))
        out.sum().item()
        bool(out.sum() > 0)
    assert profile.syncs == 2 and profile.by_method == {"item": 1, "__bool__": 1}
    assert 0 < profile.model_seconds <= profile.wall_seconds
    assert torch.Tensor.item.__name__ == "item" and "counted" not in repr(torch.Tensor.item)  # restored


def test_sjd_reads_back_one_value_per_pass():
    from hasten import tiny
    from hasten.pipelines import SJDConfig, SJDPipeline

    pipe = SJDPipeline(*tiny.ar_image_model("emu3"))
    pipe.progress_bar = False
    for config in (SJDConfig(window=8), SJDConfig(window=8, init="sample_vertical"), None):
        with HostProfile([pipe.adapter.language_model]) as profile:
            out = pipe(
                ["a fox", "a boat on a lake"],
                sjd=config,
                temperature=0.9,
                seed=0,
                batch_size=2,
                height=32,
                width=32,
                decode=False,
            )
        passes = len(out.per_image[0].accepted_per_forward)
        assert profile.syncs <= passes + 2, (config, profile.by_method, passes)


def test_specvlm_rounds_read_back_one_value():
    from PIL import Image

    from hasten import tiny
    from hasten.speculative import DraftModel, TreeConfig, speculative_generate
    from hasten.tiny.vlms import chat_prompt

    model, processor = tiny.vlm("llava")
    inputs = processor(images=[Image.new("RGB", (32, 32))], text=[chat_prompt(processor, "Hi?")], return_tensors="pt")
    draft = DraftModel.for_target(model)
    for tree in (None, TreeConfig(top_k=4, total=12, depth=3)):
        with HostProfile([model, draft]) as profile:
            _, stats = speculative_generate(model, inputs, draft, max_new_tokens=12, tree=tree)
        prefill = 8  # the draft's prefill finds the image runs on the host (once per prompt)
        assert profile.syncs <= len(stats.accepted) + prefill, (tree, profile.by_method, len(stats.accepted))
