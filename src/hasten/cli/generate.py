"""``hasten generate``: run a diffusers pipeline, optionally with GRAT, or compare dense vs GRAT.

The default model is ``micro-flux``, the FLUX micro-world trained on hasten's generated scenes and
shipped with the package (:mod:`hasten.tiny.micro_diffusion`): prompts in its language ("a red circle
at the top left and a small blue square at the bottom right") give recognisable images, and
``--compare`` also judges both outputs with the shipped attribute classifier (prompt accuracy) and
saves a side-by-side picture (dense | GRAT | difference x4).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .. import tiny
from ..hooks.grat import GratConfig, apply_grat, grat_state
from ..jobs.manifest import respect_umask
from ..kernels import BACKENDS
from ..loading import DTYPES, load_pipeline
from ..measure import compare_grat
from ..tiny.micro_diffusion import CALL_DEFAULTS
from ..video import save_media
from ._common import check_output_file
from ._types import positive, size

VIDEO_PIPELINES = ("HunyuanVideoPipeline", "WanPipeline", "CogVideoXPipeline")

MICRO_FLUX = "micro-flux"
"""``--model`` name of the trained FLUX micro-world (:func:`hasten.tiny.trained.load` ``("flux")``)."""

# The micro-world's defaults (hasten.tiny.micro_diffusion.CALL_DEFAULTS): the canvas it draws on (DRAW_SIZE: its
# last prompt phase learned places there; other sizes come out with misplaced or repeated objects,
# docs/microworld.md), 20 Euler steps; 4x4-token groups. The prompt: one object, as the prompt phase trained.
MICRO_DEFAULTS = {key: CALL_DEFAULTS[key] for key in ("height", "width", "num_inference_steps")}
MICRO_GROUP = 4
CPU_GAIN_SIDE = 128
"""Square canvas side from which GRAT-X is faster end to end than dense on micro-flux on a 2-core CPU (32 x 32
latent tokens; benchmarks/results/grat_fidelity-cpu.txt)."""
MICRO_PROMPT = "a red circle at the top left"
DEFAULT_PROMPT = "a lighthouse on a cliff at sunset, highly detailed"


def register(commands) -> None:
    gen = commands.add_parser(
        "generate",
        help="run a diffusers pipeline, optionally with GRAT sparse attention",
        description="Generate an image or video. With --compare, run dense and GRAT with the same seed and "
        "report both times, the speedup (with the attention bound: 1/density, padding counted) and the PSNR between them.",
    )
    gen.add_argument(
        "--model",
        default=MICRO_FLUX,
        help=f"{MICRO_FLUX} (the trained FLUX micro-world, shipped), an embedded random-weight tiny "
        f"model ({', '.join(tiny.MODEL_IDS)}) or any diffusers model id / local folder "
        f"(default: {MICRO_FLUX})",
    )
    gen.add_argument(
        "--prompt",
        default=None,
        help=f"the prompt (default for {MICRO_FLUX}: {MICRO_PROMPT!r}; otherwise {DEFAULT_PROMPT!r})",
    )
    gen.add_argument("--height", type=positive, help="output height (default: the model's default)")
    gen.add_argument("--width", type=positive, help="output width (default: the model's default)")
    gen.add_argument("--frames", type=positive, help="number of frames (video models)")
    gen.add_argument(
        "--steps", type=positive, default=None, help=f"denoising steps (default: 20 {MICRO_FLUX}, 4 tiny, 28 otherwise)"
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--grat",
        choices=("off", "cross", "block"),
        default="cross",
        help="GRAT pattern: cross (GRAT-X), block (GRAT-B) or off (dense)",
    )
    gen.add_argument(
        "--group-size",
        type=size,
        default=None,
        help=f"group size in latent tokens: N, HxW or TxHxW (default: {MICRO_GROUP} for {MICRO_FLUX}, "
        "else the model family's)",
    )
    gen.add_argument("--window", type=size, default=(1,), help="GRAT-B window in groups per side (default 1)")
    gen.add_argument("--dense-steps", type=int, default=0, help="first N steps use dense attention")
    gen.add_argument("--backend", choices=BACKENDS, default="auto", help="attention kernel backend")
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    gen.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights dtype (default: float32 for tiny models and CPU, bfloat16 on CUDA)",
    )
    gen.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/hasten.png"),
        help="output file, .png/.jpg/.jpeg (or .mp4/.avi); with --compare, -dense and -grat are added "
        "to its name (videos are written as .mp4 unless it ends in .avi); a folder is an error",
    )
    gen.add_argument("--compare", action="store_true", help="run dense and GRAT with the same seed and compare")

    gen.set_defaults(run=generate)


def _prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    return MICRO_PROMPT if args.model == MICRO_FLUX else DEFAULT_PROMPT


def _call_kwargs(args: argparse.Namespace, pipe) -> dict:
    kwargs: dict = {"prompt": _prompt(args)}
    if args.model == MICRO_FLUX:
        kwargs.update(CALL_DEFAULTS)
    elif tiny.is_tiny(args.model):
        kwargs.update(tiny.default_size(tiny.MODEL_IDS[args.model]))
    for name, value in (("height", args.height), ("width", args.width), ("num_frames", args.frames)):
        if value is not None:
            kwargs[name] = value
    if "num_frames" in kwargs and type(pipe).__name__ not in VIDEO_PIPELINES:
        if args.frames is not None:
            raise ValueError(f"--frames is for video models; {type(pipe).__name__} makes images")
        kwargs.pop("num_frames")
    if args.steps is not None or "num_inference_steps" not in kwargs:
        kwargs["num_inference_steps"] = args.steps or (4 if tiny.is_tiny(args.model) else 28)
    return kwargs


def _config(args: argparse.Namespace) -> GratConfig:
    window = args.window[0] if len(args.window) == 1 else args.window
    group = None if args.group_size is None else (args.group_size[0] if len(args.group_size) == 1 else args.group_size)
    if group is None and args.model == MICRO_FLUX:
        group = MICRO_GROUP
    return GratConfig(
        pattern=args.grat if args.grat != "off" else "cross",
        group_size=group,
        window=window,
        dense_steps=args.dense_steps,
        backend=args.backend,
    )


DIFFERENCE_GAIN = 4
"""The difference image shows ``|dense - GRAT|`` times this, clamped to [0, 1]."""


def difference(dense: torch.Tensor, grat: torch.Tensor) -> torch.Tensor:
    """``|dense - GRAT| x DIFFERENCE_GAIN`` clamped to [0, 1] (any shape).

    Examples
    --------
    >>> difference(torch.zeros(1), torch.full((1,), 0.1))
    tensor([0.4000])
    """
    return ((dense - grat).abs() * DIFFERENCE_GAIN).clamp(0, 1)


def side_by_side(dense: torch.Tensor, grat: torch.Tensor, gap: int = 4) -> torch.Tensor:
    """``dense | GRAT | |dense - GRAT| x 4`` as one ``(3, H, 3 W + 2 gap)`` image in [0, 1] (white gaps).

    Examples
    --------
    >>> side_by_side(torch.zeros(3, 8, 8), torch.ones(3, 8, 8)).shape
    torch.Size([3, 8, 32])
    """
    if dense.shape != grat.shape or dense.dim() != 3:
        raise ValueError(
            f"`dense` and `grat` must be (3, H, W) images of one shape; got {tuple(dense.shape)} "
            f"and {tuple(grat.shape)}"
        )
    white = torch.ones(3, dense.shape[1], gap)
    return torch.cat([dense, white, grat, white, difference(dense, grat)], dim=2)


def _print_prompt_accuracy(kwargs: dict, **outputs: torch.Tensor) -> None:
    """Prompt accuracy of both outputs by the shipped classifier, when the prompt is in the micro-world's language."""
    from ..tiny import scenes
    from ..tiny.classifier import evaluate

    try:
        scene = scenes.scene_from_caption(kwargs["prompt"], kwargs["height"], kwargs["width"])
    except ValueError as error:
        print(f"prompt accuracy: not judged ({error})")
        return
    scores = ", ".join(f"{name} {evaluate(images[:1], [scene])['object']:.0%}" for name, images in outputs.items())
    count = len(scene.objects)
    print(f"prompt accuracy (classifier, {count} object{'s' * (count > 1)}): {scores}")


def _with_suffix(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.stem}-{tag}{path.suffix}")


def _sparsity_note(density: float, bound: float, group, pattern: str) -> str | None:
    """Why GRAT cannot speed attention up at this size, or None when it can."""
    notes = []
    if density >= 0.999:
        notes.append(
            f"GRAT cannot be sparse at this size: with group {group} the {pattern} pattern reaches every "
            "kernel tile of this short sequence (density 100%), so it computes what dense attention does "
            "plus its own overhead; a larger --height/--width (a latent grid several groups across) or a "
            "smaller --group-size lets it skip tiles"
        )
    if bound < 1.0:
        notes.append(
            f"the attention bound {bound:.2f}x is below 1x: padding the tokens to whole groups and kernel "
            "tiles adds more work than the skipped tiles save at this size"
        )
    return ("note: " + "; ".join(notes)) if notes else None


def generate(args: argparse.Namespace) -> int:
    config = _config(args)
    check_output_file(args.out, "--out")
    if args.compare and args.grat == "off":
        raise ValueError("--compare compares dense with GRAT: choose --grat cross or block")
    pipe = load_pipeline(args.model, dtype=args.dtype, device=args.device)
    kwargs = _call_kwargs(args, pipe)
    print(
        f"model {args.model} ({type(pipe).__name__}) on {pipe.device}; "
        + ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "prompt")
    )
    if args.compare:
        if args.grat == "off":
            raise ValueError("--compare compares dense with GRAT: choose --grat cross or block")
        result = compare_grat(pipe, config, seed=args.seed, **kwargs)
        dense_path = respect_umask(save_media(result.dense[0], _with_suffix(args.out, "dense")))
        grat_path = respect_umask(save_media(result.grat[0], _with_suffix(args.out, "grat")))
        print(f"group {result.config.group_size} pattern {result.config.pattern}")
        print(f"dense: {result.dense_seconds:.3f} s")
        print(f"grat:  {result.grat_seconds:.3f} s")
        print(f"speedup: {result.speedup:.2f}x (attention bound {result.bound:.2f}x at density {result.density:.1%})")
        print(f"PSNR(dense, grat): {result.psnr:.2f} dB")
        if args.model == MICRO_FLUX:
            _print_prompt_accuracy(kwargs, dense=result.dense, grat=result.grat)
        note = _sparsity_note(result.density, result.bound, result.config.group_size, result.config.pattern)
        if note:
            print(note)
        if result.dense.dim() == 4:  # images: the side-by-side picture too
            side_path = respect_umask(
                save_media(side_by_side(result.dense[0], result.grat[0]), _with_suffix(args.out, "side"))
            )
            print(f"saved {dense_path}, {grat_path} and {side_path} (dense | GRAT | difference x4)")
        else:
            print(f"saved {dense_path} and {grat_path}")
        return 0
    if args.grat != "off":
        resolved = apply_grat(pipe, config)
        print(f"GRAT {resolved.pattern}, group {resolved.group_size}")
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    start = time.perf_counter()
    output = pipe(**kwargs, generator=generator, output_type="pt", return_dict=False)[0]
    seconds = time.perf_counter() - start
    state = grat_state(pipe)
    if state is not None and state.layouts:
        layout = max(state.layouts.values(), key=lambda layout: layout.seq_len)
        print(f"attention density {layout.density:.1%} (attention bound {layout.bound:.2f}x)")
        note = _sparsity_note(layout.density, layout.bound, layout.group, layout.pattern)
        if note:
            print(note)
    if args.model == MICRO_FLUX:
        _print_prompt_accuracy(kwargs, output=output.float().clamp(0, 1))
    path = respect_umask(save_media(output[0].float().clamp(0, 1), args.out))
    print(f"{seconds:.3f} s; saved {path}")
    return 0
