"""Jobs and the manifest that makes a batch resumable.

A :class:`Job` is one video to translate: its input, its output path, its prompt and options.
Its :meth:`Job.settings_hash` covers everything that changes the output (model, prompt,
options), so a re-run redoes a video exactly when its settings changed.

The :class:`Manifest` is a JSONL file in the output folder, appended to (one line per finished
attempt, flushed and fsynced) by the one process that runs the batch. The latest line of an
output wins. A line cut short by a crash is ignored when reading. Outputs themselves are
written to a temporary file and renamed, and only then recorded as done, so after any crash
(kill -9 included) every "done" line names a complete file, and a video with no "done" line is
redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["VIDEO_SUFFIXES", "Job", "Manifest", "find_videos", "jobs_from_file"]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


@dataclass(frozen=True)
class Job:
    """One video to translate."""

    input: Path
    output: Path
    prompt: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str = "tiny-sd15"

    def settings(self) -> dict[str, Any]:
        return {"model": self.model, "prompt": self.prompt, "options": self.options}

    def settings_hash(self) -> str:
        text = json.dumps(self.settings(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def find_videos(inputs: list[str | os.PathLike]) -> list[Path]:
    """Video files among ``inputs`` (files as given; folders: their video files, sorted)."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()))
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return found


def jobs_from_file(path: str | os.PathLike, output_dir: Path, defaults: dict[str, Any], model: str) -> list[Job]:
    """Jobs from a JSONL file: one ``{"input": ..., "prompt": ..., "output"?: ..., "options"?: {...}}`` per line.

    ``defaults`` are the command line's options; a line's ``options`` override them.
    """
    jobs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from error
        if not isinstance(entry, dict) or "input" not in entry or "prompt" not in entry:
            raise ValueError(f"{path}:{number}: each line needs \"input\" and \"prompt\"")
        source = Path(entry["input"])
        output = Path(entry["output"]) if entry.get("output") else output_dir / f"{source.stem}.mp4"
        jobs.append(Job(source, output, entry["prompt"], {**defaults, **entry.get("options", {})},
                        entry.get("model", model)))
    return jobs


class Manifest:
    """The JSONL record of a batch: per output, its latest status, error, timings and settings hash."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def records(self) -> list[dict[str, Any]]:
        """Every complete line, in order (a line a crash cut short is skipped)."""
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "output" in record:
                records.append(record)
        return records

    def latest(self) -> dict[str, dict[str, Any]]:
        """The latest record of each output path."""
        return {record["output"]: record for record in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        """Add one record durably (one write of one line, flushed and fsynced)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, default=str) + "\n"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(descriptor, line.encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
