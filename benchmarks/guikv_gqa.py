"""GUI-KV under grouped-query attention: per-KV-head selection (hasten) vs per-query-head (official).

The official code repeats each KV head for its query heads (``repeat_kv``) and selects a kept
set per QUERY head, so its compressed cache holds ``num_attention_heads`` copies; hasten scores
each KV head by the mean of its query heads' scores and keeps one set per KV head (the model's
own cache width). This script measures how far the two choices are apart on the tiny
Qwen2.5-VL (4 query heads, 2 KV heads), from the unpruned model's eager attention: per layer, the
Jaccard index between hasten's set of a KV head and the official set of each of its query heads,
and the cache entries each keeps.

    python benchmarks/guikv_gqa.py [--budgets 0.1 0.2 0.3] [--steps 1]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from hasten import tiny
from hasten.tiny.gui import trajectory
from hasten.tiny.vlms import chat_prompt
from hasten.token_pruning import GUIKV

from common import machine


def official_sets(
    model,
    inputs,
    budget: float,
    alpha: float = 2.0,
    window: int = 8,
    pool: int = 5,
    temperature: float = 3.5,
    per_kv_head: bool = False,
) -> list[torch.Tensor]:
    """Per layer, the kept positions by GUI-KV's official rule for ONE screenshot (no temporal
    term), written from the reference on the unpruned model's own eager attention weights and its
    layers' input_layernorm outputs: the attention of the last ``window`` queries SUMMED over them,
    keys before the window only, average-pooled (width ``pool``, zero padding counted), plus
    ``alpha * softmax(z(norm) / temperature)`` on the screenshot; the top ``int(L * budget) -
    window`` plus the window.

    ``(heads, capacity)`` per query head (the official code); with ``per_kv_head`` the scores are
    first averaged over each KV head's query heads, giving ``(kv_heads, capacity)`` sorted: hasten's
    grouped-query rule, which tests/test_guikv.py checks GUIKV against.
    """
    layers = model.model.language_model.layers
    norms = {}
    handles = [
        layer.input_layernorm.register_forward_hook(
            lambda module, args, output, index=index: norms.__setitem__(index, output[0].float().norm(dim=-1))
        )
        for index, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        for handle in handles:
            handle.remove()
    length = inputs["input_ids"].shape[1]
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    capacity = int(length * budget)
    kv_heads = model.config.text_config.num_key_value_heads
    kept = []
    for index, attention in enumerate(attentions):
        scores = attention[0, :, -window:, : length - window].float().sum(1)  # (heads, prefix)
        if per_kv_head:
            scores = scores.view(kv_heads, -1, scores.shape[-1]).mean(1)
        scores = torch.nn.functional.avg_pool1d(scores[:, None], pool, stride=1, padding=pool // 2)[:, 0]
        z = norms[index][image]
        scores[:, image] += alpha * torch.softmax((z - z.mean()) / z.std() / temperature, 0)
        top = scores.topk(capacity - window, dim=-1).indices
        window_positions = torch.arange(length - window, length).expand(scores.shape[0], -1)
        selected = torch.cat([top, window_positions], -1)
        kept.append(selected.sort(-1).values if per_kv_head else selected)
    return kept


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    model, processor = tiny.vlm("qwen2.5-vl", dtype=torch.float64, attn_implementation="eager")
    heads = model.config.text_config.num_attention_heads
    kv_heads = model.config.text_config.num_key_value_heads
    print(
        f"# GUI-KV per-KV-head vs per-query-head selection | tiny Qwen2.5-VL ({heads} query heads, {kv_heads} KV "
        f"heads) | {machine(torch.device('cpu'))}"
    )
    print("budget  prompt  entries/head  Jaccard mean  Jaccard min  cache entries hasten / official")
    for budget in args.budgets:
        jaccards, prompt = [], 0
        for seed in range(args.seeds):
            shots, _ = trajectory(steps=1, size=(96, 80), seed=seed)
            inputs = processor(
                images=shots, text=[chat_prompt(processor, "What is the next action?", images=1)], return_tensors="pt"
            )
            prompt = inputs["input_ids"].shape[1]
            official = official_sets(model, inputs, budget)
            with GUIKV(budget=budget).apply(model) as method:
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
            for ours, theirs in zip(method.stats.kv_kept_positions, official):
                for head in range(heads):
                    a, b = set(ours[0, head // (heads // kv_heads)].tolist()), set(theirs[head].tolist())
                    jaccards.append(len(a & b) / len(a | b))
        entries = int(prompt * budget)
        row = dict(
            budget=budget,
            prompt=prompt,
            entries=entries,
            jaccard_mean=statistics.mean(jaccards),
            jaccard_min=min(jaccards),
            cache_ratio=kv_heads / heads,
        )
        print(
            f"{budget:6.2f}  {prompt:6d}  {entries:12d}  {row['jaccard_mean']:12.3f}  {row['jaccard_min']:11.3f}  "
            f"{kv_heads} x {entries} / {heads} x {entries} = {kv_heads / heads:.2f}"
        )
        print(json.dumps(row))


if __name__ == "__main__":
    main()
