"""GRAT fidelity beside speed on the trained FLUX micro-world: dense vs GRAT-X vs GRAT-B.

For each canvas (the size the shipped weights draw on, ``DRAW_SIZE``, and about 2x and 4x its area) the same held-out
captions are generated from the same noise with dense attention and with each GRAT variant (and
``dense_steps`` variants that keep the first steps dense). Per row:

- ``acc``: prompt accuracy judged by the shipped attribute classifier (the fraction of requested
  objects found with the right shape and colour in the right cell; :func:`prompt_accuracy`);
- ``colour``: the fraction found with the right colour in the right cell, whatever their shape (what
  micro-flux v5 followed: it drew blobs, so ``acc`` was near zero for dense too; v11 draws some shapes);
- ``lost/won``: paired against dense on the same prompt and noise, the prompts whose colour-in-cell
  judgement dense gets right and the variant wrong, and the reverse. Two accuracies on a few prompts
  can match while different prompts fail; these counts show how much the variant changes the verdicts
  (their difference over the prompt count is the colour column's difference);
- ``PSNR`` / ``SSIM`` against the dense images from the same noise;
- wall time of the whole batched pipeline call (text encoders, transformer, VAE), the speedup
  over dense, the attention bound (1/density, padding counted) and the Amdahl bound of the call
  (attention's measured share ``a`` of the dense call: 1 / ((1 - a) + a / bound)).

Before the table it prints the trained transformer's mean attention distance by layer (how far, in
tokens, image queries look among image keys, weighted by attention; and the share of their
attention that goes to text), at the training size and at 4x the area, against the distance a
uniform attention would give: GRAT's premise is that this is small.

    python benchmarks/grat_fidelity.py                       # the table in benchmarks/results/grat_fidelity-cpu.txt
    python benchmarks/grat_fidelity.py --samples 4 --steps 8 --sizes 64  # a quick look
    python benchmarks/grat_fidelity.py --samples 32 --sizes 192  # at the drawing size, more prompts
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hasten.measure import psnr, ssim, timed
from hasten.tiny import scenes, trained
from hasten.tiny.classifier import evaluate, load_classifier
from hasten.tiny.micro_diffusion import CALL_DEFAULTS, DRAW_SIZE, MAX_SEQUENCE_LENGTH, PROMPT_OBJECTS

from common import grat_variants, machine, patterns_arg, print_json


class _AttentionDistance(TorchFunctionMode):
    """Per attention call: mean token distance of image->image attention and image->text share."""

    def __init__(self, grid: tuple[int, int], text: int):
        super().__init__()
        self.grid, self.text, self.rows = grid, text, []
        h, w = grid
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
        )
        points = torch.stack([ys.flatten(), xs.flatten()], 1)
        self.distance = torch.cdist(points, points)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.scaled_dot_product_attention and args is not None:
            kwargs = kwargs or {}
            query = args[0] if len(args) > 0 else kwargs["query"]
            key = args[1] if len(args) > 1 else kwargs["key"]
            scale = query.shape[-1] ** -0.5
            probs = torch.softmax(query.float() @ key.float().transpose(-1, -2) * scale, dim=-1)
            image = probs[..., self.text :, :]  # image queries
            to_text = image[..., : self.text].sum(-1)
            among_images = image[..., self.text :]
            among_images = among_images / among_images.sum(-1, keepdim=True)
            distance = (among_images * self.distance).sum(-1)
            self.rows.append((float(distance.mean()), float(to_text.mean())))
        return out


def attention_locality(pipe, prompt: str, height: int, width: int, sigma: float = 0.6) -> list[tuple[float, float]]:
    """(mean image->image attention distance in tokens, image->text attention share) per attention
    layer, for one transformer call at noise level ``sigma`` on ``prompt``."""
    from diffusers import FluxPipeline

    generator = torch.Generator().manual_seed(0)
    embeds, pooled, text_ids = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=MAX_SEQUENCE_LENGTH)
    h, w = height // 2, width // 2
    vae = pipe.vae
    image = scenes.render(scenes.scene_from_caption(prompt, height, width))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latents = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
        packed = FluxPipeline._pack_latents(latents, 1, 4, h, w)
        noisy = (1 - sigma) * packed + sigma * torch.randn(packed.shape, generator=generator)
        recorder = _AttentionDistance((h // 2, w // 2), embeds.shape[1])
        with recorder:
            pipe.transformer(
                hidden_states=noisy,
                timestep=torch.tensor([sigma]),
                guidance=None,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=text_ids,
                img_ids=FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32),
                return_dict=False,
            )
    return recorder.rows


def _generate(pipe, prompts: list[str], seeds: list[int], size: int, steps: int) -> tuple[torch.Tensor, float]:
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    images, seconds = timed(
        lambda: (
            pipe(
                prompts,
                height=size,
                width=size,
                num_inference_steps=steps,
                generator=generators,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
                true_cfg_scale=CALL_DEFAULTS["true_cfg_scale"],
                negative_prompt=[""] * len(prompts),
                output_type="pt",
            ).images
        ),
        pipe.device,
    )
    return images.float().clamp(0, 1), seconds


def _colour_right(images: torch.Tensor, test: list, classifier) -> list[bool]:
    """Per prompt: is every requested object found with the right colour in the right cell?"""
    return [evaluate(image[None], [scene], classifier)["colour"] == 1.0 for image, scene in zip(images, test)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    side = DRAW_SIZE[0]
    areas = f"{side},{round(side * 2**0.5 / 4) * 4},{2 * side}"  # the drawing size, about 2x and 4x its area
    parser.add_argument(
        "--sizes", default=areas, help=f"square canvas sides in pixels, multiples of 4 (default {areas})"
    )
    parser.add_argument("--samples", type=int, default=12, help="held-out captions per size")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--group", type=int, default=4, help="GRAT group side in tokens")
    parser.add_argument("--dense-steps", type=int, default=4, help="dense steps of the dense_steps variants")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--patterns",
        type=patterns_arg,
        default=("cross", "block"),
        help="GRAT variants beside dense: cross (GRAT-X), block (GRAT-B) or both (default cross,block)",
    )
    parser.add_argument("--folder", default=None, help="a trained flux folder (default: the shipped weights)")
    parser.add_argument("--classifier", default=None, help="a trained classifier folder (default: the shipped one)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(v) for v in args.sizes.split(",")]
    pipe = trained.load("flux", args.folder)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(args.classifier)
    print(f"# GRAT fidelity on the trained FLUX micro-world | {machine(torch.device('cpu'))}")
    print(
        f"# {args.samples} held-out {PROMPT_OBJECTS}-object captions per size, true CFG "
        f"{CALL_DEFAULTS['true_cfg_scale']}, {args.steps} Euler steps, group {args.group}x{args.group} "
        f"tokens, GRAT-B window 1, dense_steps variants keep the first {args.dense_steps} steps dense"
    )

    probe = scenes.sample_scene(scenes.HELD_OUT_SEEDS[-1], num_objects=3).caption
    for side in (CALL_DEFAULTS["height"], 2 * CALL_DEFAULTS["height"]):
        rows = attention_locality(pipe, probe, side, side)
        grid = side // 4
        uniform = float(
            torch.cdist(
                *(
                    2
                    * [
                        torch.stack(
                            torch.meshgrid(
                                torch.arange(grid, dtype=torch.float32),
                                torch.arange(grid, dtype=torch.float32),
                                indexing="ij",
                            ),
                            -1,
                        ).reshape(-1, 2)
                    ]
                )
            ).mean()
        )
        text = ", ".join(f"L{index}: {distance:.2f} ({share:.0%} text)" for index, (distance, share) in enumerate(rows))
        print(f"# attention distance {side}x{side} ({grid}x{grid} tokens; uniform attention: {uniform:.2f}): {text}")

    json_rows = []
    header = (
        f"{'size':>9} {'tokens':>6} {'variant':<20} {'acc':>6} {'colour':>6} {'lost/won':>8} {'PSNR':>6} {'SSIM':>6} {'seconds':>8} "
        f"{'speedup':>8} {'bound':>6} {'amdahl':>7}"
    )
    print(header)
    for size in sizes:
        test = [
            scenes.sample_scene(seed, size, size, num_objects=PROMPT_OBJECTS)
            for seed in scenes.HELD_OUT_SEEDS[: args.samples]
        ]
        prompts = [scene.caption for scene in test]
        seeds = list(range(args.samples))

        def generate(warmup: bool) -> tuple[torch.Tensor, float]:
            if warmup:
                return _generate(pipe, prompts[:1], seeds[:1], size, 2)
            return _generate(pipe, prompts, seeds, size, args.steps)

        dense_right = None
        for run in grat_variants(pipe, generate, args.group, args.steps, args.dense_steps, args.patterns):
            scores = evaluate(run.outputs, test, classifier)
            right = _colour_right(run.outputs, test, classifier)
            compared = not run.is_dense
            if run.is_dense:
                dense_right = right
            lost = sum(d and not r for d, r in zip(dense_right, right))
            won = sum(r and not d for d, r in zip(dense_right, right))
            row = {
                "size": f"{size}x{size}",
                "tokens": (size // 4) ** 2,
                "variant": run.name,
                "prompt_accuracy": round(scores["object"], 4),
                "colour_accuracy": round(scores["colour"], 4),
                "scene_accuracy": round(scores["scene"], 4),
                "colour_lost": lost if compared else None,
                "colour_won": won if compared else None,
                "psnr": round(psnr(run.dense, run.outputs), 2) if compared else None,
                "ssim": round(ssim(run.dense, run.outputs), 4) if compared else None,
                **run.speed_fields(),
            }
            json_rows.append(row)
            paired = f"{lost}/{won}" if compared else "-"
            accuracy = f"{scores['object']:>6.1%} {scores['colour']:>6.1%} {paired:>8}"
            print(run.line(row["size"], row["tokens"], accuracy, row["psnr"], row["ssim"]), flush=True)
    print_json(json_rows)


if __name__ == "__main__":
    main()
