"""``hasten edit``: ConsistEdit an image (or a generated image / video) from a source to a target prompt."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._types import positive


def register(commands) -> None:
    parser = commands.add_parser(
        "edit",
        help="training-free editing with ConsistEdit (SD3, Flux; CogVideoX, Wan videos)",
        description="Edit with ConsistEdit. With --image the image is inverted first (real mode); without it both "
        "prompts are generated from one noise (synthetic mode; --video for CogVideoX / Wan). The edit region comes "
        "from --edit-words (words of the source prompt) or --mask (white = edit). Writes the edit to --out and the "
        "source (reconstruction) beside it as <out>-source.",
    )
    parser.add_argument("--image", type=Path, help="image to edit (real mode)")
    parser.add_argument(
        "--video", action="store_true", help="synthetic video editing (the model must be CogVideoX or Wan)"
    )
    parser.add_argument("--source-prompt", required=True)
    parser.add_argument("--target-prompt", required=True)
    parser.add_argument("--edit-words", nargs="+", help="words of the source prompt that name what changes")
    parser.add_argument("--mask", type=Path, help="mask image, white = edit region (instead of --edit-words)")
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="structural consistency: share of steps with source Q/K on all tokens "
        "(1.0 colour/material, 0.3 style/shape; default 1.0 synthetic, 0.1 real)",
    )
    parser.add_argument(
        "--model",
        default="tiny-flux",
        help="tiny-flux, tiny-sd3, tiny-cogvideox, tiny-wan, or a diffusers SD3 / Flux / CogVideoX / Wan id or folder",
    )
    parser.add_argument("--steps", type=positive, default=28)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--solver", choices=("uni", "euler", "midpoint"), default="uni", help="inversion solver")
    parser.add_argument(
        "--height",
        type=positive,
        help="working height (default: with --image and --mask, the "
        "image's, rounded down to the model's multiple; else the model's)",
    )
    parser.add_argument("--width", type=positive, help="working width (default: as --height)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-sequence-length",
        type=positive,
        default=None,
        help="text tokens of the T5 / LLM encoder (default: the pipeline's own: SD3 256, Flux 512, "
        "CogVideoX 226, Wan 512)",
    )
    parser.add_argument(
        "--cache-dtype",
        choices=("float32", "bfloat16", "float16"),
        default="bfloat16",
        help="storage of the recorded source features (real mode)",
    )
    parser.add_argument("--cache-int8", action="store_true", help="store the source features as int8")
    parser.add_argument("--spill-dir", type=Path, help="keep the source features in files here, not in RAM")
    parser.add_argument("--no-blend", action="store_true", help="attention control only (the paper's), no latent blend")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output .png/.jpg/.jpeg (.mp4/.avi with --video); the source goes beside it as "
        "<out>-source (default outputs/edit.png, with --video outputs/edit.mp4)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from ..hooks.feature_cache import FeatureCacheConfig
    from ..jobs.manifest import respect_umask
    from ..loading import check_device, load_pipeline, pipeline_source, working_size
    from ..pipelines.consistedit import ConsistEditPipeline, grid_mask
    from ..pipelines.flow_models import pixel_multiple
    from ..video import save_media
    from ._common import IMAGE_SUFFIXES, VIDEO_SUFFIXES, check_output_file

    if (args.edit_words is None) == (args.mask is None):
        print("hasten edit: give exactly one of --edit-words and --mask", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = Path("outputs/edit.mp4" if args.video else "outputs/edit.png")
    try:
        check_output_file(args.out, "--out", VIDEO_SUFFIXES if args.video else IMAGE_SUFFIXES)
        check_device(args.device)
        pipeline_source(args.model)
        image = Image.open(args.image).convert("RGB") if args.image else None
        mask = np.asarray(Image.open(args.mask).convert("L")) if args.mask else None
        if mask is not None and not mask.any():
            raise ValueError(
                f"--mask {args.mask} is all black: nothing to edit (white = the edit region, black = kept)"
            )
    except (OSError, ValueError) as error:
        print(f"hasten edit: {error}", file=sys.stderr)
        return 2
    pipe = load_pipeline(args.model, args.dtype, args.device)
    height, width = args.height, args.width
    if image is not None and mask is not None and not args.video:
        # a mask drawn on the input image fits it: work at the image's size (the model's multiple)
        multiple = pixel_multiple(pipe)
        height = height or max(multiple, image.height // multiple * multiple)
        width = width or max(multiple, image.width // multiple * multiple)
        if mask.shape == (image.height, image.width) and mask.shape != (height, width):
            mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.NEAREST))
    size = working_size(args.model)  # an embedded tiny model's own size; else the pipeline's defaults
    height, width, frames = height or size.get("height"), width or size.get("width"), size.get("num_frames")
    try:
        editor = ConsistEditPipeline.from_pipe(
            pipe, height=height, width=width, num_frames=frames, max_sequence_length=args.max_sequence_length
        )
        if args.video != (editor.video is not None):
            raise ValueError(f"--video needs a CogVideoX or Wan model, and a {type(pipe).__name__} needs no --video")
        if (
            mask is not None
            and editor.video is None
            and not grid_mask(mask, editor.model.grid, editor.model.height, editor.model.width).any()
        ):
            raise ValueError(
                f"--mask {args.mask}: its white area covers no whole token at {editor.model.height}x"
                f"{editor.model.width} (half of a token's pixels must be white); nothing would be edited"
            )
        out = editor.edit(
            args.source_prompt,
            args.target_prompt,
            edit_words=args.edit_words,
            mask=mask,
            alpha=args.alpha,
            image=image,
            seed=args.seed,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            solver=args.solver,
            blend_latents=not args.no_blend,
            cache=FeatureCacheConfig(
                dtype=args.cache_dtype,
                quantize=args.cache_int8,
                spill_dir=str(args.spill_dir) if args.spill_dir else None,
            ),
        )
    except ValueError as error:
        print(f"hasten edit: {error}", file=sys.stderr)
        return 2
    target = respect_umask(save_media(out.target, args.out))
    source = respect_umask(save_media(out.source, args.out.with_name(f"{args.out.stem}-source{args.out.suffix}")))
    region = out.edit_region.float().mean().item()
    print(
        f"wrote {target} (edit) and {source} (source); edit region {region:.0%} of the tokens; "
        + ", ".join(f"{k} {v:.2f} s" for k, v in out.seconds.items() if v)
        + (f"; source features {out.cache_bytes / 2**20:.1f} MiB" if out.cache_bytes else "")
    )
    return 0
