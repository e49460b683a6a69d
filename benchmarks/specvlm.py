"""SpecVLM: accepted length, target passes per token and speedup against plain generate(), one process.

A draft is distilled from the target first (online, --train-steps on scikit-image photos), then
each setting generates greedily on the photos: plain ``generate()``, chain drafting (depth 5)
and the dynamic tree (top-k 10, 60 tokens, depth 7), each with the draft's visual compressor
on (2x2 pooling) and off (every visual token). Every output is checked equal to the target's.
Random weights make acceptance depend on how repetitive the random target is: read the
mechanics (passes per token, overhead per pass), not the paper's numbers.

    python benchmarks/specvlm.py                                    # tiny LLaVA, CPU
    python benchmarks/specvlm.py --model llava-hf/llava-1.5-7b-hf --device cuda --train-steps 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from common import machine

from hasten.tiny.vlms import chat_prompt
from hasten.token_pruning.evaluate import load_vlm, sample_images
from hasten.token_pruning.specvlm import DraftModel, speculative_generate, train_draft
from hasten.token_pruning.specvlm.tree import TreeConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    model, processor = load_vlm(args.model, args.device)
    samples = sample_images()
    print(f"# SpecVLM | {machine(torch.device(args.device))} | {args.model} | {args.max_new_tokens} new tokens, "
          f"draft distilled for {args.train_steps} steps")
    prompts = [processor(images=[image], text=[chat_prompt(processor, question)], return_tensors="pt").to(model.device)
               for image, question in samples]
    references = [model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False) for inputs in prompts]

    def timed(fn):
        times = []
        for _ in range(args.repeats + 1):
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = fn()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return result, statistics.median(times[1:])

    plain = [timed(lambda inputs=inputs: model.generate(**inputs, max_new_tokens=args.max_new_tokens,
                                                        do_sample=False))[1] for inputs in prompts]
    rows = [dict(setting="generate()", compressor="-", tokens_per_pass=1.0, passes_per_token=1.0,
                 seconds=round(statistics.mean(plain), 4), speedup=1.0)]
    for compressor in ("pool", "none"):
        draft = DraftModel.for_target(model, compressor=compressor)
        train_draft(model, processor, samples, draft, steps=args.train_steps, progress=False)
        for setting, tree in (("chain (depth 5)", None), ("tree (10 / 60 / 7)", TreeConfig())):
            accepted, passes, seconds = [], [], []
            for inputs, reference in zip(prompts, references):
                (out, stats), took = timed(lambda inputs=inputs: speculative_generate(
                    model, inputs, draft, max_new_tokens=args.max_new_tokens, tree=tree))
                assert torch.equal(out, reference), "speculative output differs from the target's"
                accepted.append(stats.mean_accepted)
                passes.append(stats.target_forwards_per_token)
                seconds.append(took)
            rows.append(dict(setting=setting, compressor=compressor, tokens_per_pass=round(statistics.mean(accepted), 3),
                             passes_per_token=round(statistics.mean(passes), 3), seconds=round(statistics.mean(seconds), 4),
                             speedup=round(statistics.mean(plain) / statistics.mean(seconds), 3)))
    print(f"\n{'setting':20s} {'compressor':10s} {'tokens/pass':>11s} {'passes/token':>12s} {'seconds':>8s} {'speedup':>8s}")
    for row in rows:
        print(f"{row['setting']:20s} {row['compressor']:10s} {row['tokens_per_pass']:11.2f} {row['passes_per_token']:12.3f} "
              f"{row['seconds']:8.3f} {row['speedup']:7.2f}x")
    if args.json:
        for row in rows:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
