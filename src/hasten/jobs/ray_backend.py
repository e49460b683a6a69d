"""The Ray backend of :func:`hasten.jobs.run_jobs`: actors that each load the model once.

Connects to ``ray_address`` (``"auto"`` for a running cluster) or, without one, to the cluster
this process already joined, or starts a local one. One actor per GPU (``num_gpus=1`` each),
or, on a cluster without GPUs, one per CPU slot up to the number of videos. Records come back
to the driver as videos finish (``ActorPool.map_unordered``); the driver writes the manifest.
"""

from __future__ import annotations

from typing import Any, Iterator

from tqdm.auto import tqdm

from .manifest import Job

__all__ = ["run_on_ray"]


def run_on_ray(
    jobs: list[Job],
    model: str,
    device: str | None,
    dtype: str | None,
    address: str | None,
    audio: bool = True,
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Yield one manifest record per job as the cluster finishes it."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as error:  # pragma: no cover - ray is an optional dependency
        raise ValueError("the ray backend needs `pip install 'hasten[distributed]'` (ray)") from error
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        count, options = min(gpus, len(jobs)), {"num_gpus": 1}
    else:
        count, options = max(1, min(int(resources.get("CPU", 1)), len(jobs))), {"num_cpus": 1}
        device = "cpu"

    @ray.remote
    class TranslatorActor:
        def __init__(self) -> None:
            from .translator import Translator

            self.translator = Translator(model, device, dtype)

        def run(self, job: Job) -> dict[str, Any]:
            return self.translator.run(job, audio=audio)

    actors = [TranslatorActor.options(**options).remote() for _ in range(count)]
    pool = ActorPool(actors)
    bar = tqdm(total=len(jobs), desc=f"videos ({count} Ray workers)", unit="video", disable=not progress)
    try:
        for record in pool.map_unordered(lambda actor, job: actor.run.remote(job), jobs):
            bar.update(1)
            yield record
    finally:
        bar.close()
        for actor in actors:
            ray.kill(actor)
