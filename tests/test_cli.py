"""The `hasten` command: generate (plain and --compare), errors, help."""

import os
import subprocess
import sys

import cv2
import pytest

from hasten.cli import main


def test_generate_compare_on_tiny_default(tmp_path, capsys):
    out = tmp_path / "demo.png"
    previous = os.umask(0o022)
    try:
        assert main(["generate", "--compare", "--steps", "2", "--group-size", "2", "--backend", "reference",
                     "--out", str(out)]) == 0
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
    assert main(["generate", "--model", "tiny-wan", "--steps", "1", "--grat", "block", "--group-size", "1x2x2",
                 "--backend", "reference", "--out", str(out)]) == 0
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
