"""``hasten edit`` on the tiny models: real and synthetic images, a video, and clear errors."""

from __future__ import annotations

import numpy as np
from PIL import Image

from hasten.cli import main
from hasten.tiny.motion import photo


def test_real_image_with_a_mask(tmp_path, capsys):
    Image.fromarray(photo("chelsea")).resize((52, 36)).save(tmp_path / "cat.png")
    mask = np.zeros((36, 52), np.uint8)
    mask[8:28, 10:40] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    code = main(
        [
            "edit",
            "--image",
            str(tmp_path / "cat.png"),
            "--source-prompt",
            "a cat",
            "--target-prompt",
            "a dog",
            "--mask",
            str(tmp_path / "mask.png"),
            "--steps",
            "4",
            "--cache-int8",
            "--spill-dir",
            str(tmp_path / "spill"),
            "--out",
            str(tmp_path / "dog.png"),
        ]
    )
    assert code == 0
    assert Image.open(tmp_path / "dog.png").size == (52, 36) and (tmp_path / "dog-source.png").exists()
    assert "source features" in capsys.readouterr().out
    assert not list((tmp_path / "spill").rglob("*.safetensors")), "spilled features are deleted"


def test_synthetic_image_and_video(tmp_path, capsys):
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
                "3",
                "--out",
                str(tmp_path / "car.png"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "edit",
                "--model",
                "tiny-wan",
                "--video",
                "--source-prompt",
                "a red car",
                "--target-prompt",
                "a blue car",
                "--edit-words",
                "red",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "car.mp4"),
            ]
        )
        == 0
    )
    assert (tmp_path / "car.mp4").exists() and (tmp_path / "car-source.mp4").exists()


def test_errors(tmp_path, capsys):
    assert main(["edit", "--source-prompt", "a", "--target-prompt", "b", "--steps", "2"]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert (
        main(
            [
                "edit",
                "--source-prompt",
                "a red car",
                "--target-prompt",
                "b",
                "--edit-words",
                "boat",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "not in the prompt" in capsys.readouterr().err
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    assert (
        main(
            [
                "edit",
                "--source-prompt",
                "a",
                "--target-prompt",
                "b",
                "--mask",
                str(tmp_path / "small.png"),
                "--steps",
                "2",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "mask" in capsys.readouterr().err
    assert (
        main(["edit", "--video", "--source-prompt", "a", "--target-prompt", "b", "--edit-words", "a", "--steps", "2"])
        == 2
    )
    assert "--video" in capsys.readouterr().err


def test_a_mask_drawn_on_the_image_sets_the_working_size(tmp_path, capsys):
    """The README's example: a 64x64 image and a 64x64 mask, no --height/--width."""
    Image.fromarray(photo("chelsea")).resize((64, 64)).save(tmp_path / "cat.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert (
        main(
            [
                "edit",
                "--image",
                str(tmp_path / "cat.png"),
                "--source-prompt",
                "a cat",
                "--target-prompt",
                "a tiger",
                "--mask",
                str(tmp_path / "mask.png"),
                "--steps",
                "2",
                "--out",
                str(tmp_path / "tiger.png"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "tiger.png").size == (64, 64)
    assert "edit region 25%" in capsys.readouterr().out


def test_an_all_black_mask_is_an_error_not_a_silent_full_edit(tmp_path, capsys):
    Image.fromarray(photo("chelsea")).resize((64, 64)).save(tmp_path / "cat.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "black.png")
    tiny = np.zeros((64, 64), np.uint8)
    tiny[0, 0] = 255  # one white pixel: less than half of any token
    Image.fromarray(tiny).save(tmp_path / "speck.png")
    for name, message in (("black.png", "is all black: nothing to edit"), ("speck.png", "covers no whole token")):
        assert (
            main(
                [
                    "edit",
                    "--image",
                    str(tmp_path / "cat.png"),
                    "--source-prompt",
                    "a cat",
                    "--target-prompt",
                    "a tiger",
                    "--mask",
                    str(tmp_path / name),
                    "--steps",
                    "2",
                    "--out",
                    str(tmp_path / "tiger.png"),
                ]
            )
            == 2
        )
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hasten")]
        assert len(lines) == 1 and message in lines[0] and f"--mask {tmp_path / name}" in lines[0]
    assert not (tmp_path / "tiger.png").exists()
