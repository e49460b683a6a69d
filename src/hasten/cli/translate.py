"""``hasten translate``: translate videos with LatentWarp, as a resumable batch (local or Ray)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._types import fraction, positive


def register(commands) -> None:
    parser = commands.add_parser(
        "translate",
        help="translate videos with LatentWarp (resumable batch; local or Ray)",
        description="Translate each input video with a prompt (LatentWarp on Stable Diffusion 1.5). Outputs go to "
        "--output as <input name>.mp4, each written atomically, with a manifest (manifest.jsonl) of every attempt. "
        "Re-running skips videos already done with the same settings, redoes those whose settings changed, and "
        "retries failed ones with --retry-failed; input and output paths are normalised, so `out/` and `$PWD/out` "
        "resume the same work. One run per output folder: a second run on the same --output stops at once with "
        "exit code 2 (it does not wait). Exits 1 if any video failed.",
    )
    parser.add_argument("inputs", nargs="*", type=Path, help="video files or folders of videos")
    parser.add_argument(
        "--jobs",
        type=Path,
        help='JSONL file, one job per line: {"input": ..., "prompt": ..., "output"?: ..., "options"?: {...}}',
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="output folder (holds the manifest; locked while a run uses it)"
    )
    parser.add_argument("--prompt", help="prompt for every input (required without --jobs)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument(
        "--model",
        default="tiny-sd15",
        help="tiny-sd15 (random weights, fast), micro-sd15 (trained on hasten's scenes: real content) "
        "or a Stable Diffusion 1.x/2.x model id/folder (default: tiny-sd15)",
    )
    parser.add_argument("--strength", type=fraction, default=0.75, help="img2img strength (default 0.75)")
    parser.add_argument("--steps", type=positive, default=20, help="denoising steps (default 20)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument(
        "--warp-end",
        type=float,
        default=0.8,
        help="fraction of the denoising schedule with latent warping (0.8: LatentWarp's 16 of 20 steps)",
    )
    parser.add_argument(
        "--warp-window",
        choices=("schedule", "run"),
        default="schedule",
        help="--warp-end counts the full schedule (schedule, the paper's) or the img2img steps run "
        "(run, hasten's former rule, formerly with --warp-end 0.3)",
    )
    parser.add_argument(
        "--occlusion",
        choices=("warped-difference", "forward-backward"),
        default="warped-difference",
        help="occlusion mask: the warped source frames' difference (LatentWarp's Eq. 6, default) or "
        "forward-backward flow consistency",
    )
    parser.add_argument("--no-warp", action="store_true", help="no latent warping")
    parser.add_argument("--no-cross-frame", action="store_true", help="no cross-frame attention")
    parser.add_argument("--height", type=positive, help="working height, a multiple of 8 (default: the video's)")
    parser.add_argument("--width", type=positive, help="working width, a multiple of 8 (default: the video's)")
    parser.add_argument("--max-frames", type=positive, help="translate at most this many frames per video")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retry-failed", action="store_true", help="retry videos whose last attempt failed")
    parser.add_argument("--backend", choices=("local", "ray"), default="local")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: start/join a local one)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    parser.add_argument("--no-audio", action="store_true", help="do not copy the source audio")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..jobs import Job, find_videos, jobs_from_file, run_jobs
    from ..loading import check_device, pipeline_source
    from ._common import check_output_folder

    try:  # everything that can be checked before a model loads or a folder is created
        check_output_folder(args.output, "--output")
        check_device(args.device)
        source = pipeline_source(args.model)
    except ValueError as error:
        print(f"hasten translate: {error}", file=sys.stderr)
        return 2
    model = args.model if source is None or not Path(args.model).is_dir() else str(Path(args.model).resolve())
    options = {
        "strength": args.strength,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "warp_end": args.warp_end,
        "warp_window": args.warp_window,
        "occlusion": args.occlusion,
        "warp": not args.no_warp,
        "cross_frame": not args.no_cross_frame,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
    }
    for name in ("height", "width", "max_frames"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    jobs = []
    if args.jobs is not None:
        try:
            jobs += jobs_from_file(args.jobs, args.output, options, model)
        except ValueError as error:  # names the file and line
            print(f"hasten translate: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"hasten translate: --jobs {args.jobs}: {error.strerror or error}", file=sys.stderr)
            return 2
    if args.inputs:
        if not args.prompt:
            print("hasten translate: --prompt is required for inputs given on the command line", file=sys.stderr)
            return 2
        try:
            videos = find_videos(args.inputs)
        except FileNotFoundError as error:
            print(f"hasten translate: {error}", file=sys.stderr)
            return 2
        jobs += [Job(video, args.output / f"{video.stem}.mp4", args.prompt, options, model) for video in videos]
    if not jobs:
        print("hasten translate: nothing to translate (give INPUT... or --jobs)", file=sys.stderr)
        return 2
    try:
        summary = run_jobs(
            jobs,
            args.output,
            backend=args.backend,
            retry_failed=args.retry_failed,
            device=args.device,
            dtype=args.dtype,
            ray_address=args.ray_address,
            audio=not args.no_audio,
        )
    except ValueError as error:
        print(f"hasten translate: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0 if summary.ok else 1
