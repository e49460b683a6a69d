"""Which caption words the trained micro-flux reads, and at which noise level each attribute is decided.

Two measurements on held-out one-object scenes at the canvas micro-flux draws on:

1. *Word swaps by noise level*: the rectified-flow loss on the tokens on and round the object
   (``validation_loss(on_objects=True)``) with the true caption, with the shape word swapped for
   another shape, and with the colour word swapped for another colour. A word the model reads raises
   the loss when it is wrong; a word it ignores does not.
2. *Denoising from a noisy real scene*: the scene's own latents noised to sigma, then denoised with the
   caption (Euler, true CFG, the pipeline's shifted schedule from that sigma down), judged by the
   attribute classifier; and the one-step prediction of the clean image at that sigma. Where the shape
   survives from sigma s but not from above it, the shape is decided above s.

    python benchmarks/flux_words.py                      # the shipped weights, 12 scenes
    python benchmarks/flux_words.py --folder runs/flux/model --samples 16
"""

from __future__ import annotations

import argparse

import torch

from hasten.tiny import scenes, trained
from hasten.tiny.classifier import evaluate, load_classifier
from hasten.tiny.micro_diffusion import (
    DRAW_SIZE,
    GUIDANCE_SCALE,
    _encode_text,
    packed_latents,
    validation_loss,
    velocity,
)

from common import machine


def _swapped(test: list[scenes.Scene], attribute: str) -> list[str]:
    names = list(scenes.SHAPES) if attribute == "shape" else list(scenes.COLOURS)
    out = []
    for scene in test:
        word = getattr(scene.objects[0], attribute)
        out.append(scene.caption.replace(word, names[(names.index(word) + 3) % len(names)]))
    return out


def word_swaps(pipe, seeds: list[int], sigmas: tuple[float, ...]) -> list[dict]:
    test = [scenes.sample_scene(seed, *DRAW_SIZE, num_objects=1) for seed in seeds]
    captions = {"true": None, "shape swapped": _swapped(test, "shape"), "colour swapped": _swapped(test, "colour")}
    rows = []
    for sigma in sigmas:
        loss = {
            name: validation_loss(pipe, seeds, DRAW_SIZE, sigmas=(sigma,), num_objects=1, captions=c, on_objects=True)
            for name, c in captions.items()
        }
        rows.append({"sigma": sigma, **{name: round(value, 4) for name, value in loss.items()}})
    return rows


@torch.no_grad()
def denoise_from(pipe, seeds: list[int], starts: tuple[float, ...], steps: int, classifier) -> list[dict]:
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    height, width = DRAW_SIZE
    drawn = scenes.batch(seeds, height, width, num_objects=1)
    test, images = drawn.scenes, drawn.images
    vae, n = pipe.vae, len(seeds)
    x0, (h, w) = packed_latents(vae, images * 2 - 1)
    ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, "cpu", torch.float32)
    text, empty = _encode_text(pipe, [scene.caption for scene in test]), _encode_text(pipe, [""] * n)
    config = pipe.scheduler.config
    mu = calculate_shift(
        (h // 2) * (w // 2), config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )

    def shifted(t: float) -> float:  # the scheduler's resolution-dependent shift
        return pipe.scheduler.time_shift(mu, 1.0, t) if t > 0 else 0.0

    def predicted(x, sigma, encoded):
        return velocity(pipe, x, torch.full((n,), sigma), encoded, ids)

    def decode(x):
        z = FluxPipeline._unpack_latents(x, height, width, pipe.vae_scale_factor)
        return ((vae.decode(z / vae.config.scaling_factor + vae.config.shift_factor).sample + 1) / 2).clamp(0, 1)

    def judged(pictures) -> dict:
        scores = evaluate(pictures, test, classifier)
        return {"shape": round(scores["shape"], 3), "colour": round(scores["colour"], 3)}

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    rows = [{"start": "clean (VAE round trip)", **judged(decode(x0))}]
    for start in starts:
        sigmas = [shifted(start * (1 - k / steps)) for k in range(steps + 1)]
        x = (1 - sigmas[0]) * x0 + sigmas[0] * noise
        one_step = None
        for k in range(steps):
            conditional = predicted(x, sigmas[k], text)
            guided = predicted(x, sigmas[k], empty)
            guided = guided + GUIDANCE_SCALE * (conditional - guided)
            if k == 0:
                one_step = judged(decode(x - sigmas[0] * conditional))
            x = x + (sigmas[k + 1] - sigmas[k]) * guided
        rows.append({"start": f"sigma {sigmas[0]:.2f}", **judged(decode(x)), "one-step": one_step})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12, help="held-out one-object scenes")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps from each starting noise level")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--folder", default=None, help="a trained flux folder (default: the shipped weights)")
    args = parser.parse_args()
    if args.samples < 1 or args.steps < 1:
        parser.error("--samples and --steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = trained.load("flux", args.folder, dtype=torch.float32)
    seeds = list(scenes.HELD_OUT_SEEDS[: args.samples])
    print(f"# caption words and noise levels on the trained FLUX micro-world | {machine(torch.device('cpu'))}")
    print(
        f"# {args.samples} held-out one-object scenes at {DRAW_SIZE[0]}x{DRAW_SIZE[1]}, weights: {args.folder or 'shipped'}"
    )
    print("## loss on the tokens near the object, by noise level (higher with a swapped word = the word is read)")
    for row in word_swaps(pipe, seeds, (0.5, 0.8, 0.93, 0.98)):
        true = row["true"]
        print(
            f"sigma {row['sigma']:.2f}: true {true:.3f} | shape swapped {row['shape swapped']:.3f} "
            f"(+{row['shape swapped'] - true:.3f}) | colour swapped {row['colour swapped']:.3f} "
            f"(+{row['colour swapped'] - true:.3f})"
        )
    print(f"## denoised from the noisy real scene ({args.steps} Euler steps, true CFG {GUIDANCE_SCALE}), classifier")
    for row in denoise_from(pipe, seeds, (0.3, 0.5, 0.7, 0.85, 1.0), args.steps, load_classifier()):
        line = f"{row['start']:>24}: shape {row['shape']:.0%}, colour {row['colour']:.0%}"
        if "one-step" in row:
            line += f" | one-step x0: shape {row['one-step']['shape']:.0%}, colour {row['one-step']['colour']:.0%}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
