"""``hasten vlm``: ask a VLM about an image with visual-token pruning, or evaluate pruning methods."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from ._types import fraction, positive

BUDGETS = (1.0, 0.5, 0.2, 0.1)
TASK_BUDGETS = (1.0, 0.5, 0.25, 0.1, 0.05)
"""Budgets of the accuracy-vs-budget tables on the trained micro-world models."""
DEFAULT_MODEL = "trained-llava"


def register(commands) -> None:
    vlm = commands.add_parser(
        "vlm",
        help="VLM visual-token pruning: ask a question, or evaluate methods",
        description="Visual-token pruning for transformers VLMs (LLaVA, LLaVA-Next, Qwen2-VL, Qwen2.5-VL).",
    )
    sub = vlm.add_subparsers(dest="vlm_command", required=True, metavar="{ask,eval,train-draft}")
    from ..token_pruning.evaluate import METHODS, TINY, TRAINED

    models = ", ".join([*TRAINED, *TINY])
    ask = sub.add_parser(
        "ask",
        help="answer a question about an image, optionally with pruning",
        description="Answer a question about an image with a VLM, optionally pruning visual "
        "tokens; prints the answer and the pruning stats.",
    )
    ask.add_argument(
        "--image",
        type=Path,
        help="image file (default: a generated held-out scene for the trained "
        "models, scikit-image's astronaut photo otherwise)",
    )
    ask.add_argument(
        "--question",
        default=None,
        help="default: the generated scene's question (trained models), 'What is in the picture?' otherwise",
    )
    ask.add_argument("--seed", type=int, default=0, help="which held-out scene (trained models, no --image; default 0)")
    ask.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"{models} (trained-*: the micro-world models, shipped; tiny-*: random weights) or a hub id",
    )
    ask.add_argument("--prune", choices=("none",) + METHODS, default="none", help="pruning method (default none)")
    ask.add_argument("--budget", type=fraction, default=0.2, help="fraction of visual tokens kept (default 0.2)")
    ask.add_argument("--max-new-tokens", type=positive, default=32)
    ask.add_argument(
        "--speculative",
        type=Path,
        nargs="?",
        const=SHIPPED_DRAFT,
        metavar="DRAFT_DIR",
        help="decode speculatively with this SpecVLM draft (lossless: the same answer, fewer target passes); "
        "alone, with trained-llava: its shipped draft, and (no --question) the scene's 'Describe the picture.'",
    )
    ask.add_argument("--device", default=None)
    ask.set_defaults(run=run_ask)

    train = sub.add_parser(
        "train-draft",
        help="distil a SpecVLM draft from the model on (image, prompt) pairs",
        description="Online-logit distillation of a SpecVLM draft (one decoder layer over the "
        "target's features, sharing its embeddings and head) from the target, on the fly. "
        "Checkpoints every --checkpoint-every steps in --out; re-running resumes.",
    )
    train.add_argument("--model", default="tiny-llava", help=f"{models} or a hub id")
    train.add_argument(
        "--data",
        type=Path,
        default=None,
        help='JSONL ({"image", "prompt"} per line) or a folder of images (+ .txt prompts); '
        "default: scikit-image's photos",
    )
    train.add_argument("--out", type=Path, required=True, help="folder for the draft and its checkpoints")
    train.add_argument(
        "--steps", type=positive, default=1000, help="training steps, one (image, prompt) pair each (default 1000)"
    )
    train.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    train.add_argument(
        "--compressor",
        default="pool",
        choices=("none", "pool", "conv", "random", "saliency", "resampler", "text", "gate"),
    )
    train.add_argument("--checkpoint-every", type=positive, default=100, help="steps between checkpoints (default 100)")
    train.add_argument("--seed", type=int, default=0, help="seeds the draft's initialisation and the data order")
    train.add_argument("--device", default=None)
    train.set_defaults(run=run_train_draft)

    ev = sub.add_parser(
        "eval",
        help="every method x budget: task accuracy (trained models) or fidelity and speed",
        description="On the trained micro-world models (trained-*): task accuracy on held-out "
        "questions (overall and per question type), agreement with the unpruned answers, visual "
        "tokens, prefill-FLOPs bound, KV bytes and time per answer, for each method and budget. "
        "On other models: fidelity (top-1 agreement under teacher forcing, mean KL, greedy exact "
        "match) and speed (prefill, decode, KV bytes, FLOPs bound) against the unpruned model, on "
        "scikit-image photos.",
    )
    ev.add_argument("--model", default=DEFAULT_MODEL, help=f"{models} or a hub id")
    ev.add_argument(
        "--methods", nargs="+", choices=METHODS, default=None, help="default: every method the model supports"
    )
    ev.add_argument(
        "--budgets",
        nargs="+",
        type=fraction,
        default=None,
        help=f"default: {' '.join(map(str, TASK_BUDGETS))} (trained models), {' '.join(map(str, BUDGETS))} otherwise",
    )
    ev.add_argument(
        "--samples", type=positive, default=100, help="held-out questions per row (trained models; default 100)"
    )
    ev.add_argument("--max-new-tokens", type=positive, default=16)
    ev.add_argument("--device", default=None)
    ev.add_argument("--json", action="store_true", help="also print one JSON line per row")
    ev.set_defaults(run=run_eval)


def supported_methods(model) -> list[str]:
    """The methods that apply to ``model``'s class (pooling: one token grid per image, not LLaVA-Next)."""
    methods = ["random", "hired", "fastv", "mustdrop", "zipvl", "guikv"]
    if type(model).__name__ != "LlavaNextForConditionalGeneration":
        methods.insert(1, "pool")
    return methods


SHIPPED_DRAFT = Path("<shipped>")  # `--speculative` alone


def default_question(model: str, seed: int = 0, kind: str | None = None):
    """``(images, question, answer)``: for a trained micro-world model, held-out sample ``seed`` at the
    model's size: LLaVA a scene and a ``kind`` question ("color" by default, "describe" for a long
    answer), Qwen2.5-VL a 3-screenshot GUI trajectory and its question ("menu" by default);
    otherwise scikit-image's astronaut and a generic question (answer ``None``).

    Examples
    --------
    >>> images, question, answer = default_question("trained-llava")
    >>> images[0].size, question.startswith("What color")
    ((36, 36), True)
    >>> images, question, answer = default_question("trained-qwen2.5-vl")
    >>> len(images), question.endswith("is the menu open?")
    (3, True)
    """
    from ..token_pruning.evaluate import TRAINED, sample_images

    if model not in TRAINED:
        return [sample_images()[0][0]], "What is in the picture?", None
    from ..tiny.micro_vlm import scene_size
    from ..tiny.vqa import HELD_OUT_SEED, gui_sample, scene_sample

    if TRAINED[model] == "qwen2.5-vl":
        sample = gui_sample(HELD_OUT_SEED + seed, kind=kind or "menu")
    else:
        sample = scene_sample(HELD_OUT_SEED + seed, kind=kind or "color", size=scene_size(TRAINED[model]))
    return sample.images, sample.question, sample.answer


def run_ask(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from ..tiny.vlms import chat_prompt
    from ..token_pruning.evaluate import load_vlm, make_method

    if args.speculative == SHIPPED_DRAFT:
        if args.model != "trained-llava":
            raise ValueError(
                "--speculative without a folder uses trained-llava's shipped draft; name a draft folder "
                f"for --model {args.model}"
            )
        from ..tiny.trained import path

        args.speculative = path("llava-draft")
    if args.speculative is not None:
        from ..speculative.specvlm.draft import CONFIG_NAME

        if not (args.speculative / CONFIG_NAME).is_file():
            raise ValueError(
                f"--speculative {args.speculative}: not a SpecVLM draft folder (no {CONFIG_NAME}); train "
                "one with `hasten vlm train-draft --out DIR`"
            )
    truth = None
    if args.image is None:
        images, question, truth = default_question(
            args.model, args.seed, "describe" if args.speculative is not None else None
        )
    else:
        try:
            images = [Image.open(args.image).convert("RGB")]
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read --image {args.image}: {error}") from None
        question = "What is in the picture?"
    question = args.question or question
    model, processor = load_vlm(args.model, args.device)
    inputs = processor(images=images, text=[chat_prompt(processor, question, images=len(images))], return_tensors="pt")
    inputs = inputs.to(model.device)
    method = stats = None
    if args.speculative is not None:
        from ..speculative.specvlm import DraftModel, speculative_generate

        if args.prune != "none":
            raise ValueError("--speculative decodes the unpruned target losslessly; it does not combine with --prune")
        output, stats = speculative_generate(
            model, inputs, DraftModel.from_pretrained(args.speculative, model), max_new_tokens=args.max_new_tokens
        )
    else:
        method = None if args.prune == "none" else make_method(args.prune, args.budget)
        pruning = method.apply(model) if method is not None else contextlib.nullcontext()
        with torch.no_grad(), pruning:
            output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    if truth is not None and args.question is None:
        print(f"Q: {question}")
    print(answer.strip())
    if truth is not None and args.question is None:
        print(f"[ground truth: {truth} - {'right' if answer.strip() == truth else 'wrong'}]")
    if stats is not None:
        print(
            f"[speculative] {stats.new_tokens} tokens in {stats.target_forwards} target passes "
            f"({stats.mean_accepted:.2f} tokens per verification), draft saw {stats.compressed_visual[1]}/"
            f"{stats.compressed_visual[0]} visual tokens"
        )
    if method is not None:
        s = method.stats
        print(
            f"[{args.prune} budget {args.budget}] visual tokens {s.visual_tokens_kept[0]}/{s.visual_tokens_in[0]}, "
            f"prefill {s.prefill_tokens}/{s.prompt_tokens} tokens, KV cache {s.kv_cache_bytes / 1024:.1f} KiB"
        )
    return 0


def check_training_data(data: Path, argument: str = "--data") -> None:
    """A clear ``ValueError`` (naming the file, and the line of a JSONL file) for training data
    :func:`~hasten.speculative.specvlm.load_pairs` cannot read; nothing is loaded."""
    if not data.exists():
        raise ValueError(
            f'{argument} {data} does not exist; give a JSONL file ({{"image", "prompt"}} per line) '
            "or a folder of images"
        )
    if data.is_dir():
        return
    try:
        lines = data.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{argument} {data}: cannot read it as a JSONL text file ({error})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f'{argument} {data}:{number}: not JSON ({error.msg}); each line is {{"image": ..., "prompt": ...}}'
            ) from None
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or "prompt" not in entry:
            raise ValueError(f'{argument} {data}:{number}: each line needs "image" (a path) and "prompt"')
        image = Path(entry["image"])
        image = image if image.is_absolute() else data.parent / image
        if not image.is_file():
            raise ValueError(
                f"{argument} {data}:{number}: image {image} does not exist (relative paths are read from {data.parent})"
            )


def run_train_draft(args: argparse.Namespace) -> int:
    from ..loading import check_device
    from ..speculative.specvlm import DraftModel, load_pairs, train_draft
    from ..token_pruning.evaluate import load_vlm, sample_images
    from ._common import check_output_folder

    check_output_folder(args.out, "--out")
    check_device(args.device)
    if args.data is not None:
        check_training_data(args.data)
        try:
            pairs = load_pairs(args.data)
        except (OSError, ValueError) as error:
            raise ValueError(f"--data {args.data}: {error}") from None
    else:
        pairs = sample_images()
    model, processor = load_vlm(args.model, args.device)
    checkpoint = args.out / "checkpoint" / "state.pt"
    draft = DraftModel.for_target(model, compressor=args.compressor, seed=args.seed)
    if checkpoint.exists():
        print(f"resuming from {checkpoint}")
    losses = train_draft(
        model,
        processor,
        pairs,
        draft,
        steps=args.steps,
        out=args.out,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    print(f"draft saved to {args.out} ({len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..token_pruning.evaluate import (
        TRAINED,
        evaluate,
        evaluate_task,
        format_table,
        format_task_table,
        load_vlm,
        sample_images,
        task_samples,
    )

    model, processor = load_vlm(args.model, args.device)
    methods = args.methods or supported_methods(model)
    trained = args.model in TRAINED
    budgets = args.budgets or list(TASK_BUDGETS if trained else BUDGETS)
    pairs = [("random", 1.0)] + [(m, b) for m in methods for b in budgets if not (m == "random" and b == 1.0)]
    if trained:
        rows = evaluate_task(model, processor, pairs, task_samples(args.model, args.samples), progress=True)
        print(
            f"# {args.model} ({type(model).__name__}) on {model.device}; {args.samples} held-out questions; acc = "
            "task accuracy, agree = same answer as unpruned, bound = 1 / prefill-FLOPs ratio"
        )
        print(format_task_table(rows))
        if args.json:
            for row in rows:
                print(json.dumps(row.as_dict()))
        return 0
    rows = evaluate(model, processor, pairs, sample_images(), max_new_tokens=args.max_new_tokens)
    print(
        f"# {args.model} ({type(model).__name__}) on {model.device}; fidelity vs the unpruned model; "
        "x = prefill speedup, bound = 1 / prefill-FLOPs ratio"
    )
    print(format_table(rows, baseline=rows[0]))
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict()))
    return 0
