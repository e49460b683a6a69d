"""The `hasten` command: generate (plain and --compare), errors, help."""

import os
import subprocess
import sys

import cv2
import pytest

from hasten.cli import main


def test_generate_compare_default_is_the_trained_micro_flux(tmp_path, capsys):
    """`make demo`'s command on the shipped micro-world (small size and few steps here): both
    images, the side-by-side picture, speedup with its bound, PSNR and prompt accuracy."""
    out = tmp_path / "demo.png"
    assert (
        main(
            [
                "generate",
                "--compare",
                "--steps",
                "3",
                "--height",
                "64",
                "--width",
                "64",
                "--group-size",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "model micro-flux (FluxPipeline)" in printed
    for word in ("speedup:", "attention bound", "PSNR(dense, grat):", "prompt accuracy (classifier, 1 object): dense"):
        assert word in printed, printed
    side = cv2.imread(str(tmp_path / "demo-side.png"))
    dense = cv2.imread(str(tmp_path / "demo-dense.png"))
    assert dense.shape == (64, 64, 3) and side.shape == (64, 3 * 64 + 8, 3)
    assert side[:, :64].tolist() == dense.tolist()


def test_generate_compare_on_tiny_flux(tmp_path, capsys):
    out = tmp_path / "demo.png"
    previous = os.umask(0o022)
    try:
        assert (
            main(
                [
                    "generate",
                    "--model",
                    "tiny-flux",
                    "--compare",
                    "--steps",
                    "2",
                    "--group-size",
                    "2",
                    "--backend",
                    "reference",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    finally:
        os.umask(previous)
    printed = capsys.readouterr().out
    for word in ("dense:", "grat:", "speedup:", "PSNR(dense, grat):", "attention bound"):
        assert word in printed
    assert "cannot be sparse" not in printed  # small groups: GRAT skips tiles here
    dense, grat = tmp_path / "demo-dense.png", tmp_path / "demo-grat.png"
    assert cv2.imread(str(dense)).shape == cv2.imread(str(grat)).shape
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    assert {path.stat().st_mode & 0o777 for path in (dense, grat)} == {0o644}, "outputs respect the umask"


def test_generate_video_writes_mp4(tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-wan",
                "--steps",
                "1",
                "--grat",
                "block",
                "--group-size",
                "1x2x2",
                "--backend",
                "reference",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capture = cv2.VideoCapture(str(out))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames > 1
    assert "attention density" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--group-size", "0"], "--group-size"),
        (["generate", "--window", "-1"], "--window"),
        (["generate", "--grat", "diagonal"], "--grat"),
        (["generate", "--model", "tiny-flux", "--frames", "9"], "--frames"),
        (["generate", "--compare", "--grat", "off"], "--compare"),
        (["generate", "--model", "tiny-sd15", "--steps", "1"], "transformer"),
    ],
)
def test_bad_input_exits_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "hasten.cli", "generate", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--model", "--grat", "--group-size", "--window", "--compare", "--frames", "--backend"):
        assert option in result.stdout


def test_app_subcommand_loads_the_app(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["app", "grat", "--help"])
    assert exit_info.value.code == 0
    assert "--model" in capsys.readouterr().out


# README lines not run by test_readme_command_line_runs_as_written, each with the reason.
README_NOT_RUN = {
    "hasten generate --model black-forest-labs/FLUX.1-dev": "a full-size Hub model (no network in tests)",
    "hasten app ": "serves until stopped (the apps have browser tests)",
    "hasten vlm eval": "every method x budget: minutes on 2 cores (tests/test_vlm_cli.py runs a subset)",
    "hasten vlm train-draft": "1000 training steps by default (tests/test_specvlm.py trains a few)",
    "hasten vlm ask --speculative draft/": "needs the trained draft of the line above",
    "--backend ray": "starts a Ray cluster (tests/test_jobs.py runs the Ray backend)",
}


def _readme_commands() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_command_line_runs_as_written(tmp_path):
    """Each line of the README's command-line block runs as written (in a folder holding the files it
    names), or is listed in README_NOT_RUN with the reason."""
    import shlex

    import numpy as np
    import trimesh
    from PIL import Image

    from hasten.tiny.motion import panned, photo
    from hasten.video import write_video

    Image.fromarray(photo("chelsea")).resize((64, 64)).save(tmp_path / "cat.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    trimesh.creation.box().export(tmp_path / "chair.glb")
    (tmp_path / "videos").mkdir()
    write_video(panned(frames=2, size=(40, 56))[0], tmp_path / "videos" / "clip.avi", fps=8)
    commands = _readme_commands()
    assert len(commands) > 10
    ran = 0
    for command in commands:
        if any(key in command for key in README_NOT_RUN):
            continue
        argv = shlex.split(command)
        assert argv[0] == "hasten", command
        result = subprocess.run(
            [sys.executable, "-m", "hasten.cli", *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
        ran += 1
    assert ran >= 7
    assert (tmp_path / "edited.glb").exists() and (tmp_path / "out" / "clip.mp4").exists()
    assert (tmp_path / "outputs" / "edit.png").exists() and (tmp_path / "outputs" / "video.mp4").exists()
