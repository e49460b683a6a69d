"""LatentWarp: coherence and cost against per-frame translation and cross-frame attention alone.

Videos: a camera panning and zooming over real photos (scikit-image), so the source flow is
known. For each video and mode, in one process with the same noise:

- warp error of the output: each output frame warped along the SOURCE video's flow (DIS, as the
  pipeline computes it) onto the next (0-1 scale; lower = more coherent), leaving out one fixed
  mask per video (forward-backward DIS occlusion), so that modes with different occlusion rules are
  judged on the same pixels; and the same along the TRUE flow, leaving out only the pixels whose
  true source lies outside the frame;
- the share of pixels the mode's own occlusion mask leaves unwarped, and the warped steps per frame;
- frames per second, and the time of flow + occlusion + latent warping, also as a share of plain
  per-frame translation (the goal: <= 10%).

Modes: the paper's rules are LatentWarp's defaults (warp the first 80% of the schedule; occlusion
from the warped source frames' difference, Eq. 6); "FB mask" swaps in forward-backward flow
consistency; "former rules" are hasten's before issue 25 (warp_end 0.3 of the steps run, FB mask).

    python benchmarks/latentwarp.py                                   # tiny SD 1.5, CPU
    python benchmarks/latentwarp.py --microworld 24                   # the trained SD 1.5 micro-world, 24 recolours
    python benchmarks/latentwarp.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda \\
        --size 512x512 --steps 20
"""

from __future__ import annotations

import argparse
import json

import torch

from hasten.loading import load_pipeline
from hasten.measure import timed
from hasten.pipelines.latentwarp import LatentWarpPipeline
from hasten.tiny.motion import panned, zoomed
from hasten.video import flow_pair, occlusion_mask, warp_error
from hasten.video.flow import leaves_frame

from common import machine

MODES = {
    "per-frame": dict(warp=False, cross_frame=False),
    "cross-frame only": dict(warp=False, cross_frame=True),
    "LatentWarp (warp only)": dict(warp=True, cross_frame=False),
    "LatentWarp (paper rules)": dict(warp=True, cross_frame=True),
    "LatentWarp, FB mask": dict(warp=True, cross_frame=True, occlusion="forward-backward"),
    "LatentWarp (former rules)": dict(
        warp=True, cross_frame=True, occlusion="forward-backward", warp_end=0.3, warp_window="run"
    ),
}


MICRO_MODES = ("per-frame", "cross-frame only", "LatentWarp (paper rules)")


def microworld(clips: int, device: str, steps: int, frames: int, as_json: bool) -> None:
    """Fidelity beside coherence on the trained SD 1.5 micro-world (``micro-sd15``): each of ``clips`` held-out
    one-object scenes, panned, is translated with a prompt naming its object in a far colour
    (:func:`hasten.tiny.micro_sd15.recolour_clip`); per mode, the same noise for every clip."""
    from hasten.tiny import scenes
    from hasten.tiny.micro_sd15 import DRAW_SIZE, recolour_clip, recolour_scores

    pipe = LatentWarpPipeline.from_pipe(load_pipeline("micro-sd15", "float32", device))
    height, width = DRAW_SIZE
    print(
        f"# LatentWarp on micro-sd15 | {machine(torch.device(device))} | {clips} held-out recolours, {frames} frames "
        f"{height}x{width} panning, {steps} steps, strength 0.75, guidance 7.5"
    )
    tasks = [recolour_clip(seed, height, width, frames) for seed in scenes.HELD_OUT_SEEDS[:clips]]
    print(
        f"{'mode':26s} {'warp err':>9s} {'recoloured':>10s} {'every frame':>11s} {'kept colour':>11s} "
        f"{'background':>10s} {'s/clip':>7s}"
    )
    rows = []
    for mode in MICRO_MODES:
        totals = dict(warp_error=0.0, recoloured=0.0, all_frames=0.0, kept_colour=0.0, background_psnr=0.0, seconds=0.0)
        for task in tasks:
            out, seconds = timed(
                lambda: pipe(
                    video=task.video.frames,
                    prompt=task.prompt,
                    num_inference_steps=steps,
                    progress=False,
                    **MODES[mode],
                ),
                device,
            )
            scores = recolour_scores(out.frames, task)
            for key in ("recoloured", "all_frames", "kept_colour", "background_psnr"):
                totals[key] += scores[key] / clips
            totals["warp_error"] += out.warp_error / clips
            totals["seconds"] += seconds / clips
        row = {"mode": mode, **{key: round(value, 4) for key, value in totals.items()}}
        rows.append(row)
        print(
            f"{mode:26s} {row['warp_error']:9.4f} {row['recoloured']:10.1%} {row['all_frames']:11.1%} "
            f"{row['kept_colour']:11.1%} {row['background_psnr']:7.1f} dB {row['seconds']:7.2f}"
        )
    if as_json:
        for row in rows:
            print(json.dumps(row))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-sd15")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--size", default="128x192", help="HxW, multiples of 8")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (the paper: 20)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per mode (median), after a warm-up")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--microworld",
        type=int,
        default=0,
        metavar="N",
        help="instead: N held-out recolours of panning scenes on the trained micro-sd15 (fidelity beside coherence)",
    )
    args = parser.parse_args(argv)
    if args.microworld:
        microworld(args.microworld, args.device, args.steps, args.frames, args.json)
        return
    height, width = (int(v) for v in args.size.lower().split("x"))
    pipe = LatentWarpPipeline.from_pipe(load_pipeline(args.model, args.dtype, args.device))
    print(
        f"# LatentWarp | {machine(torch.device(args.device))} | {args.model} | {args.frames} frames {height}x{width}, "
        f"{args.steps} steps, strength 0.75"
    )
    videos = {
        "pan astronaut": panned(frames=args.frames, size=(height, width), step=(4, 1), name="astronaut"),
        "pan coffee": panned(frames=args.frames, size=(height, width), step=(-3, 0), name="coffee"),
        "zoom chelsea": zoomed(frames=args.frames, size=(height, width), rate=1.03, name="chelsea"),
    }
    rows = []
    for name, (frames, true_flows) in videos.items():
        print(f"\n## {name}")
        print(
            f"{'mode':26s} {'warp err':>9s} {'true-flow err':>13s} {'occluded':>8s} {'warped':>6s} {'fps':>7s} "
            f"{'flow+warp s':>11s} {'share':>7s}"
        )
        source_flows, reference_masks = [], []
        for index in range(1, len(frames)):
            to_previous, to_current = flow_pair(frames[index - 1], frames[index])
            source_flows.append(to_previous)
            reference_masks.append(occlusion_mask(to_previous, to_current))
        true_masks = [leaves_frame(flow) for flow in true_flows]
        plain_seconds = None
        for mode, options in MODES.items():
            pipe(
                video=frames[:2],
                prompt="a watercolor painting",
                num_inference_steps=args.steps,
                progress=False,
                **options,
            )  # warm-up
            runs = [
                timed(
                    lambda: pipe(
                        video=frames,
                        prompt="a watercolor painting",
                        num_inference_steps=args.steps,
                        progress=False,
                        **options,
                    ),
                    args.device,
                )
                for _ in range(args.repeats)
            ]
            out = runs[-1][0]
            seconds = sorted(seconds for _, seconds in runs)[len(runs) // 2]
            plain_seconds = plain_seconds or seconds
            overhead = out.seconds["flow"] + out.seconds["warp"] if options["warp"] else 0.0
            error = warp_error(out.frames, source_flows, reference_masks)
            true_error = warp_error(out.frames, true_flows, true_masks)
            occluded = (
                float(sum(mask.mean() for mask in out.occlusions) / len(out.occlusions)) if options["warp"] else 0.0
            )
            row = dict(
                video=name,
                mode=mode,
                warp_error=round(error, 5),
                true_flow_error=round(true_error, 5),
                occluded=round(occluded, 4),
                warped_steps=out.warped_steps,
                fps=round(len(frames) / seconds, 2),
                flow_warp_seconds=round(overhead, 4),
                overhead_share=round(overhead / plain_seconds, 4),
                seconds=round(seconds, 3),
            )
            rows.append(row)
            print(
                f"{mode:26s} {row['warp_error']:9.4f} {row['true_flow_error']:13.4f} {occluded:8.1%} "
                f"{out.warped_steps:6d} {row['fps']:7.2f} {overhead:11.3f} {row['overhead_share']:6.1%}"
            )
    if args.json:
        for row in rows:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
