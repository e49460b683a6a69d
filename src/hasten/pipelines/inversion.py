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

Every evaluation can be observed (``on_velocity(sigma, x)`` before the call), so an attention
feature cache can record what the model computed at each noise level (see
:mod:`hasten.attention_processors.feature_cache`).

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

from typing import Callable

import torch
from tqdm.auto import tqdm

__all__ = ["SOLVERS", "invert", "regenerate", "reconstruction_error"]

SOLVERS = ("euler", "uni", "midpoint")
Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def _check(solver: str, sigmas: torch.Tensor) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"`solver` must be one of {SOLVERS}, got {solver!r}")
    if sigmas.dim() != 1 or len(sigmas) < 2 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("`sigmas` must be a 1-D decreasing schedule (noise -> image) of at least 2 levels")


def _integrate(velocity: Velocity, x: torch.Tensor, levels: list[float], solver: str, progress: bool,
               description: str) -> torch.Tensor:
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
def invert(velocity: Velocity, latents: torch.Tensor, sigmas: torch.Tensor, solver: str = "uni",
           progress: bool = False) -> torch.Tensor:
    """The noise (at ``sigmas[0]``) that ``solver`` maps back to ``latents`` (at ``sigmas[-1]``).

    ``velocity(x, sigma)`` is the model's ``dx/dsigma``; ``sigmas`` the DENOISING schedule
    (decreasing, e.g. :meth:`hasten.pipelines.flow_models.FlowModel.sigmas`), walked backwards.
    """
    _check(solver, sigmas)
    levels = [float(s) for s in sigmas.flip(0)]
    return _integrate(velocity, latents, levels, solver, progress, "inversion")


@torch.no_grad()
def regenerate(velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor, solver: str = "uni",
               progress: bool = False) -> torch.Tensor:
    """Integrate from ``sigmas[0]`` down to ``sigmas[-1]``: the denoising counterpart of ``solver``'s
    inversion (Euler for "euler" and "uni", midpoint for "midpoint")."""
    _check(solver, sigmas)
    return _integrate(velocity, noise, [float(s) for s in sigmas], "midpoint" if solver == "midpoint" else "euler",
                      progress, "denoising")


def reconstruction_error(original: torch.Tensor, rebuilt: torch.Tensor) -> float:
    """Mean absolute difference relative to the mean absolute value of ``original``."""
    original, rebuilt = original.detach().float(), rebuilt.detach().float()
    return float((rebuilt - original).abs().mean() / original.abs().mean().clamp_min(1e-12))
