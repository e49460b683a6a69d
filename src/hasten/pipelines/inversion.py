"""Flow-matching inversion: from a clean latent to the noise that regenerates it, and back.

A flow-matching model gives a velocity ``v(x, sigma) = dx/dsigma`` (``x(sigma) = (1 - sigma) x0
+ sigma noise``). Inversion integrates it from ``sigma = 0`` (the image) up to ``sigma = 1``
(noise); :func:`regenerate` integrates back down with the same solver. Three solvers:

``"euler"``
    plain Euler, one velocity per step.
``"uni"``
    predictor-corrector that reuses the previous step's velocity (UniEdit-Flow's "Uni-Inv"):
    each step first moves with the velocity evaluated at the end of the previous step, then
    evaluates the velocity at the point reached and redoes the step with it; that velocity is
    reused by the next step. One model call per step (plus one at the start). The velocity of
    each step is taken at its END point: the point a plain Euler denoising step starts from, so
    regeneration after "uni" inversion is plain Euler sampling, and invert-then-regenerate is
    nearly exact.
``"midpoint"``
    second-order midpoint rule (RF-Solver): the velocity at half a step. Two calls per step.

The solvers call ``velocity(x, sigma)`` and nothing else, so a caller observes every evaluation by
wrapping it (set the noise level a recording hook keys on, keep the latent);
:func:`invert_and_replay` does exactly that for masked replay editing with
:class:`~hasten.hooks.feature_replay.FeatureReplay`.

Examples
--------
>>> import torch
>>> x0 = torch.randn(1, 4)
>>> velocity = lambda x, sigma: torch.ones_like(x)         # a straight, constant flow
>>> sigmas = torch.linspace(1, 0, 5, dtype=torch.float64)
>>> noise = invert(velocity, x0, sigmas, "euler")
>>> torch.allclose(regenerate(velocity, noise, sigmas, "euler"), x0)
True
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from ..hooks.feature_replay import FeatureReplay

__all__ = ["SOLVERS", "invert", "invert_and_replay", "regenerate", "reconstruction_error"]

SOLVERS = ("euler", "uni", "midpoint")
Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def _check(solver: str, sigmas: torch.Tensor) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}")
    if sigmas.dim() != 1 or len(sigmas) < 2 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("`sigmas` must be a 1-D decreasing schedule (noise -> image) of at least 2 levels")


def _integrate(
    velocity: Velocity, x: torch.Tensor, levels: list[float], solver: str, progress: bool, description: str
) -> torch.Tensor:
    """Integrate ``dx/dsigma = v`` through ``levels`` (in the order given)."""
    carried = None  # "uni": the velocity at the current point, from the previous step's corrector
    for start, end in tqdm(list(zip(levels[:-1], levels[1:])), desc=description, disable=not progress):
        step = end - start
        if solver == "euler":
            x = x + step * velocity(x, start)
        elif solver == "midpoint":
            middle = x + step / 2 * velocity(x, start)
            x = x + step * velocity(middle, start + step / 2)
        else:
            first = carried if carried is not None else velocity(x, start)
            predicted = x + step * first
            carried = velocity(predicted, end)
            x = x + step * carried
    return x


@torch.no_grad()
def invert(
    velocity: Velocity, latents: torch.Tensor, sigmas: torch.Tensor, solver: str = "uni", progress: bool = False
) -> torch.Tensor:
    """The noise (at ``sigmas[0]``) that ``solver`` maps back to ``latents`` (at ``sigmas[-1]``).

    ``velocity(x, sigma)`` is the model's ``dx/dsigma``; ``sigmas`` the DENOISING schedule
    (decreasing, e.g. :meth:`hasten.pipelines.flow_models.FlowModel.sigmas`), walked backwards.
    """
    _check(solver, sigmas)
    levels = [float(s) for s in sigmas.flip(0)]
    return _integrate(velocity, latents, levels, solver, progress, "inversion")


@torch.no_grad()
def regenerate(
    velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor, solver: str = "uni", progress: bool = False
) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` down to ``sigmas[-1]``: the denoising counterpart of ``solver``'s
    inversion (Euler for "euler" and "uni", midpoint for "midpoint")."""
    _check(solver, sigmas)
    return _integrate(
        velocity,
        noise,
        [float(s) for s in sigmas],
        "midpoint" if solver == "midpoint" else "euler",
        progress,
        "denoising",
    )


def reconstruction_error(original: torch.Tensor, rebuilt: torch.Tensor) -> float:
    """Mean absolute difference relative to the mean absolute value of ``original``."""
    original, rebuilt = original.detach().float(), rebuilt.detach().float()
    return float((rebuilt - original).abs().mean() / original.abs().mean().clamp_min(1e-12))


@torch.no_grad()
def invert_and_replay(
    source_velocity: Velocity,
    target_velocity: Velocity,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    keep: torch.Tensor,
    replay: "FeatureReplay",
    progress: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked replay editing's loop (VoxHammer, KV-Edit): invert, then regenerate the unkept region.

    1. Invert ``latents`` with the second-order midpoint solver under ``source_velocity``, with
       ``replay`` recording (its ``sigma`` follows every evaluation) and the latent kept per level.
    2. Denoise from the inverted noise under ``target_velocity`` with the same solver, ``replay``
       replaying; after every step ``x <- keep * cached_x + (1 - keep) * x`` at the level reached.
    3. The kept region is ``latents`` exactly: ``x <- keep * latents + (1 - keep) * x``.

    ``keep`` broadcasts against ``latents`` (1 = preserve the source). Returns the edited latents
    and the wall seconds of ``"invert"`` and ``"edit"``.

    Examples
    --------
    >>> import torch
    >>> from hasten.hooks.feature_cache import FeatureCache
    >>> from hasten.hooks.feature_replay import FeatureReplay
    >>> x0, keep = torch.randn(1, 4), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    >>> flow = lambda x, sigma: torch.ones_like(x)
    >>> x, seconds = invert_and_replay(flow, flow, x0, torch.linspace(1, 0, 5, dtype=torch.float64), keep,
    ...                                FeatureReplay(FeatureCache()))
    >>> torch.equal(x[:, :2], x0[:, :2]), sorted(seconds)
    (True, ['edit', 'invert'])
    """
    levels = {round(float(s), 6) for s in sigmas}
    cached: dict[float, torch.Tensor] = {}

    def observed(velocity: Velocity, record_latents: bool) -> Velocity:
        def call(x: torch.Tensor, sigma: float) -> torch.Tensor:
            replay.sigma = sigma
            if record_latents and round(sigma, 6) in levels:
                cached[round(sigma, 6)] = x
            return velocity(x, sigma)

        return call

    start = time.perf_counter()
    replay.mode = "record"
    try:
        noise = invert(observed(source_velocity, True), latents, sigmas, "midpoint", progress)
        invert_seconds = time.perf_counter() - start
        start = time.perf_counter()
        replay.mode = "replay"
        target = observed(target_velocity, False)
        x = noise
        steps = [(float(a), float(b)) for a, b in zip(sigmas[:-1], sigmas[1:])]
        for sigma, following in tqdm(steps, desc="editing", disable=not progress):
            middle = x + (following - sigma) / 2 * target(x, sigma)
            x = x + (following - sigma) * target(middle, sigma + (following - sigma) / 2)
            level = cached.get(round(following, 6), latents if following == 0.0 else None)
            if level is not None:
                x = keep * level + (1 - keep) * x
        x = keep * latents + (1 - keep) * x
    finally:
        replay.mode = "off"
    return x, {"invert": invert_seconds, "edit": time.perf_counter() - start}
