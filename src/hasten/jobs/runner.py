"""Run translation jobs locally or on a Ray cluster, with the same manifest semantics.

:func:`run_jobs` plans the batch (skip what is done with the same settings, skip what failed
unless ``retry_failed``, clear temporary files a crash left), runs the rest on a backend, and
records every attempt in the manifest as it finishes. Each worker loads the model once
(:class:`Translator`), not once per video. The run holds a lock on the output folder's manifest
from planning to the last record: a second run on the same folder (even spelled differently)
fails at once with :class:`~hasten.jobs.manifest.OutputLocked` instead of redoing the same
videos. Outputs get the permissions of any new file (``0o666`` less the umask).

- ``"local"``: this process, an overall bar (videos) and a per-video bar (frames).
- ``"ray"``: one actor per GPU of the cluster (or one per CPU slot, up to the number of videos,
  when it has none), fed through an ``ActorPool``; the driver alone writes the manifest. The
  output folder must be visible to every worker (one machine, or shared storage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .manifest import Job, Manifest, normal_path
from .translator import Translator

__all__ = ["BACKENDS", "Summary", "Translator", "plan", "run_jobs"]

BACKENDS = ("local", "ray")
MANIFEST_NAME = "manifest.jsonl"


@dataclass
class Summary:
    """What a run did: outputs done now, skipped (done before), failed (now or before, not retried)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        lines = [f"{len(self.done)} translated, {len(self.skipped)} already done, {len(self.failed)} failed"]
        lines += [f"  FAILED {output}: {error}" for output, error in self.failed.items()]
        return "\n".join(lines)


def plan(jobs: list[Job], manifest: Manifest, retry_failed: bool = False) -> tuple[list[Job], Summary]:
    """The jobs to run now, and a summary pre-filled with the ones skipped."""
    outputs = [str(job.output) for job in jobs]
    duplicates = {o for o in outputs if outputs.count(o) > 1}
    if duplicates:
        raise ValueError(
            f"several jobs write the same output: {', '.join(sorted(duplicates))}; give them "
            'distinct names ("output" in the jobs file)'
        )
    latest = manifest.latest()
    summary, todo = Summary(), []
    for job in jobs:
        record = latest.get(str(normal_path(job.output)))
        same = record is not None and record.get("settings_hash") == job.settings_hash()
        if same and record["status"] == "done" and job.output.exists():
            summary.skipped.append(str(job.output))
        elif same and record["status"] == "failed" and not retry_failed:
            summary.failed[str(job.output)] = f"{record.get('error')} (earlier run; --retry-failed to retry)"
        else:
            todo.append(job)
    return todo, summary


def _clear_temporaries(jobs: list[Job]) -> None:
    """Temporary files a crash left beside the outputs (see ``hasten.video.io``)."""
    for job in jobs:
        for stale in job.output.parent.glob(f".{job.output.stem}-*{job.output.suffix}"):
            stale.unlink(missing_ok=True)


def run_jobs(
    jobs: list[Job],
    output_dir: str | Path,
    backend: str = "local",
    retry_failed: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    ray_address: str | None = None,
    audio: bool = True,
    progress: bool = True,
) -> Summary:
    """Run ``jobs``, recording each in ``output_dir/manifest.jsonl``; see the module docstring.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from hasten.tiny.motion import panned
    >>> from hasten.video import write_video
    >>> folder = Path(tempfile.mkdtemp())
    >>> source = write_video(panned(frames=2, size=(40, 56))[0], folder / "in.avi", fps=8)
    >>> job = Job(source, folder / "out" / "in.mp4", "a painting", {"num_inference_steps": 2})
    >>> summary = run_jobs([job], folder / "out", progress=False)
    >>> summary.done == [str(job.output)], len(run_jobs([job], folder / "out", progress=False).skipped)
    (True, 1)
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    output_dir = normal_path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"`output_dir` {output_dir} is a file; give a folder (it holds the outputs and the manifest)")
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(output_dir / MANIFEST_NAME)
    with manifest.lock():
        return _run_locked(jobs, manifest, backend, retry_failed, device, dtype, ray_address, audio, progress)


def _run_locked(
    jobs: list[Job],
    manifest: Manifest,
    backend: str,
    retry_failed: bool,
    device: str | None,
    dtype: str | None,
    ray_address: str | None,
    audio: bool,
    progress: bool,
) -> Summary:
    todo, summary = plan(jobs, manifest, retry_failed)
    _clear_temporaries(todo)
    if not todo:
        return summary
    models = {job.model for job in todo}
    if len(models) > 1:
        raise ValueError(f"one run uses one model; the jobs ask for {sorted(models)}")
    model = models.pop()

    def finish(record: dict[str, Any]) -> None:
        manifest.append(record)
        if record["status"] == "done":
            summary.done.append(record["output"])
        else:
            summary.failed[record["output"]] = record["error"]

    if backend == "local":
        translator = Translator(model, device, dtype)
        videos = tqdm(todo, desc="videos", unit="video", disable=not progress)
        for job in videos:
            frames = tqdm(desc=job.input.name, unit="frame", leave=False, disable=not progress)

            def tick(done: int, total: int, bar=frames) -> None:
                bar.total = total
                bar.update(done - bar.n)

            finish(translator.run(job, tick, audio))
            frames.close()
    else:
        from .ray_backend import run_on_ray

        for record in run_on_ray(todo, model, device, dtype, ray_address, audio, progress):
            finish(record)
    return summary
