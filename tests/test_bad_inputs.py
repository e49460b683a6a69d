"""Issue 24: every bad input gets one clear line naming the problem, exit code 2, no traceback, nothing
left behind, and it comes before any model loads or any computation runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import hasten.loading as loading
from hasten.cli import main

NO_MODEL = "nobody-hasten-test/no-such-model"


def _fails(argv: list[str], capsys, *words: str) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one ``hasten...`` line holding ``words``."""
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("hasten")]
    assert code == 2, err
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def no_compute(monkeypatch):
    """Any model load or pipeline run fails the test: the checks must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    import hasten.cli.edit3d
    import hasten.cli.generate
    import hasten.token_pruning.evaluate

    for target, name in (
        (loading, "load_pipeline"),
        (loading, "load_transformers_model"),
        (hasten.cli.generate, "load_pipeline"),
        (hasten.token_pruning.evaluate, "load_vlm"),
        (hasten.cli.edit3d, "_load"),
    ):
        monkeypatch.setattr(target, name, forbidden)


@pytest.fixture
def no_from_pretrained(monkeypatch):
    """A bad --model is reported before any ``from_pretrained`` (no retries, no chained tracebacks)."""
    from diffusers import DiffusionPipeline
    from transformers import AutoModelForImageTextToText

    def forbidden(*args, **kwargs):
        raise AssertionError("from_pretrained was called for a model that cannot be loaded")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", forbidden)
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", forbidden)


def _model_commands(tmp_path, model: str) -> list[list[str]]:
    video = tmp_path / "in.avi"
    if not video.exists():
        from hasten.tiny.motion import panned
        from hasten.video import write_video

        write_video(panned(frames=2, size=(16, 16))[0], video, fps=8)
    out = str(tmp_path / "x.png")
    return [
        ["generate", "--model", model, "--steps", "1", "--out", out],
        [
            "edit",
            "--model",
            model,
            "--source-prompt",
            "a cat",
            "--target-prompt",
            "a dog",
            "--edit-words",
            "cat",
            "--steps",
            "1",
            "--out",
            out,
        ],
        [
            "translate",
            str(video),
            "--prompt",
            "ink",
            "--model",
            model,
            "--output",
            str(tmp_path / "o"),
            "--steps",
            "1",
            "--no-audio",
        ],
        ["t2i-ar", "--model", model, "--out", out],
        ["vlm", "ask", "--model", model],
        ["vlm", "eval", "--model", model],
        ["vlm", "train-draft", "--model", model, "--steps", "1", "--out", str(tmp_path / "draft")],
        ["app", "grat", "--model", model],
        ["app", "edit", "--model", model],
        ["app", "video", "--model", model],
        ["app", "sjd", "--model", model],
        ["app", "vlm", "--model", model],
    ]


@pytest.mark.parametrize("index", range(12))
def test_an_uncached_model_id_offline_says_so_at_once(tmp_path, capsys, no_from_pretrained, index):
    argv = _model_commands(tmp_path, NO_MODEL)[index]
    before = sorted(tmp_path.rglob("*"))
    start = time.perf_counter()
    line = _fails(argv, capsys, f"--model {NO_MODEL}", "not in the Hugging Face cache", "pass a local folder")
    assert "HF_HUB_OFFLINE" in line
    assert time.perf_counter() - start < 30, "no retries"
    assert sorted(tmp_path.rglob("*")) == before, "nothing left behind"


@pytest.mark.parametrize("index", range(12))
def test_a_folder_that_is_not_a_model_is_named(tmp_path, capsys, no_from_pretrained, index):
    folder = tmp_path / "just-a-folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("no model here")
    argv = _model_commands(tmp_path, str(folder))[index]
    _fails(argv, capsys, f"--model {folder}: this folder is not a", "save_pretrained")
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.png").exists()


def test_an_unreachable_hub_is_reported_without_retries(monkeypatch, capsys, tmp_path):
    """Not offline by flag, but no network (or no such repository): still one line, at once."""
    monkeypatch.setattr(loading, "_offline", lambda: False)
    start = time.perf_counter()
    _fails(
        ["generate", "--model", NO_MODEL, "--out", str(tmp_path / "x.png")],
        capsys,
        f"--model {NO_MODEL}",
        "local folder",
    )
    assert time.perf_counter() - start < 30


def test_edit3d_model_and_box_errors(tmp_path, capsys):
    np.save(tmp_path / "shape.npy", np.zeros((32, 32, 32), bool))
    common = [
        "edit3d",
        "--occupancy",
        str(tmp_path / "shape.npy"),
        "--prompt",
        "a chair",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "o.npy"),
    ]
    _fails(
        [*common, "--box", "0", "0", "0", "8", "8", "8", "--model", str(tmp_path / "missing")],
        capsys,
        f"--model {tmp_path / 'missing'}",
        "TRELLIS folder",
    )
    _fails([*common, "--box", "32", "0", "0", "64", "64", "64"], capsys, "--box", "32^3 grid")
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.parametrize(
    "argv,words",
    [
        (["generate", "--out", "/proc/hasten-x.png"], ("--out /proc/hasten-x.png", "cannot write in /proc")),
        (["generate", "--out", "{file}/x.png"], ("--out {file}/x.png", "is a file, not a folder")),
        (["generate", "--out", "{tmp}"], ("--out {tmp} is a folder", "give a file name")),
        (["generate", "--out", "{tmp}/x.txt"], ("--out {tmp}/x.txt", "unsupported file type '.txt'", ".png")),
        (["t2i-ar", "--out", "{tmp}"], ("--out {tmp} is a folder",)),
        (["t2i-ar", "--out", "/proc/hasten-x.png"], ("cannot write in /proc",)),
        (
            ["edit", "--source-prompt", "a", "--target-prompt", "b", "--edit-words", "a", "--out", "{file}/x.png"],
            ("--out {file}/x.png", "is a file"),
        ),
        (
            [
                "edit",
                "--source-prompt",
                "a",
                "--target-prompt",
                "b",
                "--edit-words",
                "a",
                "--video",
                "--out",
                "{tmp}/x.png",
            ],
            ("--out {tmp}/x.png", ".mp4"),
        ),
        (
            [
                "edit3d",
                "--occupancy",
                "{tmp}/s.npy",
                "--box",
                "0",
                "0",
                "0",
                "8",
                "8",
                "8",
                "--prompt",
                "a chair",
                "--out",
                "{tmp}/o.txt",
            ],
            ("--out {tmp}/o.txt: unsupported file type '.txt'", ".ply"),
        ),
        (
            [
                "edit3d",
                "--occupancy",
                "{tmp}/s.npy",
                "--box",
                "0",
                "0",
                "0",
                "8",
                "8",
                "8",
                "--prompt",
                "a chair",
                "--out",
                "/proc/o.glb",
            ],
            ("--out /proc/o.glb", "cannot write"),
        ),
        (["vlm", "train-draft", "--out", "{file}"], ("--out {file} is a file", "folder")),
        (["translate", "{tmp}", "--prompt", "ink", "--output", "{file}"], ("--output {file} is a file",)),
    ],
)
def test_output_locations_are_checked_before_computing(tmp_path, capsys, no_compute, argv, words):
    (tmp_path / "file").write_text("x")
    np.save(tmp_path / "s.npy", np.zeros((32, 32, 32), bool))
    fill = {"file": str(tmp_path / "file"), "tmp": str(tmp_path)}
    before = sorted(tmp_path.rglob("*"))
    _fails([a.format(**fill) for a in argv], capsys, *(w.format(**fill) for w in words))
    assert sorted(tmp_path.rglob("*")) == before, "nothing left behind"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--device", "cuda"],
        ["edit", "--source-prompt", "a", "--target-prompt", "b", "--edit-words", "a", "--device", "cuda"],
        ["vlm", "ask", "--device", "cuda"],
        ["vlm", "eval", "--device", "cuda"],
        ["t2i-ar", "--device", "cuda"],
        ["translate", "{tmp}", "--prompt", "ink", "--output", "{tmp}/o", "--device", "cuda"],
        ["app", "grat", "--device", "cuda"],
        ["app", "vlm", "--device", "cuda"],
    ],
)
def test_device_cuda_without_cuda(tmp_path, capsys, argv):
    argv = [a.format(tmp=tmp_path) for a in argv]
    if argv[0] not in ("app",):
        argv += ["--out", str(tmp_path / "x.png")] if argv[0] in ("generate", "edit", "t2i-ar") else []
    _fails(argv, capsys, "--device", "CUDA is not available", "cpu")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content,words",
    [
        (b"", ("not a mesh trimesh can read",)),
        (b"glTF garbage" * 20, ("not a mesh trimesh can read",)),
    ],
)
def test_edit3d_empty_or_garbage_mesh_names_the_file(tmp_path, capsys, content, words):
    mesh = tmp_path / "chair.glb"
    mesh.write_bytes(content)
    _fails(
        [
            "edit3d",
            "--mesh",
            str(mesh),
            "--box",
            "0",
            "0",
            "0",
            "8",
            "8",
            "8",
            "--prompt",
            "a chair",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "o.glb"),
        ],
        capsys,
        f"--mesh {mesh}",
        *words,
    )
    assert not (tmp_path / "o.glb").exists()


@pytest.mark.parametrize(
    "option,value",
    [
        ("--guidance-scale", "nan"),
        ("--guidance-scale", "inf"),
        ("--temperature", "nan"),
        ("--temperature", "0"),
        ("--top-p", "1.5"),
    ],
)
def test_t2i_ar_rejects_non_finite_numbers(capsys, no_compute, option, value):
    _fails(["t2i-ar", option, value], capsys, f"argument {option}", value)


def test_vlm_train_draft_data_errors(tmp_path, capsys, no_compute):
    out = ["--out", str(tmp_path / "draft")]
    _fails(
        ["vlm", "train-draft", "--data", str(tmp_path / "missing.jsonl"), *out],
        capsys,
        f"--data {tmp_path / 'missing.jsonl'} does not exist",
    )
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ok.png")
    data = tmp_path / "data.jsonl"
    data.write_text(
        json.dumps({"image": "ok.png", "prompt": "a"}) + "\n" + json.dumps({"image": "gone.png", "prompt": "b"}) + "\n"
    )
    _fails(
        ["vlm", "train-draft", "--data", str(data), *out],
        capsys,
        f"{data}:2",
        f"image {tmp_path / 'gone.png'}",
        "does not exist",
    )
    data.write_text(json.dumps({"image": "ok.png", "prompt": "a"}) + "\n" + '{"image": "ok.png", "prompt": \n')
    _fails(["vlm", "train-draft", "--data", str(data), *out], capsys, f"--data {data}:2: not JSON")
    data.write_text(json.dumps({"picture": "ok.png"}) + "\n")
    _fails(["vlm", "train-draft", "--data", str(data), *out], capsys, f"{data}:1", '"image"', '"prompt"')
    assert not (tmp_path / "draft").exists()


def test_hasten_tiny_is_reachable_after_import_hasten_and_stays_lazy():
    code = (
        "import sys, hasten; assert 'hasten.tiny' not in sys.modules, 'import hasten got heavier'; "
        "print(type(hasten.tiny.pipeline('flux')).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("FluxPipeline")


def test_gradio_share_hint_names_the_cli_flag(capsys):
    import gradio as gr

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from hasten.apps.launcher import free_port, launch

    with gr.Blocks() as demo:
        gr.Markdown("hello")
    launch(demo, port=free_port(), prevent_thread_lock=True)
    demo.close()
    printed = capsys.readouterr().out
    assert "--share" in printed and "share=True" not in printed


def test_generate_compare_says_why_grat_is_dense_at_this_size(tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-flux",
                "--compare",
                "--steps",
                "1",
                "--backend",
                "reference",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "density 100.0%" in printed and "GRAT cannot be sparse at this size" in printed
    assert "--height/--width" in printed and "--group-size" in printed


def test_bad_inputs_in_a_real_process_print_one_line_and_no_traceback(tmp_path):
    """The same checks through the console entry point, with the Hub flag unset (no network here)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    (tmp_path / "file").write_text("x")
    for argv, word in (
        (["generate", "--model", NO_MODEL], f"--model {NO_MODEL}"),
        (["generate", "--out", str(tmp_path / "file" / "x.png")], "is a file, not a folder"),
    ):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "hasten.cli", *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        lines = [line for line in result.stderr.splitlines() if line.startswith("hasten")]
        assert result.returncode == 2 and len(lines) == 1 and word in lines[0], result.stderr
        assert "Traceback" not in result.stderr and time.perf_counter() - start < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_edit3d_writes_its_output_whole_with_the_umask(tmp_path, capsys):
    occupancy = np.zeros((32, 32, 32), bool)
    occupancy[8:24, 8:24, 8:24] = True
    np.save(tmp_path / "shape.npy", occupancy)
    previous = os.umask(0o022)
    try:
        assert (
            main(
                [
                    "edit3d",
                    "--occupancy",
                    str(tmp_path / "shape.npy"),
                    "--box",
                    "16",
                    "0",
                    "0",
                    "32",
                    "32",
                    "32",
                    "--prompt",
                    "a chair",
                    "--steps",
                    "1",
                    "--out",
                    str(tmp_path / "new" / "o.npy"),
                ]
            )
            == 0
        )
    finally:
        os.umask(previous)
    out = tmp_path / "new" / "o.npy"
    assert np.load(out).shape == (32, 32, 32) and out.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["o.npy"], "no temporary file left"


def test_vlm_ask_checks_its_files_before_loading_the_model(tmp_path, capsys, no_compute):
    _fails(["vlm", "ask", "--image", str(tmp_path / "missing.png")], capsys, f"--image {tmp_path / 'missing.png'}")
    _fails(
        ["vlm", "ask", "--speculative", str(tmp_path)],
        capsys,
        f"--speculative {tmp_path}",
        "not a SpecVLM draft folder",
        "train-draft",
    )


def test_a_broken_model_folder_is_one_line_naming_it(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"]}')
    (broken / "config.json").write_text("{not json")
    _fails(
        ["generate", "--model", str(broken), "--out", str(tmp_path / "x.png")],
        capsys,
        f"--model {broken}: cannot load it as a diffusers pipeline",
    )
    _fails(["vlm", "ask", "--model", str(broken)], capsys, f"--model {broken}: cannot load it as an image-text model")
    assert not (tmp_path / "x.png").exists()
