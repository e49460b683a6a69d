"""Visual-token pruning: every method x budget against the unpruned model, per VLM, one process.

Fidelity (random weights make it a mechanics check, not a quality claim): top-1 agreement
with the unpruned greedy continuation under teacher forcing, mean KL(unpruned || pruned) over
those positions, and greedy exact match. Speed: prefill wall time and its speedup `x`, with
`bound` = 1 / (prefill-FLOPs ratio) beside it, decode tokens/s, KV bytes after the prefill,
and the visual part of the KV cache relative to the unpruned model. Samples: scikit-image
photos (astronaut, chelsea, coffee) with questions.

    python benchmarks/vlm_pruning.py                       # the four tiny VLMs
    python benchmarks/vlm_pruning.py --model llava-hf/llava-1.5-7b-hf --device cuda

With ``--trained``: accuracy-vs-budget tables on the micro-world models trained on
:mod:`hasten.tiny.vqa` (``trained-llava``, ``trained-qwen2.5-vl``): every supported method x
budgets {1.0, 0.5, 0.25, 0.1, 0.05} on held-out questions: task accuracy (overall and per
question type), agreement with the unpruned answers, visual tokens kept, the prefill-FLOPs
bound, KV bytes after the prefill and batch-1 time per answer (CPU times are ratios).

    python benchmarks/vlm_pruning.py --trained --samples 200 --json
"""

from __future__ import annotations

import argparse
import json

import torch

from hasten.cli.vlm import BUDGETS, TASK_BUDGETS, supported_methods
from hasten.token_pruning.evaluate import (
    TINY,
    TRAINED,
    evaluate,
    evaluate_task,
    format_table,
    format_task_table,
    load_vlm,
    sample_images,
    task_samples,
)

from common import machine


def trained_tables(args: argparse.Namespace) -> None:
    """The accuracy-vs-budget table of each trained model."""
    for name in args.model:
        torch.manual_seed(0)  # random keep draws from torch's generator: one fixed draw per run
        model, processor = load_vlm(name, args.device)
        methods = supported_methods(model)
        budgets = args.budgets or list(TASK_BUDGETS)
        pairs = [("random", 1.0)] + [(m, b) for m in methods for b in budgets if not (m == "random" and b == 1.0)]
        rows = evaluate_task(
            model, processor, pairs, task_samples(name, args.samples), timing_samples=args.timing_samples, progress=True
        )
        print(f"\n## {name} ({type(model).__name__}), {args.samples} held-out questions")
        print(format_task_table(rows), flush=True)
        if args.json:
            for row in rows:
                print(json.dumps({"model": name, **row.as_dict()}), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", nargs="+", default=None, help="default: the four tiny VLMs (with --trained: the trained ones)"
    )
    parser.add_argument("--budgets", nargs="+", type=float, default=None)
    parser.add_argument("--trained", action="store_true", help="accuracy-vs-budget tables on the trained models")
    parser.add_argument("--samples", type=int, default=200, help="held-out questions per row (--trained)")
    parser.add_argument("--timing-samples", type=int, default=6, help="questions timed alone per row (--trained)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    print(f"# VLM token pruning | {machine(torch.device(args.device))}")
    if args.trained:
        args.model = args.model or list(TRAINED)
        trained_tables(args)
        return
    args.model, args.budgets = args.model or list(TINY), args.budgets or list(BUDGETS)
    for name in args.model:
        model, processor = load_vlm(name, args.device)
        methods = supported_methods(model)
        pairs = [("random", 1.0)] + [(m, b) for m in methods for b in args.budgets if not (m == "random" and b == 1.0)]
        rows = evaluate(model, processor, pairs, sample_images(), max_new_tokens=args.max_new_tokens)
        print(f"\n## {name} ({type(model).__name__})")
        print(format_table(rows, baseline=rows[0]))
        if args.json:
            for row in rows:
                print(json.dumps({"model": name, **row.as_dict()}))


if __name__ == "__main__":
    main()
