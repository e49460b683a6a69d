"""Visual-token pruning: every method x budget against the unpruned model, per VLM, one process.

Fidelity (random weights make it a mechanics check, not a quality claim): top-1 agreement
with the unpruned greedy continuation under teacher forcing, mean KL(unpruned || pruned) over
those positions, and greedy exact match. Speed: prefill wall time and its speedup `x`, with
`bound` = 1 / (prefill-FLOPs ratio) beside it, decode tokens/s, KV bytes after the prefill,
and the visual part of the KV cache relative to the unpruned model. Samples: scikit-image
photos (astronaut, chelsea, coffee) with questions.

    python benchmarks/vlm_pruning.py                       # the four tiny VLMs
    python benchmarks/vlm_pruning.py --model llava-hf/llava-1.5-7b-hf --device cuda
"""

from __future__ import annotations

import argparse
import json

import torch

from common import machine

from hasten.cli.vlm import BUDGETS, supported_methods
from hasten.token_pruning.evaluate import TINY, evaluate, format_table, load_vlm, sample_images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=list(TINY))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    print(f"# VLM token pruning | {machine(torch.device(args.device))}")
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
