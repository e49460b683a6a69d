"""``hasten t2i-ar``: text-to-image with an autoregressive model (Janus, Emu3), SJD or plain AR."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ._types import finite, fraction, positive, positive_float

TINY = {"tiny-janus": "janus", "tiny-emu3": "emu3"}
TRAINED = "trained-janus"
"""The micro Janus trained on hasten's scenes (:mod:`hasten.tiny.micro_janus`): the default model."""
DEFAULT_PROMPT = "a red circle at the top left and a blue square at the bottom right"


def register(commands) -> None:
    cmd = commands.add_parser(
        "t2i-ar",
        help="text-to-image with Janus / Emu3, by Speculative Jacobi Decoding (default) or plain AR",
        description="Generate an image with an autoregressive text-to-image model. By default with Speculative "
        "Jacobi Decoding (lossless: same distribution as plain sampling, fewer forward passes); --no-sjd runs "
        "plain autoregressive decoding through the same loop; --compare runs both with the same seed.",
    )
    cmd.add_argument(
        "--model",
        default=TRAINED,
        help=f"{TRAINED} (shipped, trained on captioned scenes: 'a red circle at the top left'), "
        f"tiny-janus, tiny-emu3 (embedded, random weights) or a Janus / Emu3 hub id or folder "
        f"(default: {TRAINED})",
    )
    cmd.add_argument("--prompt", default=DEFAULT_PROMPT)
    cmd.add_argument("--negative-prompt", default=None, help="unconditional prompt (Emu3 only)")
    cmd.add_argument("--no-sjd", action="store_true", help="plain autoregressive decoding")
    cmd.add_argument("--compare", action="store_true", help="run SJD and AR with the same seed, report both")
    cmd.add_argument(
        "--window",
        type=positive,
        default=16,
        help="SJD drafts per pass, besides the pending token (default 16; the official "
        "max_num_new_tokens=16 is --window 15)",
    )
    cmd.add_argument(
        "--init",
        default="random",
        choices=("random", "sample_horizontal", "sample_vertical", "repeat_horizontal", "repeat_vertical"),
        help="initialisation of new draft tokens (default random)",
    )
    cmd.add_argument("--greedy", action="store_true", help="argmax decoding (SJD: plain Jacobi, identical to AR)")
    cmd.add_argument(
        "--guidance-scale", type=finite, default=None, help="CFG weight (default: Janus 5.0, Emu3 3.0; 1 disables CFG)"
    )
    cmd.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature, > 0 (default 1)")
    cmd.add_argument("--top-k", type=positive, default=None, help="default: Emu3 2048, Janus none")
    cmd.add_argument("--top-p", type=fraction, default=None, help="nucleus sampling mass in (0, 1]")
    cmd.add_argument("--height", type=positive, help="Emu3: output height in pixels (multiple of 8)")
    cmd.add_argument("--width", type=positive, help="Emu3: output width in pixels (multiple of 8)")
    cmd.add_argument("--seed", type=int, default=0)
    cmd.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    cmd.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/t2i-ar.png"),
        help="output image, .png/.jpg/.jpeg (with --compare, -sjd and -ar are added to its name)",
    )
    cmd.set_defaults(run=run)


def _load(model: str, device: str | None):
    from .. import tiny
    from ..loading import load_transformers_model
    from ..tiny import micro_janus

    loaders = {name: (lambda kind=kind: tiny.ar_image_model(kind)) for name, kind in TINY.items()}
    loaders[TRAINED] = micro_janus.load
    return load_transformers_model(model, loaders, device)


def run(args: argparse.Namespace) -> int:
    from ..jobs.manifest import respect_umask
    from ..pipelines.sjd import SJDConfig, SJDPipeline
    from ..video import save_media
    from ._common import IMAGE_SUFFIXES, check_output_file

    if args.compare and args.no_sjd:
        raise ValueError("--compare runs both SJD and AR: drop --no-sjd")
    check_output_file(args.out, "--out", IMAGE_SUFFIXES)
    pipe = SJDPipeline(*_load(args.model, args.device))
    config = SJDConfig(window=args.window, init=args.init, greedy=args.greedy)
    call = dict(
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        height=args.height,
        width=args.width,
        seed=args.seed,
    )
    runs = (
        [("sjd", config), ("ar", None)]
        if args.compare
        else [("ar" if args.no_sjd else "sjd", None if args.no_sjd else config)]
    )
    print(f"model {args.model} ({type(pipe.model).__name__}) on {pipe.model.device}")
    results = {}
    for name, sjd in runs:
        start = time.perf_counter()
        out = pipe(args.prompt, sjd=sjd, greedy=args.greedy, **call)
        seconds = time.perf_counter() - start
        path = args.out if not args.compare else args.out.with_name(f"{args.out.stem}-{name}{args.out.suffix}")
        respect_umask(save_media(out.images[0], path))
        results[name] = (out.stats.forwards, seconds)
        print(
            f"{name.upper():3s}: {out.stats.tokens} tokens in {out.stats.forwards} forward passes "
            f"({out.stats.tokens_per_forward:.2f} tokens/pass), {seconds:.2f} s; saved {path}"
        )
    if args.compare:
        (sjd_f, sjd_s), (ar_f, ar_s) = results["sjd"], results["ar"]
        print(f"SJD: {ar_f / sjd_f:.2f}x fewer forward passes, {ar_s / sjd_s:.2f}x faster")
    return 0
