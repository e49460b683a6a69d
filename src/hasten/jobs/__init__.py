"""Batch video translation: resumable jobs with a manifest, run locally or on a Ray cluster.

    from hasten.jobs import Job, run_jobs
    summary = run_jobs(jobs, "out/", backend="local")     # or backend="ray"
    summary.ok, summary.failed

The command line is ``hasten translate`` (see ``hasten translate --help``).
"""

from .manifest import VIDEO_SUFFIXES, Job, Manifest, OutputLocked, find_videos, jobs_from_file, normal_path
from .runner import BACKENDS, MANIFEST_NAME, Summary, Translator, plan, run_jobs

__all__ = [
    "BACKENDS",
    "MANIFEST_NAME",
    "VIDEO_SUFFIXES",
    "Job",
    "Manifest",
    "OutputLocked",
    "Summary",
    "Translator",
    "find_videos",
    "jobs_from_file",
    "normal_path",
    "plan",
    "run_jobs",
]
