"""GRAT fidelity beside speed on the trained Wan video micro-world: dense vs GRAT-X vs GRAT-B.

For each clip shape (the training shape 9 frames x 32 x 32 = 5 x 8 x 8 latent tokens, and about 2x
and 4x its token count: more frames and larger frames) the same held-out pan captions are generated
from the same noise with dense attention and with each GRAT variant (and ``dense_steps`` variants
that keep the first steps dense). Per row:

- ``PSNR`` / ``SSIM`` against the dense videos from the same noise (every frame);
- ``pan``: the share of videos whose camera motion, estimated from the frames by phase correlation
  (:func:`hasten.tiny.micro_video.estimate_pan`), goes the captioned way (axis-aligned pans only:
  chance 25%);
- wall time of the whole batched pipeline call (UMT5, transformer, VAE), the speedup over dense,
  the attention bound (1/density of the largest layout, padding counted) and the Amdahl bound of the
  call (attention's measured share ``a`` of the dense call: 1 / ((1 - a) + a / bound)).

Before the table it prints the trained transformer's mean self-attention distance by layer (in
latent tokens over (t, h, w), weighted by attention) at each shape, against a uniform attention's:
GRAT's premise is that this is small.

    python benchmarks/grat_video_fidelity.py --threads 1          # benchmarks/results/grat_video_fidelity-cpu.txt
    python benchmarks/grat_video_fidelity.py --samples 2 --steps 6 --shapes 9x32x32  # a quick look
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.overrides import TorchFunctionMode

from hasten.measure import psnr, ssim, timed
from hasten.tiny import scenes, trained
from hasten.tiny.micro_video import (
    CALL_DEFAULTS,
    _encode_text,
    _normalised_latents,
    camera_velocity,
    estimate_pan,
    pan_direction,
    pan_test_seeds,
    training_clip,
)

from common import grat_variants, machine, patterns_arg, print_json


class _SelfAttentionDistance(TorchFunctionMode):
    """Per self-attention call (keys = the video tokens): the attention-weighted mean (t, h, w) token distance."""

    def __init__(self, grid: tuple[int, int, int]):
        super().__init__()
        axes = [torch.arange(n, dtype=torch.float32) for n in grid]
        points = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        self.distance = torch.cdist(points, points)
        self.rows: list[float] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.scaled_dot_product_attention:
            kwargs = kwargs or {}
            query = args[0] if len(args) > 0 else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            if key.shape[-2] == self.distance.shape[0] and query.shape[-2] == key.shape[-2]:
                scale = query.shape[-1] ** -0.5
                probs = torch.softmax(query.float() @ key.float().transpose(-1, -2) * scale, dim=-1)
                self.rows.append(float((probs * self.distance).sum(-1).mean()))
        return out


@torch.no_grad()
def attention_locality(pipe, seed: int, frames: int, size: int, sigma: float = 0.6) -> tuple[list[float], float]:
    """(mean self-attention distance per layer, that of uniform attention) on one held-out pan clip."""
    clip, caption = training_clip(seed, motion="pan", size=(size, size), frames=frames)
    x0 = _normalised_latents(pipe.vae, clip[None])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    p = pipe.transformer.config.patch_size
    grid = (x0.shape[2] // p[0], x0.shape[3] // p[1], x0.shape[4] // p[2])
    recorder = _SelfAttentionDistance(grid)
    with recorder:
        pipe.transformer(
            hidden_states=(1 - sigma) * x0 + sigma * noise,
            timestep=torch.tensor([sigma * 1000.0]),
            encoder_hidden_states=_encode_text(pipe, [caption]),
            return_dict=False,
        )
    return recorder.rows, float(recorder.distance.mean())


def _generate(pipe, prompts: list[str], seeds: list[int], frames: int, size: int, steps: int):
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    call = {**CALL_DEFAULTS, "height": size, "width": size, "num_frames": frames, "num_inference_steps": steps}
    videos, seconds = timed(lambda: pipe(prompts, generator=generators, output_type="pt", **call).frames, pipe.device)
    return videos.float().clamp(0, 1), seconds  # (B, T, 3, H, W)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="9x32x32,17x32x32,17x48x48", help="FRAMESxHEIGHTxWIDTH, comma-separated")
    parser.add_argument("--samples", type=int, default=4, help="held-out pan captions per shape")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--group", default="1,4,4", help="GRAT group (t,h,w) in latent tokens")
    parser.add_argument("--dense-steps", type=int, default=4, help="dense steps of the dense_steps variants")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--patterns",
        type=patterns_arg,
        default=("cross", "block"),
        help="GRAT variants beside dense: cross (GRAT-X), block (GRAT-B) or both (default cross,block)",
    )
    parser.add_argument("--folder", default=None, help="a trained wan folder (default: the shipped weights)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    group = tuple(int(v) for v in args.group.split(","))
    pipe = trained.load("wan", args.folder)
    pipe.set_progress_bar_config(disable=True)
    print(f"# GRAT fidelity on the trained Wan video micro-world | {machine(torch.device('cpu'))}")
    print(f"# command: python {' '.join(sys.argv)}")
    print(
        f"# {args.samples} held-out axis-aligned pan captions per shape, CFG {CALL_DEFAULTS['guidance_scale']}, "
        f"{args.steps} Euler steps, group {'x'.join(map(str, group))} (t x h x w latent tokens), GRAT-B window 1, "
        f"dense_steps variants keep the first {args.dense_steps} steps dense"
    )
    seeds = pan_test_seeds(args.samples)
    for frames, height, _width in shapes:
        rows, uniform = attention_locality(pipe, seeds[0], frames, height)
        text = ", ".join(f"L{index}: {distance:.2f}" for index, distance in enumerate(rows))
        print(f"# self-attention distance {frames}x{height}x{height} (uniform attention: {uniform:.2f}): {text}")

    json_rows = []
    print(
        f"{'shape':>9} {'tokens':>6} {'variant':<20} {'pan':>5} {'PSNR':>6} {'SSIM':>6} {'seconds':>8} "
        f"{'speedup':>8} {'bound':>6} {'amdahl':>7}"
    )
    for frames, height, width in shapes:
        clips = [training_clip(seed, motion="pan", size=(height, width), frames=frames) for seed in seeds]
        prompts = [caption for _, caption in clips]
        truth = [
            pan_direction(*camera_velocity(scenes.sample_video(s, height, width, frames=2, motion="pan")))
            for s in seeds
        ]
        noise_seeds = list(range(args.samples))
        tokens = ((frames - 1) // 2 + 1) * (height // 4) * (width // 4)

        def generate(warmup: bool) -> tuple[torch.Tensor, float]:
            if warmup:
                return _generate(pipe, prompts[:1], noise_seeds[:1], frames, height, 2)
            return _generate(pipe, prompts, noise_seeds, frames, height, args.steps)

        for run in grat_variants(pipe, generate, group, args.steps, args.dense_steps, args.patterns):
            videos, compared = run.outputs, not run.is_dense
            pan = sum(
                pan_direction(*estimate_pan(video.permute(0, 2, 3, 1))) == want for video, want in zip(videos, truth)
            ) / len(truth)
            row = {
                "shape": f"{frames}x{height}x{width}",
                "tokens": tokens,
                "variant": run.name,
                "pan_accuracy": round(pan, 4),
                "psnr": round(psnr(run.dense, videos), 2) if compared else None,
                "ssim": round(ssim(run.dense.flatten(0, 1), videos.flatten(0, 1)), 4) if compared else None,
                **run.speed_fields(),
            }
            json_rows.append(row)
            print(run.line(row["shape"], tokens, f"{pan:.0%}", row["psnr"], row["ssim"]), flush=True)
    print_json(json_rows)


if __name__ == "__main__":
    main()
