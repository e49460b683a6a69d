"""The trained micro-world registry and ``hasten tiny``: listing, seeded resumable training."""

from __future__ import annotations

import pathlib

import pytest
import torch

from hasten.cli import main
from hasten.tiny import trained


def _toy_train(out: pathlib.Path, *, steps: int | None = None, seed: int = 0, resume: bool = False,
               progress: bool = True) -> pathlib.Path:
    """A registry-conforming trainer (a linear fit) for the CLI plumbing tests."""
    steps = steps or 5
    model = torch.nn.Linear(3, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.reset_parameters()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    start = 0
    state = trained.load_checkpoint(out) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    for step in range(start, steps):
        x = torch.randn(8, 3, generator=trained.step_generator(seed, step))
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        trained.save_checkpoint(out, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "step": step + 1})
    (out / "model").mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model" / "weights.pt")
    return out / "model"


@pytest.fixture
def toy_registry(monkeypatch):
    monkeypatch.setitem(trained.REGISTRY, "toy", f"{__name__}:_toy_train")
    yield


def test_registry_names_and_paths():
    assert {"flux", "classifier"} <= set(trained.REGISTRY)
    assert trained.path("flux") == trained.WEIGHTS / "flux"
    with pytest.raises(ValueError, match="`name`"):
        trained.path("nope")


def test_tiny_list_prints_every_entry(capsys):
    assert main(["tiny", "list"]) == 0
    printed = capsys.readouterr().out
    for name in trained.REGISTRY:
        assert name in printed


def test_tiny_train_resume_equals_uninterrupted(tmp_path, toy_registry, capsys):
    assert main(["tiny", "train", "toy", "--steps", "6", "--seed", "3", "--out", str(tmp_path / "full")]) == 0
    assert main(["tiny", "train", "toy", "--steps", "3", "--seed", "3", "--out", str(tmp_path / "part")]) == 0
    assert main(["tiny", "train", "toy", "--steps", "6", "--seed", "3", "--out", str(tmp_path / "part"),
                 "--resume"]) == 0
    full = torch.load(tmp_path / "full" / "model" / "weights.pt")
    part = torch.load(tmp_path / "part" / "model" / "weights.pt")
    assert all(torch.equal(full[key], part[key]) for key in full)
    # Without resuming, the short run's weights differ (the test can fail).
    assert main(["tiny", "train", "toy", "--steps", "3", "--seed", "3", "--out", str(tmp_path / "short")]) == 0
    short = torch.load(tmp_path / "short" / "model" / "weights.pt")
    assert not all(torch.equal(full[key], short[key]) for key in full)


def test_tiny_train_rejects_bad_input(tmp_path, toy_registry, capsys):
    with pytest.raises(SystemExit):
        main(["tiny", "train", "nope", "--out", str(tmp_path)])
    assert "NAME must be one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tiny", "train", "toy", "--resume", "--out", str(tmp_path / "empty")])
    assert "--resume: no checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The shipped micro-world models
# ---------------------------------------------------------------------------------------------

from hasten.tiny import scenes  # noqa: E402

@pytest.fixture(scope="module")
def classifier():
    from hasten.tiny.classifier import load_classifier

    return load_classifier()


def test_shipped_classifier_is_accurate_on_held_out_scenes(classifier):
    from hasten.tiny.classifier import evaluate

    test = scenes.batch(scenes.HELD_OUT_SEEDS[:240], 64, 64)
    scores = evaluate(test.images, test.scenes, classifier)
    assert scores["object"] >= 0.95, scores
    assert scores["empty"] >= 0.95, scores
    # The judge reads the pixels: mirrored images put every object in the wrong cell.
    assert evaluate(test.images.flip(-1), test.scenes, classifier)["object"] < 0.6


def test_trained_flux_loads_with_from_pretrained_and_denoises_held_out_scenes():
    """The shipped FluxPipeline is trained: its VAE reconstructs held-out scenes and its transformer's
    rectified-flow loss is a fraction of an untrained one's (measured 0.21 vs 2.27 on 16 scenes).
    Prompt following did not emerge in the CPU training budget (prompt accuracy 0%, docs/microworld.md),
    so no prompt-accuracy floor is asserted."""
    from diffusers import FluxPipeline

    from hasten.pipelines.grat import psnr
    from hasten.tiny.micro_diffusion import build_pipeline, validation_loss

    assert trained.is_shipped("flux")
    pipe = trained.load("flux")
    assert isinstance(pipe, FluxPipeline)
    seeds = scenes.HELD_OUT_SEEDS[:8]
    test = scenes.batch(list(seeds), 64, 64)
    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(test.images * 2 - 1).latent_dist.mean).sample
    assert psnr(((decoded + 1) / 2).clamp(0, 1), test.images) > 30.0
    untrained = build_pipeline()
    untrained.vae = pipe.vae  # same latent space: only the transformer differs
    loss, baseline = validation_loss(pipe, seeds), validation_loss(untrained, seeds)
    assert loss < 0.3 and loss < 0.2 * baseline, (loss, baseline)


def test_classifier_training_resumes_identically(tmp_path, capsys):
    from hasten.tiny.classifier import AttributeClassifier

    def weights(folder):
        return AttributeClassifier.from_pretrained(folder / "model").state_dict()

    common = ["tiny", "train", "classifier", "--seed", "1"]
    assert main([*common, "--steps", "4", "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--steps", "2", "--out", str(tmp_path / "part")]) == 0
    assert main([*common, "--steps", "4", "--out", str(tmp_path / "part"), "--resume"]) == 0
    full, part = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(full[key], part[key]) for key in full)
    short = AttributeClassifier.from_pretrained(
        trained.training_function("classifier")(tmp_path / "short", steps=2, seed=1, progress=False)).state_dict()
    assert not all(torch.equal(full[key], short[key]) for key in full)


def test_flux_training_resumes_identically(tmp_path):
    """A run extended with ``resume`` (here in the prompt phase: optimiser, EMAs and CLIP restored) equals
    an uninterrupted one; extending an earlier phase after the prompt phase has started is refused."""
    from diffusers import FluxPipeline

    from hasten.tiny.micro_diffusion import train_flux

    common = dict(steps=1, vae_steps=1, decoder_steps=1, seed=2, progress=False)
    full = FluxPipeline.from_pretrained(train_flux(tmp_path / "full", prompt_steps=2, **common))
    short = FluxPipeline.from_pretrained(train_flux(tmp_path / "part", prompt_steps=1, **common))
    part = FluxPipeline.from_pretrained(train_flux(tmp_path / "part", prompt_steps=2, resume=True, **common))
    for name in ("transformer", "text_encoder_2", "text_encoder", "vae"):
        a, b = getattr(full, name).state_dict(), getattr(part, name).state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a), name
    # The prompt phase trains CLIP (the pooled vector) too: one step less gives other weights.
    a, b = full.text_encoder.state_dict(), short.text_encoder.state_dict()
    assert not all(torch.equal(a[key], b[key]) for key in a)
    assert full.vae.config.scaling_factor == part.vae.config.scaling_factor != 1.0
    with pytest.raises(ValueError, match="started the prompt phase"):
        train_flux(tmp_path / "part", prompt_steps=2, resume=True, **{**common, "steps": 2})
