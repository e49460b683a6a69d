"""Editing takes its schedules, sizes and text lengths from the pipeline itself, whatever the model's size."""

from __future__ import annotations

import pytest
import torch

import hasten.tiny
from hasten.adapters import pipeline_defaults, pipeline_sigmas
from hasten.pipelines import ConsistEditPipeline
from hasten.pipelines.flow_models import FlowModel
from hasten.pipelines.masked_kv import MaskedKVEditPipeline


def _sigmas_the_pipeline_samples_with(pipe, steps: int, **size) -> torch.Tensor:
    """Run the pipeline's own __call__ (latent output) and read the schedule its scheduler used."""
    seen = []

    def step_end(pipeline, index, timestep, kwargs):
        seen.append(pipeline.scheduler.sigmas.clone())
        return {}

    pipe.set_progress_bar_config(disable=True)
    pipe(
        "a red car",
        num_inference_steps=steps,
        output_type="latent",
        callback_on_step_end=step_end,
        max_sequence_length=32,
        **size,
    )
    return seen[-1].double()


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_flow_model_schedule_is_the_pipelines_own(kind):
    pipe = hasten.tiny.pipeline(kind)
    size = hasten.tiny.default_size(kind)
    model = FlowModel(pipe, **size, max_sequence_length=32)
    expected = _sigmas_the_pipeline_samples_with(pipe, 28, **size)
    torch.testing.assert_close(model.sigmas(28), expected, rtol=0, atol=1e-6)


def test_sd3_keeps_its_last_small_noise_level_and_wan_reads_flow_shift():
    sd3 = pipeline_sigmas(hasten.tiny.pipeline("sd3"), 28, 117)
    assert abs(float(sd3[-2]) - 0.0089) < 5e-4  # SD3's own last non-zero sigma (not 0.100)
    from diffusers import UniPCMultistepScheduler

    wan = hasten.tiny.pipeline("wan")
    original = wan.scheduler
    try:
        for shift in (3.0, 5.0):  # Wan's real scheduler stores the shift as `flow_shift`
            wan.scheduler = UniPCMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
            )
            sigmas = pipeline_sigmas(wan, 10, 105)
            reference = UniPCMultistepScheduler.from_config(wan.scheduler.config)
            reference.set_timesteps(10)
            torch.testing.assert_close(sigmas, reference.sigmas.double())
        assert float(pipeline_sigmas(wan, 10, 105)[5]) > 0.7  # shifted (unshifted would be 0.5)
    finally:
        wan.scheduler = original


def test_defaults_are_the_pipelines_not_guessed_from_the_model_size():
    expected = {"flux": (256, 256, 512), "sd3": (32, 32, 256), "cogvideox": (80, 112, 226)}
    for kind, (height, width, text) in expected.items():
        defaults = pipeline_defaults(hasten.tiny.pipeline(kind))
        assert (defaults["height"], defaults["width"], defaults["max_sequence_length"]) == (height, width, text)
    flux = ConsistEditPipeline.from_pipe(hasten.tiny.pipeline("flux"))  # a small model gets no special size
    assert (flux.model.height, flux.model.width, flux.model.max_sequence_length) == (256, 256, 512)
    video = ConsistEditPipeline.from_pipe(hasten.tiny.pipeline("cogvideox"))
    assert video.video.max_sequence_length == 226
    masked = MaskedKVEditPipeline.from_pipe(hasten.tiny.pipeline("sd3"), height=36, width=52)
    assert masked.model.max_sequence_length == 256
    chosen = ConsistEditPipeline.from_pipe(hasten.tiny.pipeline("sd3"), height=36, width=52, max_sequence_length=40)
    assert chosen.model.max_sequence_length == 40


def test_cli_max_sequence_length_flag(tmp_path, monkeypatch):
    from hasten.cli import main

    seen = {}
    original = ConsistEditPipeline.from_pipe.__func__

    def spy(cls, pipe, **kwargs):
        seen.update(kwargs)
        return original(cls, pipe, **kwargs)

    monkeypatch.setattr(ConsistEditPipeline, "from_pipe", classmethod(spy))
    assert (
        main(
            [
                "edit",
                "--model",
                "tiny-sd3",
                "--source-prompt",
                "a red car",
                "--target-prompt",
                "a blue car",
                "--edit-words",
                "red",
                "--steps",
                "2",
                "--max-sequence-length",
                "48",
                "--out",
                str(tmp_path / "e.png"),
            ]
        )
        == 0
    )
    assert seen["max_sequence_length"] == 48 and (seen["height"], seen["width"]) == (36, 52)


def test_per_call_size_and_generator():
    editor = ConsistEditPipeline.from_pipe(hasten.tiny.pipeline("flux"), height=36, width=52, max_sequence_length=32)
    mask = torch.zeros(44, 60)
    mask[:, :30] = 1
    common = dict(mask=mask, num_inference_steps=2, progress=False, height=44, width=60)
    a = editor.edit("a red car", "a blue car", generator=torch.Generator().manual_seed(5), **common)
    b = editor.edit("a red car", "a blue car", seed=5, **common)
    c = editor.edit("a red car", "a blue car", generator=torch.Generator().manual_seed(6), **common)
    assert a.target.shape == (3, 44, 60) and torch.equal(a.target, b.target) and not torch.equal(a.target, c.target)
    assert (editor.model.height, editor.model.width) == (36, 52), "the editor's own size is unchanged"
    video = ConsistEditPipeline.from_pipe(hasten.tiny.pipeline("cogvideox"), **hasten.tiny.default_size("cogvideox"))
    with pytest.raises(ValueError, match="per-call"):
        video.edit("a", "b", mask=torch.ones(80, 112), height=96)


def test_flux_without_a_guidance_embedding_guides_like_true_cfg():
    """A Flux without a guidance embedding (FLUX.1-schnell, the micro-world Flux) guides as FluxPipeline's
    ``true_cfg_scale`` does: the editing model's velocity equals the pipeline's own one-step update."""
    from hasten.tiny.micro_diffusion import build_pipeline

    pipe = build_pipeline(seed=3)
    pipe.set_progress_bar_config(disable=True)
    model = FlowModel(pipe, height=32, width=32, max_sequence_length=16)
    latents = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0))
    prompt = "a red circle at the top left"
    cond = model.encode([prompt], guidance_scale=3.0)
    assert model.uses_cfg and cond.cfg and cond.embeds.shape[0] == 2
    ours = model.velocity(latents, 1.0, cond)
    # FluxPipeline, one Euler step from sigma 1 to 0: out = latents - velocity.
    out = pipe(
        prompt,
        negative_prompt="",
        true_cfg_scale=3.0,
        height=32,
        width=32,
        num_inference_steps=1,
        latents=latents.clone(),
        max_sequence_length=16,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, latents - out, rtol=1e-4, atol=1e-5)
    unguided = model.velocity(latents, 1.0, model.encode([prompt], guidance_scale=1.0))
    assert not model.uses_cfg and not torch.allclose(ours, unguided, atol=1e-4)  # guidance changes the velocity
