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
