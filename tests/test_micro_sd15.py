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


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    whole = ms.train_sd15(tmp_path / "a", steps=3, progress=False)
    ms.train_sd15(tmp_path / "b", steps=1, progress=False)
    resumed = ms.train_sd15(tmp_path / "b", steps=3, progress=False, resume=True)
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and len(a) > 50
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a shorter run gives other weights (so the equality above can fail)
    short = _weights(ms.train_sd15(tmp_path / "c", steps=1, progress=False))
    assert not all(torch.equal(a[k], short[k]) for k in a)
    # stored in float16, loaded in float32 by the plain from_pretrained
    assert all(v.dtype == torch.float16 for v in a.values())
    loaded = trained.load("sd15", whole)
    assert {loaded.unet.dtype, loaded.text_encoder.dtype, loaded.vae.dtype} == {torch.float32}


@pytest.mark.parametrize(("kwargs", "name"), [({"steps": 0}, "`steps`"), ({"lr": 0.0}, "`lr`")])
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
