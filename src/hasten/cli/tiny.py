"""``hasten tiny``: list and train the trained micro-world models (:mod:`hasten.tiny.trained`).

    hasten tiny list
    hasten tiny train classifier --steps 2000 --seed 0 --out runs/classifier [--resume]

Training is seeded and resumable: ``--out`` keeps a checkpoint, and ``--resume`` continues from
it to ``--steps``, giving the same weights as an uninterrupted run. The finished model is saved
with ``save_pretrained`` in ``<out>/model``; copying that folder over
``src/hasten/tiny/weights/<name>/`` regenerates the shipped weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import check_output_folder
from ._types import positive


def register(commands) -> None:
    tiny = commands.add_parser(
        "tiny",
        help="list or train the trained micro-world models",
        description="The micro-world models trained on hasten's generated scenes: list them, or train one "
        "(seeded, resumable, with a progress bar).",
    )
    sub = tiny.add_subparsers(dest="tiny_command", required=True, metavar="ACTION")
    listing = sub.add_parser("list", help="the registered micro-worlds and whether their weights ship")
    listing.set_defaults(run=list_models)
    train = sub.add_parser(
        "train", help="train one micro-world", description="Train micro-world NAME; the model is saved in OUT/model."
    )
    train.add_argument("name", help="a registered micro-world (see `hasten tiny list`)")
    train.add_argument("--steps", type=positive, default=None, help="optimiser steps (default: the model's own)")
    train.add_argument("--seed", type=int, default=0, help="seed of all data and noise (default 0)")
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder for the checkpoint and the saved model (default: $HASTEN_HOME/train/NAME)",
    )
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    train.add_argument("--threads", type=positive, default=None, help="torch CPU threads (default: torch's)")
    train.set_defaults(run=train_model)


def _size_mb(folder: Path) -> float:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file()) / 1e6


def list_models(args: argparse.Namespace) -> int:
    from ..tiny import trained

    width = max(len(name) for name in trained.REGISTRY)
    for name, target in sorted(trained.REGISTRY.items()):
        folder = trained.path(name)
        shipped = f"shipped, {_size_mb(folder):.2f} MB" if trained.is_shipped(name) else "not shipped"
        print(f"{name:<{width}}  {shipped:<20}  trained by {target}")
    return 0


def train_model(args: argparse.Namespace) -> int:
    import torch

    from ..tiny import trained
    from ..tiny._store import home

    if args.name not in trained.REGISTRY:
        raise ValueError(f"NAME must be one of {', '.join(sorted(trained.REGISTRY))}; got {args.name!r}")
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer; got {args.seed}")
    out = check_output_folder(args.out if args.out is not None else home() / "train" / args.name, "--out")
    if args.resume and trained.load_checkpoint(out) is None:
        raise ValueError(f"--resume: no checkpoint ({trained.CHECKPOINT}) in {out}; run without --resume first")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    function = trained.training_function(args.name)
    model = function(out, steps=args.steps, seed=args.seed, resume=args.resume, progress=True)
    print(f"saved {args.name} in {model}")
    return 0
