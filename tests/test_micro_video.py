"""The video micro-world (hasten.tiny.micro_video): build, seeded resumable training, argument checks,
and the shipped weights: they load through WanPipeline.from_pretrained, generate the requested shape,
and read the prompt (measured floors a random-weight model fails)."""

from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors.torch import load_file

from hasten.tiny import micro_video as mv
from hasten.tiny import scenes, trained

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    out = {}
    for component in ("vae", "transformer", "text_encoder"):
        for file in sorted((folder / component).glob("*.safetensors")):
            out.update({f"{component}.{k}": v for k, v in load_file(file).items()})
    return out


def test_build_pipeline_shapes():
    pipe = mv.build_pipeline()
    assert type(pipe).__name__ == "WanPipeline"
    assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (2, 2)
    assert pipe.vae.config.z_dim == pipe.transformer.config.in_channels == 4
    assert pipe.transformer.config.text_dim == pipe.text_encoder.config.d_model
    assert pipe.scheduler.config.shift == mv.SHIFT
    x = torch.zeros(1, 3, mv.FRAMES, *mv.TRAIN_SIZE)
    assert tuple(pipe.vae.encode(x).latent_dist.mean.shape) == (1, 4, 5, 16, 16)


def test_captions_name_the_pan_direction():
    assert mv.camera_phrase(0, -1) == "the camera pans up"
    assert mv.camera_phrase(2, 0) == "the camera pans right"
    for seed in mv.pan_test_seeds(6):
        video = scenes.sample_video(seed, 32, 32, frames=9, motion="pan")
        vx, vy = mv.camera_velocity(video)
        _, caption = mv.training_clip(seed, motion="pan")
        assert caption.endswith(mv.camera_phrase(vx, vy))
        # the frames move the captioned way: the content shifts by minus the camera step
        assert mv.estimate_pan(video.frames) == (float(vx), float(vy))
    assert "camera" not in mv.training_clip(3, motion="objects")[1]


def test_training_is_seeded_and_resumable(tmp_path):
    whole = mv.train_wan(tmp_path / "a", steps=3, vae_steps=2, progress=False)
    mv.train_wan(tmp_path / "b", steps=1, vae_steps=2, progress=False)
    resumed = mv.train_wan(tmp_path / "b", steps=3, vae_steps=2, progress=False, resume=True)
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and len(a) > 50
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the latent statistics measured after the VAE phase are in the saved config
    loaded = trained.load("wan", whole)
    assert loaded.vae.config.latents_std != [1.0] * 4


def test_training_continues_from_a_saved_pipeline(tmp_path):
    first = mv.train_wan(tmp_path / "a", steps=1, vae_steps=1, progress=False)
    more = mv.train_wan(tmp_path / "b", steps=2, seed=1, init=first, progress=False)  # another seed: another build
    before, after = trained.load("wan", first), trained.load("wan", more)
    # the VAE and its latent statistics are kept; the transformer trains on from the saved one
    assert all(torch.equal(a, b) for a, b in zip(before.vae.state_dict().values(), after.vae.state_dict().values()))
    assert after.vae.config.latents_std == before.vae.config.latents_std
    # two warm-up steps (learning rate 1e-5, 2e-5) move the saved transformer a little: it was the start
    start, end = _weights(first), _weights(more)
    moved = [(end[k] - start[k]).abs().max().item() for k in start if k.startswith("transformer.")]
    assert 0 < max(moved) < 1e-3
    with pytest.raises(ValueError, match="`init`"):
        mv.train_wan(tmp_path / "c", steps=1, init=tmp_path, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"steps": 0}, "steps"), ({"vae_steps": -1}, "vae_steps"), ({"steps": 1.5}, "steps"), ({"seed": -2}, "seed")],
)
def test_bad_arguments_raise(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        mv.train_wan(tmp_path, progress=False, **kwargs)


def test_bad_arguments_raise_elsewhere(tmp_path):
    with pytest.raises(ValueError, match="`resume`"):
        mv.train_wan(tmp_path, steps=1, resume=True, progress=False)
    with pytest.raises(ValueError, match="`frames`"):
        mv.estimate_pan(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="`count`"):
        mv.pan_test_seeds(0)
    with pytest.raises(ValueError, match="`captions`"):
        mv.validation_loss(mv.build_pipeline(), range(2), captions=["a"])


@pytest.fixture(scope="module")
def shipped():
    if not trained.is_shipped("wan"):
        pytest.fail("the wan weights are not shipped (src/hasten/tiny/weights/wan)")
    pipe = trained.load("wan")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_weights_generate_the_requested_shape(shipped):
    torch.set_num_threads(1)
    out = shipped(
        "a red circle at the centre, the camera pans left",
        **{**mv.CALL_DEFAULTS, "num_inference_steps": 2, "num_frames": 5, "height": 48},
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert out.shape == (1, 5, 48, 32, 3)


def test_shipped_weights_learned_the_clips(shipped):
    """Held-out pans at fixed noise: the trained velocity loss is far below a random-weight model's
    (measured 0.146 vs 1.42 on 48 held-out pans), and the clips' own captions give a lower loss than no
    caption (measured 0.1465 vs 0.1501) and than another clip's caption (0.1465 vs 0.1478): a small but
    real reading of the prompt (the weights' direction phrase is not read: see the module docstring)."""
    seeds = mv.pan_test_seeds(48)
    captions = [mv.training_clip(s, motion="pan")[1] for s in seeds]
    true = mv.validation_loss(shipped, seeds)
    assert true < 0.25
    assert mv.validation_loss(shipped, seeds, captions=[""] * len(seeds)) - true > 0.002
    assert mv.validation_loss(shipped, seeds, captions=captions[1:] + captions[:1]) - true > 0.0005
