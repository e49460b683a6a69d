"""SJD vs AR on the trained micro Janus: forward passes, wall time, tokens per pass, image quality.

The random tiny models cannot say what Speculative Jacobi Decoding saves: their next-token
distributions are near-uniform. This script measures it on the micro Janus trained on captioned
scenes (:mod:`hasten.tiny.micro_janus`, shipped weights), at batch 1 (one prompt per call, CFG's
conditional and unconditional rows as one doubled batch), with the official Janus sampling
settings (CFG 5, temperature 1, no top-k).

For each held-out scene caption (``hasten.tiny.scenes.HELD_OUT_SEEDS``), plain AR decoding and
every SJD setting (each draft initialisation x each window) generate one image with the same
seed, interleaved prompt by prompt so that background load on the machine hits every setting
alike. Reported per setting: forward passes per image (the prefill counted), how many times fewer
than AR, image tokens emitted per decoding pass, wall time per pass (what bounds the speedup: an
SJD pass runs 1 + L tokens and the draft bookkeeping), median wall time per image (prompt encoding,
decoding and VQ decoding included) and the speedup; and the image quality of its samples judged by
the scene attribute classifier (:mod:`hasten.tiny.classifier`): the fraction of requested objects
found with the right shape and colour in the right cell, and with the right colour alone, and
the colour accuracy's difference from AR's with its 95% interval. SJD is lossless, so every difference should be
sampling noise. Ceilings for reference: the classifier on the ground-truth renders and on the VQ
tokenizer's reconstructions (what a perfect AR model could reach).

    python benchmarks/sjd_trained.py --prompts 64 --out results/sjd_trained-cpu.txt --grid /tmp/sjd_trained.png
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from hasten.measure import timed
from hasten.pipelines import SJDConfig, SJDPipeline
from hasten.pipelines.sjd import INIT_STRATEGIES
from hasten.tiny import micro_janus, scenes
from hasten.tiny.classifier import evaluate, load_classifier

from common import print_json


def held_out(count: int) -> list[scenes.Scene]:
    """The first ``count`` held-out scenes as the micro Janus was trained on them (32 x 32, 1-2 objects)."""
    return micro_janus.scene_images(scenes.HELD_OUT_SEEDS[:count])[1]


def _diff_interval(a: float, b: float, n: int) -> float:
    """Half-width of the 95% normal interval of the difference of two proportions over ``n`` objects each."""
    return 1.96 * math.sqrt(max(a * (1 - a) + b * (1 - b), 1e-12) / n)


def run(
    pipe: SJDPipeline, prompts: list[str], configs: list[tuple[str, SJDConfig | None]], guidance_scale: float | None
) -> dict[str, dict]:
    """Generate every prompt with every config (interleaved); per config: stats lists and images."""
    results = {name: dict(forwards=[], per_pass=[], seconds=[], images=[]) for name, _ in configs}
    pipe(prompts[0], sjd=None, guidance_scale=guidance_scale, seed=0)  # warm-up
    for index, prompt in enumerate(prompts):
        for name, config in configs:
            out, seconds = timed(
                lambda: pipe(prompt, sjd=config, guidance_scale=guidance_scale, seed=index), pipe.model.device
            )
            slot = results[name]
            slot["forwards"].append(out.stats.forwards)
            slot["per_pass"].append(out.stats.tokens_per_forward)
            slot["seconds"].append(seconds)
            slot["images"].append(out.images[0])
        print(f"prompt {index + 1}/{len(prompts)} done", file=sys.stderr, flush=True)
    return results


def save_grid(path: Path, rows: dict[str, list[torch.Tensor]], count: int, scale: int = 4) -> None:
    """One row of ``count`` images per setting, nearest-neighbour enlarged, as a PNG."""
    from PIL import Image

    lines = [torch.cat(images[:count], -1) for images in rows.values()]
    grid = torch.cat(lines, -2)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64, help="held-out scene captions (default 64)")
    parser.add_argument("--init", nargs="+", default=list(INIT_STRATEGIES), choices=INIT_STRATEGIES)
    parser.add_argument("--windows", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: Janus's 5.0")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--model", type=Path, default=None, help="a micro Janus folder (default: the shipped one)")
    parser.add_argument("--classifier", type=Path, default=None, help="attribute classifier folder (default: shipped)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--grid", type=Path, default=None, help="save a PNG: one row of samples per setting")
    parser.add_argument(
        "--samples",
        type=Path,
        default=None,
        help="save the generated images and per-image stats here (torch.save), for --judge",
    )
    parser.add_argument(
        "--judge", type=Path, default=None, help="no generation: judge the samples saved by an earlier --samples run"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.prompts < 1:
        raise ValueError(f"--prompts must be >= 1, got {args.prompts}")
    torch.set_num_threads(args.threads)
    model, processor = micro_janus.load(args.model)
    pipe = SJDPipeline(model, processor)
    pipe.progress_bar = False
    classifier = load_classifier(args.classifier)
    test = held_out(args.prompts)
    prompts = [scene.caption for scene in test]
    configs = [("AR", None)] + [
        (f"{init} L={window}", SJDConfig(window=window, init=init)) for init in args.init for window in args.windows
    ]
    if args.judge is not None:
        saved = torch.load(args.judge, weights_only=False)
        if saved["prompts"] != prompts or list(saved["results"]) != [name for name, _ in configs]:
            raise ValueError(f"--judge {args.judge}: saved for other prompts or settings")
        results = saved["results"]
    else:
        results = run(pipe, prompts, configs, args.guidance_scale)
    command = "cd benchmarks && python sjd_trained.py " + " ".join(argv if argv is not None else sys.argv[1:])
    generated = saved.get("command", "?") if args.judge is not None else command
    if args.samples is not None:
        torch.save(dict(prompts=prompts, results=results, command=generated), args.samples)

    truth, _ = micro_janus.scene_images(scenes.HELD_OUT_SEEDS[: args.prompts])
    vq = model.model.vqmodel
    with torch.no_grad():
        recon = ((model.decode_image_tokens(vq.encode(truth).image_tokens.view(len(truth), -1)) + 1) / 2).clamp(0, 1)
    ceilings = {
        "ground truth 32x32": evaluate((truth + 1) / 2, test, classifier),
        "VQ reconstruction": evaluate(recon.permute(0, 3, 1, 2), test, classifier),
    }
    objects = sum(len(scene.objects) for scene in test)

    ar = results["AR"]
    ar_forwards, ar_seconds = statistics.mean(ar["forwards"]), statistics.median(ar["seconds"])
    ar_quality = evaluate(torch.stack(ar["images"]), test, classifier)
    rows = []
    for name, config in configs:
        slot = results[name]
        quality = ar_quality if config is None else evaluate(torch.stack(slot["images"]), test, classifier)
        forwards, seconds = statistics.mean(slot["forwards"]), statistics.median(slot["seconds"])
        rows.append(
            dict(
                setting=name,
                init=None if config is None else config.init,
                window=0 if config is None else config.window,
                forwards=round(forwards, 1),
                fewer_passes=round(ar_forwards / forwards, 2),
                tokens_per_pass=round(statistics.mean(slot["per_pass"]), 2),
                seconds=round(seconds, 4),
                speedup=round(ar_seconds / seconds, 2),
                object_acc=round(quality["object"], 3),
                colour_acc=round(quality["colour"], 3),
                ms_per_pass=round(1000 * seconds / forwards, 2),
                colour_diff=round(quality["colour"] - ar_quality["colour"], 3),
                colour_diff_ci=round(_diff_interval(quality["colour"], ar_quality["colour"], objects), 3),
            )
        )

    parameters = sum(p.numel() for p in model.parameters())
    scale = pipe.adapter.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
    lines = [
        f"# command: {command}",
        *([f"# samples generated by: {generated}"] if generated != command else []),
        f"# {time.strftime('%Y-%m-%d')} | 2-core CPU, no GPU (shared), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s) | micro Janus (trained, {parameters / 1e6:.2f} M parameters, "
        f"8 x 8 = 64 image tokens, codebook 256) | batch 1, CFG {scale}, temperature 1 | {args.prompts} held-out "
        f"captions, {objects} objects",
        f"{'setting':24s} {'passes':>7s} {'fewer':>6s} {'tok/pass':>8s} {'ms/pass':>8s} {'s/image':>8s} {'speedup':>7s} "
        f"{'object acc':>10s} {'colour acc':>10s} {'colour - AR':>16s}",
    ]
    for r in rows:
        diff = "" if r["window"] == 0 else f"{r['colour_diff']:+.3f} +- {r['colour_diff_ci']:.3f}"
        lines.append(
            f"{r['setting']:24s} {r['forwards']:7.1f} {r['fewer_passes']:5.2f}x {r['tokens_per_pass']:8.2f} "
            f"{r['ms_per_pass']:8.2f} {r['seconds']:8.4f} {r['speedup']:6.2f}x {r['object_acc']:10.3f} "
            f"{r['colour_acc']:10.3f} {diff:>16s}"
        )
    for name, quality in ceilings.items():
        lines.append(f"ceiling, {name}: object acc {quality['object']:.3f}, colour acc {quality['colour']:.3f}")
    lines.append(
        "object acc: shape and colour right in the named cell; colour acc: colour right there (classifier "
        "judge); colour - AR: difference from AR with its 95% interval (SJD is lossless: noise only)"
    )
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")
    if args.grid is not None:
        save_grid(args.grid, {name: results[name]["images"] for name, _ in configs}, min(8, args.prompts))
    if args.json:
        print_json(rows)


if __name__ == "__main__":
    main()
