"""Jobs and the manifest that makes a batch resumable.

A :class:`Job` is one video to translate: its input, its output path, its prompt and options.
Its :meth:`Job.settings_hash` covers everything that changes the output (model, prompt,
options), so a re-run redoes a video exactly when its settings changed.

The :class:`Manifest` is a JSONL file in the output folder, appended to (one line per finished
attempt, flushed and fsynced) by the one process that runs the batch: :meth:`Manifest.lock`
takes an exclusive lock on it for the whole run, and a second run on the same folder fails at
once with :class:`OutputLocked` (it does not wait). The latest line of an output wins. A line cut
short by a crash is ignored when reading, and cut off (or, when it is complete JSON that only
lacks its newline, ended) before the next append, so the next record starts on a line of its
own. Outputs themselves are written to a temporary file and renamed, and only then recorded as
done, so after any crash (kill -9 included) every "done" line names a complete file, and a
video with no "done" line is redone.

Paths are normalised: a job's input and output are absolute (``out/`` and ``$PWD/out`` are one
folder), and so are the manifest's keys, so a re-run resumes whatever the spelling.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "VIDEO_SUFFIXES",
    "Job",
    "Manifest",
    "OutputLocked",
    "find_videos",
    "jobs_from_file",
    "normal_path",
    "respect_umask",
]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def normal_path(path: str | os.PathLike) -> Path:
    """``path`` made absolute with symlinks and ``..`` resolved: one spelling per file.

    Examples
    --------
    >>> normal_path("out/../out/a.mp4") == normal_path(Path.cwd() / "out" / "a.mp4")
    True
    """
    return Path(path).expanduser().resolve()


def respect_umask(path: str | os.PathLike) -> Path:
    """Give ``path`` the mode of a newly created file (``0o666`` less the umask): files written through
    a private temporary file and renamed (``tempfile.mkstemp``) are 0600 otherwise."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)


class OutputLocked(ValueError):
    """Another run holds the output folder's manifest (see :meth:`Manifest.lock`)."""


@dataclass(frozen=True)
class Job:
    """One video to translate (``input`` and ``output`` are stored normalised, see :func:`normal_path`)."""

    input: Path
    output: Path
    prompt: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str = "tiny-sd15"

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", normal_path(self.input))
        object.__setattr__(self, "output", normal_path(self.output))

    def settings(self) -> dict[str, Any]:
        return {"model": self.model, "prompt": self.prompt, "options": self.options}

    def settings_hash(self) -> str:
        text = json.dumps(self.settings(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def find_videos(inputs: list[str | os.PathLike]) -> list[Path]:
    """Video files among ``inputs`` (files as given; folders: their video files, sorted), normalised
    (:func:`normal_path`), each once even when named twice (``in/`` and ``in/a.mp4``)."""
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for video in sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()):
                found.setdefault(normal_path(video))
        elif path.exists():
            found.setdefault(normal_path(path))
        else:
            raise FileNotFoundError(f"input {path} does not exist")
    return list(found)


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
            raise ValueError(f'{path}:{number}: each line needs "input" and "prompt"')
        source = Path(entry["input"])
        output = Path(entry["output"]) if entry.get("output") else output_dir / f"{source.stem}.mp4"
        jobs.append(
            Job(source, output, entry["prompt"], {**defaults, **entry.get("options", {})}, entry.get("model", model))
        )
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
        """The latest record of each output, keyed by its normalised path (``str(normal_path(output))``;
        relative paths of older manifests are read against the current folder)."""
        return {str(normal_path(record["output"])): record for record in self.records()}

    @contextlib.contextmanager
    def lock(self, argument: str = "--output"):
        """Hold an exclusive lock on the manifest (created if missing) while the block runs.

        One run per output folder: a second run, in this process or another, raises
        :class:`OutputLocked` at once (it does not wait). The lock is the kernel's (``flock``),
        so a run killed with -9 leaves no stale lock behind.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise OutputLocked(
                    f"{argument} {self.path.parent}: another `hasten translate` run is using this folder (it holds "
                    f"the lock on {self.path.name}); wait for it to finish or choose another {argument}"
                ) from None
            yield self
        finally:
            os.close(descriptor)  # closing releases the lock

    def repair(self) -> None:
        """End the file on a newline: a torn last line (a crash mid-write) is cut off, or, when it is a
        complete record that only lacks its newline, ended with one."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as file:
            data = file.read()
            if not data or data.endswith(b"\n"):
                return
            start = data.rfind(b"\n") + 1
            try:
                complete = isinstance(json.loads(data[start:]), dict)
            except ValueError:
                complete = False
            if complete:
                file.write(b"\n")
            else:
                file.truncate(start)
            file.flush()
            os.fsync(file.fileno())

    def append(self, record: dict[str, Any]) -> None:
        """Add one record durably (one write of one line, flushed and fsynced), on a line of its own."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repair()
        line = json.dumps({**record, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, default=str) + "\n"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            os.write(descriptor, line.encode())
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
