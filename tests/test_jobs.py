"""Batch translation jobs: manifest semantics, failures, kill -9 and resume, settings changes, Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hasten.cli import main
from hasten.jobs import MANIFEST_NAME, Job, Manifest, run_jobs
from hasten.tiny.motion import panned
from hasten.video import read_video, write_video

FAST = ["--steps", "2", "--no-audio"]


def _videos(folder: Path, count: int, frames: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        clip, _ = panned(frames=frames, size=(40, 56), step=(1 + index, 0))
        paths.append(write_video(clip, folder / f"clip{index}.avi", fps=8))
    return paths


def _done(manifest: Path) -> list[str]:
    return [r["input"] for r in Manifest(manifest).records() if r["status"] == "done"]


def test_a_corrupt_input_fails_alone(tmp_path, capsys):
    inputs = _videos(tmp_path / "in", 2)
    (tmp_path / "in" / "broken.mp4").write_bytes(b"not a video at all" * 100)
    out = tmp_path / "out"
    code = main(["translate", str(tmp_path / "in"), "--output", str(out), "--prompt", "a painting", *FAST])
    assert code == 1
    printed = capsys.readouterr().out
    assert "2 translated" in printed and "1 failed" in printed and "broken" in printed
    latest = Manifest(out / MANIFEST_NAME).latest()
    assert (
        latest[str(out / "broken.mp4")]["status"] == "failed" and "corrupt" in latest[str(out / "broken.mp4")]["error"]
    )
    for path in inputs:
        record = latest[str(out / f"{path.stem}.mp4")]
        assert record["status"] == "done" and record["frames"] == 3 and "total" in record["seconds"]
        assert read_video(out / f"{path.stem}.mp4").frames.shape == (3, 40, 56, 3)
    # a re-run skips the done ones and keeps reporting the failure until --retry-failed
    assert main(["translate", str(tmp_path / "in"), "--output", str(out), "--prompt", "a painting", *FAST]) == 1
    assert "0 translated, 2 already done, 1 failed" in capsys.readouterr().out
    assert len(Manifest(out / MANIFEST_NAME).records()) == 3
    main(["translate", str(tmp_path / "in"), "--output", str(out), "--prompt", "a painting", "--retry-failed", *FAST])
    assert len(Manifest(out / MANIFEST_NAME).records()) == 4


def test_changed_settings_redo_the_video(tmp_path):
    source = _videos(tmp_path / "in", 1)[0]
    out = tmp_path / "out"
    job = Job(source, out / "clip0.mp4", "a painting", {"num_inference_steps": 2})
    assert run_jobs([job], out, progress=False).done == [str(job.output)]
    assert run_jobs([job], out, progress=False).skipped == [str(job.output)]
    changed = Job(source, out / "clip0.mp4", "a sketch", {"num_inference_steps": 2})
    assert run_jobs([changed], out, progress=False).done == [str(job.output)]
    (out / "clip0.mp4").unlink()  # a done output that went missing is redone
    assert run_jobs([changed], out, progress=False).done == [str(job.output)]


def test_jobs_file_and_duplicate_outputs(tmp_path, capsys):
    sources = _videos(tmp_path / "in", 2)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "\n".join(
            json.dumps(line)
            for line in [
                {"input": str(sources[0]), "prompt": "ink", "options": {"warp_end": 0.5}},
                {"input": str(sources[1]), "prompt": "oil", "output": str(tmp_path / "out" / "custom.mp4")},
            ]
        )
    )
    assert main(["translate", "--jobs", str(jobs), "--output", str(tmp_path / "out"), *FAST]) == 0
    records = Manifest(tmp_path / "out" / MANIFEST_NAME).records()
    assert {r["settings"]["prompt"] for r in records} == {"ink", "oil"}
    assert records[0]["settings"]["options"]["warp_end"] == 0.5 and (tmp_path / "out" / "custom.mp4").exists()
    twice = tmp_path / "twice.jsonl"
    twice.write_text(
        json.dumps({"input": str(sources[0]), "prompt": "a"})
        + "\n"
        + json.dumps({"input": str(sources[0]), "prompt": "b"})
    )
    assert main(["translate", "--jobs", str(twice), "--output", str(tmp_path / "o2"), *FAST]) == 2
    assert "same output" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_mid_job_then_rerun_does_every_video_exactly_once(tmp_path):
    inputs = _videos(tmp_path / "in", 6, frames=10)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "hasten.cli",
        "translate",
        str(tmp_path / "in"),
        "--output",
        str(out),
        "--prompt",
        "a painting",
        "--steps",
        "6",
        "--no-audio",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(_done(out / MANIFEST_NAME)) < 1:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    first = _done(out / MANIFEST_NAME)
    assert 1 <= len(first) < 6, "killed mid-batch"
    assert subprocess.run(command, env=env, capture_output=True, timeout=600).returncode == 0
    done = _done(out / MANIFEST_NAME)
    assert sorted(done) == sorted(str(p) for p in inputs), "every video done exactly once"
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary file left"
    for path in inputs:
        assert read_video(out / f"{path.stem}.mp4").frames.shape[0] == 10


@pytest.mark.slow
def test_ray_backend_gives_the_same_manifest(tmp_path):
    ray = pytest.importorskip("ray")
    _videos(tmp_path / "in", 3)
    (tmp_path / "in" / "broken.avi").write_bytes(b"\x00" * 500)
    local, remote = tmp_path / "local", tmp_path / "ray"
    args = [str(tmp_path / "in"), "--prompt", "a painting", *FAST]
    assert main(["translate", *args, "--output", str(local)]) == 1
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["translate", *args, "--output", str(remote), "--backend", "ray"]) == 1
    finally:
        ray.shutdown()

    def summary(folder):
        return {
            Path(r["output"]).name: (r["status"], r["settings_hash"], r.get("frames"))
            for r in Manifest(folder / MANIFEST_NAME).records()
        }

    assert summary(local) == summary(remote)
    for name in ("clip0.mp4", "clip1.mp4", "clip2.mp4"):
        assert read_video(remote / name).frames.shape == read_video(local / name).frames.shape


def _translate(*args: str, cwd: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "hasten.cli", "translate", *args, "--prompt", "a painting", *FAST]
    return subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_two_concurrent_runs_spelled_differently_translate_each_video_once(tmp_path):
    """Two real processes on one output folder (``out/`` and its absolute path), then a third spelling."""
    inputs = _videos(tmp_path / "in", 2, frames=2)
    first = _translate("in", "--output", "out/", cwd=tmp_path)
    second = _translate(str(tmp_path / "in"), "--output", str(tmp_path / "out"), cwd=tmp_path)
    results = [(process.wait(timeout=300), *process.communicate()) for process in (first, second)]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, _, err in results:
        if code == 2:  # the loser stops at once with one clear line, and translates nothing
            assert "another `hasten translate` run is using this folder" in err and "--output" in err
            assert "Traceback" not in err
    manifest = tmp_path / "out" / MANIFEST_NAME
    assert sorted(_done(manifest)) == sorted(str(p) for p in inputs), "every video done exactly once"
    # a third spelling of the same work (./in/../in/clip0.avi, out/./) resumes it: nothing is redone
    third = _translate("./in/../in/clip0.avi", str(tmp_path / "in" / "clip1.avi"), "--output", "out/./", cwd=tmp_path)
    assert third.wait(timeout=300) == 0
    assert "0 translated, 2 already done" in third.communicate()[0]
    assert len(Manifest(manifest).records()) == 2


def test_a_second_run_on_a_locked_folder_fails_at_once(tmp_path):
    _videos(tmp_path / "in", 1, frames=2)
    out = tmp_path / "out"
    with Manifest(out / MANIFEST_NAME).lock():  # another run holds the folder (a real process below)
        start = time.perf_counter()
        process = _translate(str(tmp_path / "in"), "--output", str(out), cwd=tmp_path)
        code = process.wait(timeout=120)
        _, err = process.communicate()
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("hasten")]
    assert len(lines) == 1 and "another `hasten translate` run" in lines[0] and str(out) in lines[0]
    assert "Traceback" not in err and "Loading" not in err, "stops before loading the model"
    assert not list(out.glob("*.mp4")) and time.perf_counter() - start < 60
    # the lock goes with its holder: the same command now runs
    assert main(["translate", str(tmp_path / "in"), "--output", str(out), "--prompt", "a painting", *FAST]) == 0


def test_resume_matches_any_spelling_of_the_paths(tmp_path, monkeypatch, capsys):
    source = _videos(tmp_path / "in", 1, frames=2)[0]
    monkeypatch.chdir(tmp_path)
    assert main(["translate", "in/", "--output", "out/", "--prompt", "a painting", *FAST]) == 0
    capsys.readouterr()
    assert main(["translate", str(source), "--output", str(tmp_path / "out"), "--prompt", "a painting", *FAST]) == 0
    assert "0 translated, 1 already done" in capsys.readouterr().out
    record = Manifest(tmp_path / "out" / MANIFEST_NAME).records()[0]
    assert record["input"] == str(source.resolve()) and record["output"] == str((tmp_path / "out/clip0.mp4").resolve())
    # the same video named twice (a folder and its file) is one job, not "several jobs write the same output"
    assert main(["translate", "in", "in/clip0.avi", "--output", "out", "--prompt", "a painting", *FAST]) == 0


def test_a_torn_last_manifest_line_is_repaired_before_the_next_append(tmp_path):
    manifest = Manifest(tmp_path / MANIFEST_NAME)
    manifest.append({"output": "a.mp4", "status": "done"})
    with open(manifest.path, "ab") as file:  # a crash mid-write
        file.write(b'{"output": "b.mp4", "stat')
    manifest.append({"output": "c.mp4", "status": "done"})
    assert [r["output"] for r in manifest.records()] == ["a.mp4", "c.mp4"]
    assert manifest.path.read_text().count("\n") == 2 and manifest.path.read_text().endswith("\n")
    with open(manifest.path, "ab") as file:  # a complete record whose newline was lost is kept
        file.write(b'{"output": "d.mp4", "status": "done"}')
    manifest.append({"output": "e.mp4", "status": "failed"})
    assert [r["output"] for r in manifest.records()] == ["a.mp4", "c.mp4", "d.mp4", "e.mp4"]


def test_outputs_respect_the_umask(tmp_path):
    source = _videos(tmp_path / "in", 1, frames=2)[0]
    previous = os.umask(0o022)
    try:
        job = Job(source, tmp_path / "out" / "clip0.mp4", "a painting", {"num_inference_steps": 2})
        assert run_jobs([job], tmp_path / "out", progress=False, audio=False).done
    finally:
        os.umask(previous)
    assert (tmp_path / "out" / "clip0.mp4").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out" / MANIFEST_NAME).stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--output", "{file}"], "--output {file} is a file; give a folder"),
        (["--output", "/proc/hasten-out"], "--output /proc/hasten-out: cannot write in /proc"),
        (["--output", "{tmp}/o", "--model", "{tmp}"], "this folder is not a diffusers pipeline (no model_index.json)"),
        (
            ["--output", "{tmp}/o", "--model", "nobody/no-such-model"],
            "--model nobody/no-such-model: not a local folder",
        ),
        (["--output", "{tmp}/o", "--device", "cuda:7"], "--device cuda:7"),
    ],
)
def test_bad_output_model_or_device_fail_before_anything_runs(tmp_path, capsys, argv, message):
    _videos(tmp_path / "in", 1, frames=2)
    (tmp_path / "file").write_text("x")
    fill = {"file": str(tmp_path / "file"), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in argv]
    before = sorted(tmp_path.rglob("*"))
    assert main(["translate", str(tmp_path / "in"), "--prompt", "a painting", *argv, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(**fill) in err and err.startswith("hasten translate: ")
    assert sorted(tmp_path.rglob("*")) == before, "nothing created"
