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
    assert latest[str(out / "broken.mp4")]["status"] == "failed" and "corrupt" in latest[str(out / "broken.mp4")]["error"]
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
    jobs.write_text("\n".join(json.dumps(line) for line in [
        {"input": str(sources[0]), "prompt": "ink", "options": {"warp_end": 0.5}},
        {"input": str(sources[1]), "prompt": "oil", "output": str(tmp_path / "out" / "custom.mp4")},
    ]))
    assert main(["translate", "--jobs", str(jobs), "--output", str(tmp_path / "out"), *FAST]) == 0
    records = Manifest(tmp_path / "out" / MANIFEST_NAME).records()
    assert {r["settings"]["prompt"] for r in records} == {"ink", "oil"}
    assert records[0]["settings"]["options"]["warp_end"] == 0.5 and (tmp_path / "out" / "custom.mp4").exists()
    twice = tmp_path / "twice.jsonl"
    twice.write_text(json.dumps({"input": str(sources[0]), "prompt": "a"}) + "\n" +
                     json.dumps({"input": str(sources[0]), "prompt": "b"}))
    assert main(["translate", "--jobs", str(twice), "--output", str(tmp_path / "o2"), *FAST]) == 2
    assert "same output" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_mid_job_then_rerun_does_every_video_exactly_once(tmp_path):
    inputs = _videos(tmp_path / "in", 6, frames=10)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "hasten.cli", "translate", str(tmp_path / "in"), "--output", str(out),
               "--prompt", "a painting", "--steps", "6", "--no-audio"]
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
        return {Path(r["output"]).name: (r["status"], r["settings_hash"], r.get("frames"))
                for r in Manifest(folder / MANIFEST_NAME).records()}

    assert summary(local) == summary(remote)
    for name in ("clip0.mp4", "clip1.mp4", "clip2.mp4"):
        assert read_video(remote / name).frames.shape == read_video(local / name).frames.shape
