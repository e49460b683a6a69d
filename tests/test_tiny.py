"""hasten.tiny: offline tiny pipelines build, save atomically, load and run deterministically."""

from __future__ import annotations

import os
import pathlib
import shutil

import numpy as np
import pytest
import torch

from hasten import tiny

PIPELINE_CLASSES = {
    "flux": "FluxPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "hunyuan-video": "HunyuanVideoPipeline",
    "wan": "WanPipeline",
    "cogvideox": "CogVideoXPipeline",
    "sd15": "StableDiffusionPipeline",
}

# Latent token grid the denoiser sees at default_size: (frames, rows, cols).
TOKEN_GRIDS = {
    "flux": (1, 9, 13),
    "sd3": (1, 9, 13),
    "hunyuan-video": (3, 5, 7),
    "wan": (3, 5, 7),
    "cogvideox": (3, 5, 7),
    "sd15": (1, 5, 7),
}

VIDEO_KINDS = ("hunyuan-video", "wan", "cogvideox")
PROMPT = "a red fox walks through the snow at sunrise"


@pytest.fixture(scope="session")
def hasten_home(tmp_path_factory) -> pathlib.Path:
    home = tmp_path_factory.mktemp("hasten-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HASTEN_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def pipes(hasten_home):
    """kind -> loaded pipeline, loaded once per session."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            pipe = tiny.pipeline(kind)
            pipe.set_progress_bar_config(disable=True)
            cache[kind] = pipe
        return cache[kind]

    return get


def _denoiser(pipe) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _token_grid(kind: str, pipe, call: tuple[tuple, dict]) -> tuple[int, int, int]:
    """The (t, h, w) latent token grid from the denoiser's first call's (args, kwargs)."""
    args, call = call
    x = args[0] if args else call["sample" if kind == "sd15" else "hidden_states"]
    config = _denoiser(pipe).config
    if kind == "flux":
        ids = call["img_ids"]
        return (1, int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
    if kind == "sd3":
        return (1, x.shape[-2] // config.patch_size, x.shape[-1] // config.patch_size)
    if kind == "hunyuan-video":
        return (x.shape[2], x.shape[3] // config.patch_size, x.shape[4] // config.patch_size)
    if kind == "wan":
        p_t, p_h, p_w = config.patch_size
        return (x.shape[2] // p_t, x.shape[3] // p_h, x.shape[4] // p_w)
    if kind == "cogvideox":
        return (x.shape[1], x.shape[3] // config.patch_size, x.shape[4] // config.patch_size)
    return (1, x.shape[-2], x.shape[-1])  # sd15: the UNet's latent


def _run(pipe, kind: str, **kwargs) -> np.ndarray:
    out = pipe(
        PROMPT,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **{**tiny.default_size(kind), **kwargs},
    )
    return np.asarray(out.frames if kind in VIDEO_KINDS else out.images)


def test_public_names():
    assert tiny.KINDS == ("flux", "sd3", "hunyuan-video", "wan", "cogvideox", "sd15")
    assert tiny.MODEL_IDS == {f"tiny-{kind}": kind for kind in tiny.KINDS}
    assert all(tiny.is_tiny(name) for name in tiny.MODEL_IDS)
    assert not tiny.is_tiny("flux") and not tiny.is_tiny("black-forest-labs/FLUX.1-dev")
    for kind in tiny.KINDS:
        size = tiny.default_size(kind)
        assert set(size) == ({"height", "width", "num_frames"} if kind in VIDEO_KINDS else {"height", "width"})
    size = tiny.default_size("flux")
    size["height"] = 1
    assert tiny.default_size("flux")["height"] == 36  # a fresh dict each call


def test_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HASTEN_HOME", str(tmp_path / "h"))
    assert tiny.home() == tmp_path / "h"
    monkeypatch.delenv("HASTEN_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tiny.home() == tmp_path / ".cache" / "hasten"
    monkeypatch.setenv("HASTEN_HOME", "")
    assert tiny.home() == tmp_path / ".cache" / "hasten"


@pytest.mark.parametrize("call", [tiny.path, tiny.pipeline, tiny.default_size])
def test_unknown_kind(call):
    with pytest.raises(ValueError, match="kind") as info:
        call("tiny-flux")
    assert all(kind in str(info.value) for kind in tiny.KINDS)


@pytest.mark.parametrize("kind", tiny.KINDS)
def test_pipeline_runs_deterministically(kind, pipes):
    pipe = pipes(kind)
    assert type(pipe).__name__ == PIPELINE_CLASSES[kind]
    assert _denoiser(pipe).dtype == torch.float32

    calls = []
    hook = _denoiser(pipe).register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args, kwargs)) if not calls else None, with_kwargs=True
    )
    try:
        first = _run(pipe, kind)
    finally:
        hook.remove()
    second = _run(pipe, kind)

    size = tiny.default_size(kind)
    shape = (1, size["height"], size["width"], 3)
    if kind in VIDEO_KINDS:
        shape = (1, size["num_frames"], *shape[1:])
    assert first.shape == shape
    assert np.isfinite(first).all()
    assert first.std() > 0  # not a constant image
    np.testing.assert_array_equal(first, second)

    grid = _token_grid(kind, pipe, calls[0])
    assert grid == TOKEN_GRIDS[kind]
    assert grid[1] % 2 or grid[2] % 2, "default_size should give an odd latent grid on some spatial axis"


@pytest.mark.parametrize("kind", tiny.KINDS)
def test_text_encoders_match_tokenizers(kind, pipes):
    pipe = pipes(kind)
    for suffix in ("", "_2", "_3"):
        tokenizer = getattr(pipe, f"tokenizer{suffix}", None)
        encoder = getattr(pipe, f"text_encoder{suffix}", None)
        if tokenizer is None:
            continue
        assert len(tokenizer) == encoder.config.vocab_size
        ids = tokenizer("Zebra crossing! über 123")["input_ids"]
        assert max(ids) < encoder.config.vocab_size


@pytest.mark.parametrize("kind", ["flux", "sd3", "hunyuan-video", "wan", "cogvideox"])
def test_short_max_sequence_length(kind, pipes):
    out = _run(pipes(kind), kind, max_sequence_length=32)
    assert np.isfinite(out).all()


def test_hunyuan_template_crop_matches_tokenizer(pipes):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    tokenizer = pipes("hunyuan-video").tokenizer
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    assert len(tokenizer(prefix)["input_ids"]) == DEFAULT_PROMPT_TEMPLATE["crop_start"]
    ids = tokenizer(DEFAULT_PROMPT_TEMPLATE["template"].format("red fox"))["input_ids"]
    kept = tokenizer.convert_ids_to_tokens(ids[DEFAULT_PROMPT_TEMPLATE["crop_start"] :])
    assert "".join(kept).replace("▁", " ").startswith("red fox")


def test_scheduler_override(pipes):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipes("flux")  # built already
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = tiny.pipeline("flux", scheduler=scheduler)
    assert pipe.scheduler is scheduler


def test_folder_is_written_once_and_atomically(pipes, hasten_home):
    pipes("sd15")
    folder = tiny.path("sd15")
    assert folder == hasten_home / "tiny" / "sd15-v1"
    assert (folder / "model_index.json").is_file()
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert tiny.path("sd15") == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert not [p.name for p in folder.parent.iterdir() if ".tmp" in p.name]
    assert (folder.stat().st_mode & 0o777) == 0o755


def test_interrupted_build_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("HASTEN_HOME", str(tmp_path))

    def boom(kind):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny.diffusion, "_build", boom)
    with pytest.raises(KeyboardInterrupt):
        tiny.path("sd15")
    assert list((tmp_path / "tiny").iterdir()) == []


def test_losing_a_build_race_uses_the_winner(monkeypatch, tmp_path, pipes):
    """Another process finishes first: its folder is kept and our temp folder is removed."""
    winner = tiny.path("sd15")  # session home, already built
    monkeypatch.setenv("HASTEN_HOME", str(tmp_path))
    build = tiny.diffusion._build

    def build_while_other_finishes(kind):
        pipe = build(kind)
        shutil.copytree(winner, tmp_path / "tiny" / "sd15-v1")
        return pipe

    monkeypatch.setattr(tiny.diffusion, "_build", build_while_other_finishes)
    folder = tiny.path("sd15")
    assert folder == tmp_path / "tiny" / "sd15-v1"
    assert (folder / "model_index.json").is_file()
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == ["sd15-v1"]


def test_weights_identical_across_homes(monkeypatch, tmp_path, pipes):
    first = pipes("flux").transformer.state_dict()
    monkeypatch.setenv("HASTEN_HOME", str(tmp_path))
    torch.manual_seed(1234)
    rng = torch.random.get_rng_state()
    second_folder = tiny.path("flux")
    assert torch.equal(torch.random.get_rng_state(), rng), "building must not touch the global RNG"
    assert second_folder.parent.parent == tmp_path
    second = tiny.pipeline("flux").transformer.state_dict()
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    assert os.listdir(tmp_path / "tiny") == ["flux-v1"]
