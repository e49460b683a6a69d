"""The worker of a translation batch: a LatentWarp pipeline loaded once, translating one job at a time.

Both backends use it (the local runner in-process, the Ray backend inside each actor), so neither
imports the other's module for it.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from .manifest import Job, respect_umask

__all__ = ["Translator"]


class Translator:
    """A loaded LatentWarp pipeline that translates one :class:`Job` at a time."""

    def __init__(self, model: str, device: str | None = None, dtype: str | None = None):
        from ..loading import load_pipeline
        from ..pipelines.latentwarp import LatentWarpPipeline

        self.model = model
        self.pipe = LatentWarpPipeline.from_pipe(load_pipeline(model, dtype, device))

    def run(
        self, job: Job, frame_callback: Callable[[int, int], None] | None = None, audio: bool = True
    ) -> dict[str, Any]:
        """Translate ``job`` and write its output atomically; the manifest record (never raises)."""
        from ..video.io import copy_audio, read_video, write_video

        record: dict[str, Any] = {
            "input": str(job.input),
            "output": str(job.output),
            "settings_hash": job.settings_hash(),
            "settings": job.settings(),
        }
        start = time.perf_counter()
        try:
            if job.model != self.model:
                raise ValueError(f"this worker runs {self.model!r}; the job asks for {job.model!r}")
            options = dict(job.options)
            max_frames = options.pop("max_frames", None)
            video = read_video(job.input, max_frames=max_frames)
            out = self.pipe(
                video=video.frames, prompt=job.prompt, progress=False, frame_callback=frame_callback, **options
            )
            write_video(out.frames, job.output, fps=video.fps)
            if audio:
                copy_audio(job.input, job.output)
            respect_umask(job.output)
            record.update(
                status="done",
                error=None,
                frames=len(out.frames),
                warp_error=round(out.warp_error, 5),
                seconds={
                    **{k: round(v, 3) for k, v in out.seconds.items()},
                    "total": round(time.perf_counter() - start, 3),
                },
            )
        except Exception as error:  # noqa: BLE001 - one bad video fails alone, with its error recorded
            record.update(
                status="failed",
                error=f"{type(error).__name__}: {error}",
                seconds={"total": round(time.perf_counter() - start, 3)},
            )
        return record
