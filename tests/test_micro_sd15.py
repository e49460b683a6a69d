"""The Stable Diffusion 1.5 micro-world (hasten.tiny.micro_sd15): build, captions, seeded resumable training,
argument checks, the recolour task's scoring, and the shipped weights (they load with
StableDiffusionPipeline.from_pretrained, denoise held-out scenes, read their prompts and recolour a panning
object under LatentWarp: measured floors a random-weight model fails)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hasten.tiny import micro_sd15 as ms
from hasten.tiny import scenes, trained

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    out = {}
    for component in ("unet", "text_encoder"):
        for file in sorted((folder / component).glob("*.safetensors")):
            out.update({f"{component}.{k}": v for k, v in load_file(file).items()})
    return out


def test_build_pipeline_reuses_the_flux_vae_without_its_shift():
    pipe = ms.build_pipeline()
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.vae_scale_factor == 2 and pipe.vae.config.shift_factor is None
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    flux_vae = load_file(next((trained.path("flux") / "vae").glob("*.safetensors")))
    assert all(torch.equal(flux_vae[k], v) for k, v in pipe.vae.state_dict().items())
    with pytest.raises(ValueError, match="`vae_folder`"):
        ms.build_pipeline(vae_folder="/nonexistent")


def test_captions_mix_places_place_free_background_and_empty():
    batch = scenes.batch([scenes.HELD_OUT_SEEDS[5]] * 4, 64, 64)
    scene = batch.scenes[0]
    with_places, place_free, with_background, empty = ms._captions(batch, [0.1, 0.5, 0.85, 0.95])
    assert with_places == scene.caption
    assert any(words in with_places for words in (" at the ", " in the centre"))
    assert place_free == " and ".join(obj.noun_phrase for obj in scene.objects)
    assert " at the " not in place_free and "centre" not in place_free
    assert with_background == scene.caption_with_background
    assert empty == ""


def test_training_is_seeded_and_resumable(tmp_path):
    # an interrupted prompt phase (its optimiser, the EMAs and the step in the checkpoint) resumes exactly
    whole = ms.train_sd15(tmp_path / "a", steps=2, prompt_steps=2, progress=False)
    short = _weights(ms.train_sd15(tmp_path / "b", steps=2, prompt_steps=1, progress=False))
    resumed = ms.train_sd15(tmp_path / "b", steps=2, prompt_steps=2, progress=False, resume=True)
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and len(a) > 50
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], short[k]) for k in a)  # the last step changed them: the equality can fail
    # stored in float16, loaded in float32 by the plain from_pretrained
    assert all(v.dtype == torch.float16 for v in a.values())
    loaded = trained.load("sd15", whole)
    assert {loaded.unet.dtype, loaded.text_encoder.dtype, loaded.vae.dtype} == {torch.float32}
    with pytest.raises(ValueError, match="started the prompt phase"):  # more look steps after it
        ms.train_sd15(tmp_path / "b", steps=3, prompt_steps=2, progress=False, resume=True)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"steps": 0}, "`steps`"),
        ({"prompt_steps": 1.5}, "`prompt_steps`"),
        ({"lr": 0.0}, "`lr`"),
        ({"seed": -1}, "`seed`"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        ms.train_sd15(tmp_path, progress=False, **kwargs)


def test_recolour_clip_asks_for_a_far_colour_of_the_same_object():
    for seed in scenes.HELD_OUT_SEEDS[:12]:
        clip = ms.recolour_clip(seed, frames=3)
        obj = clip.video.scene.objects[0]
        assert len(clip.video.scene.objects) == 1 and clip.video.motion == "pan"
        assert clip.source == obj.colour
        assert np.linalg.norm(np.subtract(scenes.COLOURS[clip.target], obj.rgb)) >= 180
        assert clip.prompt == obj.noun_phrase.replace(obj.colour, clip.target)


def test_recolour_scores_read_the_object_and_the_background():
    clip = ms.recolour_clip(scenes.HELD_OUT_SEEDS[3], frames=4)
    source = clip.video.frames
    same = ms.recolour_scores(source, clip)
    assert same == {"recoloured": 0.0, "kept_colour": 1.0, "all_frames": 0.0, "background_psnr": float("inf")}
    painted = source.copy()
    painted[(source == scenes.COLOURS[clip.source]).all(-1)] = scenes.COLOURS[clip.target]
    scores = ms.recolour_scores(painted, clip)
    assert scores["recoloured"] == 1.0 and scores["all_frames"] == 1.0 and scores["kept_colour"] == 0.0
    assert scores["background_psnr"] == float("inf")  # only the object changed
    half = source.copy()
    half[:2] = painted[:2]
    half[2:, :8] = 0  # the background darkened in a corner of the last frames
    scores = ms.recolour_scores(half, clip)
    assert scores["recoloured"] == 0.5 and scores["all_frames"] == 0.0 and scores["background_psnr"] < 40
    with pytest.raises(ValueError, match="`frames`"):
        ms.recolour_scores(source[:2], clip)


# ---------------------------------------------------------------------------------------------
# The shipped weights
# ---------------------------------------------------------------------------------------------


LOSS_CEILING = 0.05
"""Epsilon loss on 8 held-out scenes of 1-4 objects at 64 px: measured 0.027 (the untrained UNet: 1.13)."""
CAPTION_MARGIN = 0.002
"""Loss gap (shuffled - true captions) on one-object scenes: measured 0.0154 - 0.0120 = 0.0034."""
COLOUR_FLOOR = 0.5
"""Share of 8 one-object prompts whose colour the classifier finds in some cell: measured 5 of 8. (In the
named cell: 1 of 8. The micro-world draws colours, not places; see docs/microworld.md.)"""
RECOLOUR_FLOOR = 0.8
"""Frames of the app's example clip whose object reads as the asked colour under LatentWarp: measured 6 of 6."""
BACKGROUND_FLOOR = 24.0
"""PSNR (dB) of that translation away from the object: measured 27.2."""


@pytest.fixture(scope="module")
def shipped():
    from diffusers import StableDiffusionPipeline

    assert trained.is_shipped("sd15")
    pipe = StableDiffusionPipeline.from_pretrained(trained.path("sd15"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_weights_denoise_held_out_scenes_and_read_the_caption(shipped):
    seeds = scenes.HELD_OUT_SEEDS[:8]
    untrained = ms.build_pipeline()  # the same VAE: only the UNet and the text encoder differ
    loss, baseline = ms.validation_loss(shipped, seeds), ms.validation_loss(untrained, seeds)
    assert loss < LOSS_CEILING and loss < 0.2 * baseline, (loss, baseline)
    one = [scenes.sample_scene(seed, *ms.DRAW_SIZE, num_objects=1) for seed in seeds]
    captions = [scene.caption for scene in one]
    true = ms.validation_loss(shipped, seeds, captions=captions, num_objects=1)
    shuffled = ms.validation_loss(shipped, seeds, captions=captions[1:] + captions[:1], num_objects=1)
    assert shuffled - true >= CAPTION_MARGIN, (true, shuffled)


def test_shipped_weights_draw_the_requested_colour(shipped):
    from hasten.tiny.classifier import load_classifier

    prompts = [scenes.sample_scene(seed, *ms.DRAW_SIZE, num_objects=1) for seed in scenes.HELD_OUT_SEEDS[:8]]
    images = shipped(
        [scene.caption for scene in prompts],
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **ms.CALL_DEFAULTS,
    ).images
    colours = load_classifier().predict(images)["colour"]  # per image, the colour class found in each cell
    asked = [list(scenes.COLOURS).index(scene.objects[0].colour) + 1 for scene in prompts]
    found = sum(bool((cells == label).any()) for cells, label in zip(colours, asked)) / len(prompts)
    assert found >= COLOUR_FLOOR, (found, colours)


def test_latentwarp_on_the_shipped_weights_recolours_a_panning_object(shipped):
    from hasten.pipelines import LatentWarpPipeline

    warp = LatentWarpPipeline.from_pipe(shipped)
    clip = ms.recolour_clip(scenes.HELD_OUT_SEEDS[5], *ms.DRAW_SIZE, frames=6)
    kwargs = dict(prompt=clip.prompt, num_inference_steps=20, progress=False)
    warped = warp(video=clip.video.frames, **kwargs)
    alone = warp(video=clip.video.frames, warp=False, cross_frame=False, **kwargs)
    scores = ms.recolour_scores(warped.frames, clip)
    assert scores["recoloured"] >= RECOLOUR_FLOOR and scores["background_psnr"] >= BACKGROUND_FLOOR, scores
    assert warped.warp_error < alone.warp_error  # and the frames agree more than translated one by one
