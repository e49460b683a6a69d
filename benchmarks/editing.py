"""Real-photo editing (ConsistEdit, masked K/V replay): preserved-region fidelity, time, feature memory.

For each model and each feature-cache setting, one real-mode edit of scikit-image photos with a
box mask, in one process:

- preserved-region PSNR / SSIM of the edit against the input's VAE round trip (outside the edit
  box, with a margin for the decoder's reach), with hasten's latent blending (the preserved
  latents are the input's, so the cache cannot change them) and without it (attention control
  alone: the replayed source features carry the preserved region, so their storage shows);
- edit time (inversion + editing) against a plain generation with the same steps;
- bytes of recorded source features per denoising step, against the naive cache (fp32 Q/K/V of
  every image token, every layer, as the official code keeps): the goal is >= 4x smaller at
  the same preserved-region PSNR.

Then the same photos and box with masked K/V replay (VoxHammer / KV-Edit style,
:mod:`hasten.pipelines.masked_kv`): the recorded K/V are the preserved tokens' only.

On the trained FLUX micro-world (``--microworld N``, default 50; :mod:`hasten.tiny.micro_diffusion`), N
seeded colour edits of held-out two-object scenes ("a red circle ..." -> "a blue circle ..." for
the first object; the edit mask is that object's grid cell): *edit success* is the share of edits
where the shipped attribute classifier finds the new colour and the same shape in the cell,
*recolour* the share where it finds the new colour there whatever the shape (micro-flux v5 drew blobs),
*kept* the share where it still finds the other object, and preserved-region PSNR / SSIM outside
the cell (with a margin) against the input's VAE round trip. ConsistEdit runs without latent
blending, so the attention control alone carries the preserved region; masked K/V replay keeps the
preserved latents by its own rule (VoxHammer's), so for it PSNR only shows the decoder's reach.

VoxHammer in 3-D runs on the tiny TRELLIS set, or with ``--trellis trellis-image-large`` on
TRELLIS-image-large's sparse-structure architecture (1024 channels, 24 blocks, a 16^3 x 8 latent,
1374 DINOv2 condition tokens; random weights, bf16) at the paper's 25 steps, where the cache
sizes and the peak GPU memory (``torch.cuda.max_memory_allocated`` above the loaded models) are
those a user meets; voxel agreement there says nothing about edit quality.

    python benchmarks/editing.py                                         # tiny SD3 and Flux, CPU
    python benchmarks/editing.py --model black-forest-labs/FLUX.1-dev --size 1024x1024 --steps 28 --device cuda
    python benchmarks/editing.py --model --trellis trellis-image-large --steps 25 --device cuda   # 3-D only
    python benchmarks/editing.py --model --trellis none --microworld 50               # micro-world edits only
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from hasten.hooks.consistedit import edit_layers
from hasten.hooks.feature_cache import FeatureCacheConfig
from hasten.loading import load_pipeline, working_size
from hasten.measure import psnr, ssim, timed
from hasten.pipelines.consistedit import ConsistEditPipeline
from hasten.tiny.motion import photo

from common import machine

SETTINGS = {
    "fp32 (naive)": (FeatureCacheConfig(dtype="float32"), False),
    "bf16": (FeatureCacheConfig(dtype="bfloat16"), False),
    "int8": (FeatureCacheConfig(quantize=True), False),
    "int8 + region-only": (FeatureCacheConfig(quantize=True), True),
}
EDITS = [("chelsea", "a photo of a cat", "a photo of a tiger"), ("coffee", "a cup of coffee", "a cup of tea")]


def _scores(edit: torch.Tensor, reference: torch.Tensor, keep: np.ndarray) -> tuple[float, float]:
    """PSNR and SSIM over the preserved pixels ``keep`` (H, W)."""
    inside = torch.from_numpy(keep)
    return psnr(edit[:, inside], reference[:, inside]), ssim(edit, reference, keep)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="*", default=["tiny-sd3", "tiny-flux"], help="2-D models (none: 3-D only)")
    parser.add_argument(
        "--microworld", type=int, default=50, help="seeded colour edits on the trained FLUX micro-world (0: none)"
    )
    parser.add_argument(
        "--trellis",
        choices=["tiny", "trellis-image-large", "none"],
        default="tiny",
        help="the TRELLIS sparse-structure models of the VoxHammer rows",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", default=None, help="HxW (default: a tiny model's own, else the pipeline's)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    print(
        f"# ConsistEdit real-image editing | {machine(torch.device(args.device))} | {args.steps} steps, uni inversion, "
        "alpha 0.1"
    )
    rows = []
    for name in args.model:
        pipe = load_pipeline(name, None, args.device)
        size = (
            dict(zip(("height", "width"), (int(v) for v in args.size.split("x")))) if args.size else working_size(name)
        )
        editor = ConsistEditPipeline.from_pipe(pipe, **size)
        model = editor.model
        height, width = model.height, model.width
        mask = np.zeros((height, width))
        mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1
        margin = max(4, height // 8)
        keep = np.ones((height, width), bool)
        keep[
            max(0, height // 4 - margin) : 3 * height // 4 + margin,
            max(0, width // 4 - margin) : 3 * width // 4 + margin,
        ] = False
        layers = len(edit_layers(model.pipe.transformer)[0])
        tokens = model.grid[0] * model.grid[1]
        inner = model.pipe.transformer.config.num_attention_heads * model.pipe.transformer.config.attention_head_dim
        naive_per_step = 3 * layers * tokens * inner * 4
        _, plain = timed(lambda: editor.generate(EDITS[0][2], num_inference_steps=args.steps), args.device)
        print(
            f"\n## {name}: {width}x{height}, {tokens} image tokens, {layers} controlled layers; plain generation "
            f"{plain:.2f} s; naive fp32 cache {naive_per_step / 2**10:.1f} KiB per step"
        )
        print(
            f"{'cache':30s} {'PSNR':>7s} {'SSIM':>6s} {'KiB/step':>9s} {'vs naive':>8s} {'edit s':>7s} {'vs plain':>8s}"
        )
        for (label, (config, region_only)), blend in [
            (item, blend) for blend in (True, False) for item in SETTINGS.items()
        ]:
            if not blend:
                label = f"{label}, no blend"
            scores, sizes, times = [], [], []
            for photo_name, source, target in EDITS:
                image = photo(photo_name)
                reference = model.decode(model.encode_image(image))[0]
                out, seconds = timed(
                    lambda: editor.edit(
                        source,
                        target,
                        mask=mask,
                        image=image,
                        num_inference_steps=args.steps,
                        cache=config,
                        region_only=region_only,
                        blend_latents=blend,
                        progress=False,
                    ),
                    args.device,
                )
                times.append(seconds)
                scores.append(_scores(out.target, reference, keep))
                sizes.append(out.cache_bytes / args.steps)
            psnr, ssim = np.mean([s[0] for s in scores]), np.mean([s[1] for s in scores])
            per_step, seconds = float(np.mean(sizes)), float(np.mean(times))
            row = dict(
                model=name,
                cache=label,
                psnr=round(psnr, 2),
                ssim=round(ssim, 4),
                bytes_per_step=round(per_step),
                smaller_than_naive=round(naive_per_step / per_step, 2),
                edit_seconds=round(seconds, 3),
                vs_plain=round(seconds / plain, 2),
            )
            rows.append(row)
            print(
                f"{label:30s} {psnr:7.2f} {ssim:6.3f} {per_step / 2**10:9.1f} {naive_per_step / per_step:7.2f}x "
                f"{seconds:7.2f} {seconds / plain:7.2f}x"
            )
        _masked_kv(name, pipe, size, args.steps, mask, keep, plain, naive_per_step, rows)
    if args.microworld:
        _microworld(args.microworld, torch.device(args.device), rows)
    if args.trellis != "none":
        _voxels(args.trellis, args.steps, torch.device(args.device), rows)
    if args.json:
        for row in rows:
            print(json.dumps(row))


def _colour_edit(scene):
    """The scene with its first object's colour changed (the next colour in COLOURS, seeded by the scene)."""
    import dataclasses

    from hasten.tiny import scenes

    names = list(scenes.COLOURS)
    first = scene.objects[0]
    others = {obj.colour for obj in scene.objects}
    step = 1 + scene.seed % (len(names) - 1)
    colour = next(
        names[(names.index(first.colour) + step + k) % len(names)]
        for k in range(len(names))
        if names[(names.index(first.colour) + step + k) % len(names)] not in others
    )
    return dataclasses.replace(scene, objects=(dataclasses.replace(first, colour=colour), *scene.objects[1:]))


def _microworld(count: int, device: torch.device, rows: list) -> None:
    """ConsistEdit and masked K/V replay on the trained FLUX micro-world: seeded colour edits, judged by the
    attribute classifier (edit success in the edited cell: the new colour with the source's shape; recoloured:
    the new colour there, whatever the shape; the other object kept) and the preserved PSNR."""
    from hasten.pipelines.masked_kv import MaskedKVEditPipeline
    from hasten.tiny import scenes, trained
    from hasten.tiny.classifier import load_classifier
    from hasten.tiny.micro_diffusion import CALL_DEFAULTS, MAX_SEQUENCE_LENGTH

    pipe = trained.load("flux").to(device)
    classifier = load_classifier()
    height, width, steps = CALL_DEFAULTS["height"], CALL_DEFAULTS["width"], CALL_DEFAULTS["num_inference_steps"]
    guidance = CALL_DEFAULTS.get("true_cfg_scale", 1.0)
    consist = ConsistEditPipeline.from_pipe(pipe, height=height, width=width, max_sequence_length=MAX_SEQUENCE_LENGTH)
    masked = MaskedKVEditPipeline.from_pipe(pipe, height=height, width=width, max_sequence_length=MAX_SEQUENCE_LENGTH)
    model = consist.model
    print(
        f"\n## micro-flux (trained), {count} colour edits of held-out two-object scenes, {height}x{width}, {steps} "
        f"steps, guidance per row (true CFG)"
    )
    print(f"{'method':36s} {'success':>8s} {'recolour':>8s} {'kept':>6s} {'PSNR':>7s} {'SSIM':>6s} {'edit s':>7s}")
    sources = [scenes.sample_scene(seed, height, width, num_objects=2) for seed in scenes.HELD_OUT_SEEDS[:count]]
    targets = [_colour_edit(scene) for scene in sources]

    def consist_edit(scale: float):
        return lambda image, mask, source, target: (
            consist.edit(
                source,
                target,
                mask=mask,
                image=image,
                num_inference_steps=steps,
                guidance_scale=scale,
                blend_latents=False,
                progress=False,
            ).target
        )

    # ConsistEdit's real-image default is guidance 1 (the inversion's); guided, the source itself drifts.
    methods = {
        "ConsistEdit, guidance 1, no blend": consist_edit(1.0),
        f"ConsistEdit, guidance {guidance:g}, no blend": consist_edit(guidance),
        f"masked K/V replay, guidance {guidance:g}": lambda image, mask, source, target: (
            masked.edit(
                image,
                mask,
                target,
                source_prompt=source,
                num_inference_steps=steps,
                guidance_scale=guidance,
                progress=False,
            ).image
        ),
    }
    for label, run in methods.items():
        edits, scores, times = [], [], []
        for source, target in zip(sources, targets):
            image = source.render()
            x0, y0 = (int(v) for v in (np.array(divmod(source.objects[0].cell, 3))[::-1] * [width / 3, height / 3]))
            mask = np.zeros((height, width))
            mask[y0 : y0 + height // 3, x0 : x0 + width // 3] = 1
            margin = 4
            keep = np.ones((height, width), bool)
            keep[max(0, y0 - margin) : y0 + height // 3 + margin, max(0, x0 - margin) : x0 + width // 3 + margin] = (
                False
            )
            reference = model.decode(model.encode_image(image))[0]
            edited, seconds = timed(lambda: run(image, mask, source.caption, target.caption), device)
            times.append(seconds)
            edits.append(edited.float().clamp(0, 1).cpu())
            scores.append(_scores(edits[-1], reference.float().cpu(), keep))
        predicted = classifier.predict(torch.stack(edits))
        success = recoloured = kept = 0
        for index, target in enumerate(targets):
            edited_obj, other = target.objects
            labels = scenes.cell_labels(target)

            def found(cell: int, names: tuple[str, ...] = ("shape", "colour")) -> int:
                """1 when the classifier reads each attribute in ``names`` of ``cell`` as the target scene has it."""
                return int(all(int(predicted[name][index, cell]) == int(labels[name][cell]) for name in names))

            success += found(edited_obj.cell)
            recoloured += found(edited_obj.cell, ("colour",))
            kept += found(other.cell)
        psnr, ssim = np.mean([s[0] for s in scores]), np.mean([s[1] for s in scores])
        row = dict(
            model="micro-flux",
            method=label,
            edits=count,
            edit_success=round(success / count, 4),
            recoloured=round(recoloured / count, 4),
            other_object_kept=round(kept / count, 4),
            psnr=round(psnr, 2),
            ssim=round(ssim, 4),
            edit_seconds=round(float(np.mean(times)), 3),
        )
        rows.append(row)
        print(
            f"{label:36s} {success / count:8.1%} {recoloured / count:8.1%} {kept / count:6.1%} {psnr:7.2f} {ssim:6.3f} "
            f"{np.mean(times):7.2f}",
            flush=True,
        )


# TRELLIS-image-large's sparse-structure checkpoints (ckpts/ss_*_16l8_fp16.json), random weights here
TRELLIS_IMAGE_LARGE = {
    "flow": (
        "SparseStructureFlowModel",
        dict(
            resolution=16,
            in_channels=8,
            out_channels=8,
            model_channels=1024,
            cond_channels=1024,
            num_blocks=24,
            num_heads=16,
            mlp_ratio=4,
            patch_size=1,
            pe_mode="ape",
            qk_rms_norm=True,
            use_fp16=True,
        ),
    ),
    "encoder": (
        "SparseStructureEncoder",
        dict(
            in_channels=1,
            latent_channels=8,
            num_res_blocks=2,
            num_res_blocks_middle=2,
            channels=[32, 128, 512],
            use_fp16=True,
        ),
    ),
    "decoder": (
        "SparseStructureDecoder",
        dict(
            out_channels=1,
            latent_channels=8,
            num_res_blocks=2,
            num_res_blocks_middle=2,
            channels=[512, 128, 32],
            use_fp16=True,
        ),
    ),
}
DINOV2_TOKENS = 1374  # DINOv2-L/14 with 4 registers at 518 px: 37 x 37 patches + CLS + 4 registers


def _voxels(which: str, steps: int, device: torch.device, rows: list) -> None:
    """VoxHammer on TRELLIS sparse-structure models: cache bytes and peak memory vs naive, time vs plain
    sampling, voxel agreement."""
    import hasten.tiny.trellis as tt
    from hasten.pipelines.inversion import regenerate
    from hasten.pipelines.voxhammer import VoxelEditPipeline, box_mask

    if which == "tiny":
        parts, tokens, width = tt.models(), 4, tt.COND_CHANNELS
    else:
        parts = {
            key: tt.random_model(cls, args, seed) for seed, (key, (cls, args)) in enumerate(TRELLIS_IMAGE_LARGE.items())
        }
        tokens, width = DINOV2_TOKENS, TRELLIS_IMAGE_LARGE["flow"][1]["cond_channels"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    parts = {key: part.to(device, dtype).eval() for key, part in parts.items()}
    editor = VoxelEditPipeline(parts["flow"], parts["encoder"], parts["decoder"])
    flow = editor.flow
    resolution = flow.resolution * 4
    source = np.zeros((resolution,) * 3, bool)
    source[
        resolution // 4 : 3 * resolution // 4, resolution // 4 : 3 * resolution // 4, resolution // 4 : resolution // 2
    ] = True
    mask = box_mask(resolution, [(0, 0, resolution // 2, resolution, resolution, resolution)])
    cond = torch.randn(1, tokens, width, generator=torch.Generator().manual_seed(0))
    sigmas = VoxelEditPipeline.sigmas(steps)

    tokens_on_device = cond.to(device, dtype)
    noise = torch.randn(1, flow.in_channels, *[flow.resolution] * 3, device=device, dtype=dtype)

    def sample(levels):  # plain sampling: the same solver and CFG interval, no inversion, no cache
        with torch.no_grad():
            regenerate(
                lambda x, s: editor._velocity(x, s, tokens_on_device, 6.0, (0.5, 1.0)), noise, levels, "midpoint"
            )

    sample(sigmas[:3])  # warm-up
    _, plain = timed(lambda: sample(sigmas), device)
    channels = flow.blocks[0].self_attn.channels
    evaluations = 2 * steps * 1.5  # midpoint, CFG (2 rows) on about half of them
    naive = evaluations * len(flow.blocks) * flow.tokens * 3 * channels * 4
    name = "tiny TRELLIS" if which == "tiny" else f"{which} architecture (random weights, {str(dtype)[6:]})"
    print(
        f"\n## {name} sparse structure ({resolution}^3 grid, {flow.tokens} latent cells, {len(flow.blocks)} blocks x "
        f"{channels} channels, {tokens} condition tokens), VoxHammer, {steps} steps; naive fp32 cache "
        f"~{naive / steps / 2**20:.1f} MiB per step, {naive / 2**30:.2f} GiB in all"
    )
    print(
        f"{'cache':14s} {'outside IoU':>11s} {'inside vs fp32':>14s} {'MiB/step':>9s} {'vs naive':>8s} {'peak MiB':>9s} "
        f"{'edit s':>7s} {'vs plain':>8s}"
    )
    reference = None
    settings = [
        ("fp32", FeatureCacheConfig(dtype="float32")),
        ("bf16", FeatureCacheConfig()),
        ("int8", FeatureCacheConfig(quantize=True)),
    ]
    if device.type == "cuda":
        settings += [
            ("bf16, on GPU", FeatureCacheConfig(device=str(device))),
            ("int8, on GPU", FeatureCacheConfig(quantize=True, device=str(device))),
        ]
    for label, config in settings:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        out, seconds = timed(
            lambda: editor.edit(source, mask, cond, num_inference_steps=steps, cache=config, progress=False), device
        )
        peak = (torch.cuda.max_memory_allocated(device) - resident) if device.type == "cuda" else None
        reference = out.occupancy if reference is None else reference
        outside = (out.occupancy & source)[~mask].sum() / max((out.occupancy | source)[~mask].sum(), 1)
        inside = float((out.occupancy[mask] == reference[mask]).mean())
        per_step = out.cache_bytes / steps
        rows.append(
            dict(
                model=f"{which}-trellis",
                method="voxhammer",
                cache=label,
                outside_iou=round(float(outside), 4),
                inside_agreement_vs_fp32=round(inside, 4),
                bytes_per_step=round(per_step),
                smaller_than_naive=round(naive / steps / per_step, 2),
                peak_bytes_above_models=peak,
                naive_total_bytes=round(naive),
                edit_seconds=round(seconds, 3),
                vs_plain=round(seconds / plain, 2),
            )
        )
        print(
            f"{label:14s} {outside:11.4f} {inside:14.4f} {per_step / 2**20:9.2f} {naive / steps / per_step:7.2f}x "
            f"{'-' if peak is None else f'{peak / 2**20:.0f}':>9s} {seconds:7.2f} {seconds / plain:7.2f}x"
        )


def _masked_kv(name, pipe, size, steps, mask, keep, plain, naive_per_step, rows) -> None:
    """VoxHammer / KV-Edit-style masked K/V replay on the same photos and box."""
    from hasten.pipelines.masked_kv import MaskedKVEditPipeline

    editor = MaskedKVEditPipeline.from_pipe(pipe, **size)
    model = editor.model
    naive = naive_per_step * 2  # the midpoint solver evaluates twice per step
    print(f"\n## {name}, masked K/V replay (midpoint inversion): naive fp32 cache {naive / 2**10:.1f} KiB per step")
    print(f"{'cache':30s} {'PSNR':>7s} {'SSIM':>6s} {'KiB/step':>9s} {'vs naive':>8s} {'edit s':>7s} {'vs plain':>8s}")
    for label, config in (
        ("fp32", FeatureCacheConfig(dtype="float32")),
        ("bf16", FeatureCacheConfig()),
        ("int8", FeatureCacheConfig(quantize=True)),
    ):
        scores, sizes, times = [], [], []
        for photo_name, source, target in EDITS:
            image = photo(photo_name)
            reference = model.decode(model.encode_image(image))[0]
            out, seconds = timed(
                lambda: editor.edit(
                    image, mask, target, source_prompt=source, num_inference_steps=steps, cache=config, progress=False
                ),
                model.device,
            )
            times.append(seconds)
            scores.append(_scores(out.image, reference, keep))
            sizes.append(out.cache_bytes / steps)
        psnr, ssim = np.mean([s[0] for s in scores]), np.mean([s[1] for s in scores])
        per_step, seconds = float(np.mean(sizes)), float(np.mean(times))
        rows.append(
            dict(
                model=name,
                method="masked-kv",
                cache=label,
                psnr=round(psnr, 2),
                ssim=round(ssim, 4),
                bytes_per_step=round(per_step),
                smaller_than_naive=round(naive / per_step, 2),
                edit_seconds=round(seconds, 3),
                vs_plain=round(seconds / plain, 2),
            )
        )
        print(
            f"{label:30s} {psnr:7.2f} {ssim:6.3f} {per_step / 2**10:9.1f} {naive / per_step:7.2f}x "
            f"{seconds:7.2f} {seconds / plain:7.2f}x"
        )


if __name__ == "__main__":
    main()
