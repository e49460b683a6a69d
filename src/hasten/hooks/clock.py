"""Which denoising step a transformer call belongs to, read from the timesteps it receives.

A pipeline does not tell its transformer the step index, so the hooks that act per step (GRAT's
``dense_steps``, ConsistEdit's fused-attention steps) count it from the ``timestep`` argument:
a run starts at its noisiest timestep, so a *rise* starts a new run (step 0); a *change* is the
next step; a *repeat* (the halves of classifier-free guidance in two calls, a second-order
solver's inner evaluation at one timestep) stays on the same step.
"""

from __future__ import annotations

from typing import Any

import torch


class DenoisingClock:
    """Denoising step counter driven by the timesteps a model is called with.

    Examples
    --------
    >>> clock = DenoisingClock()
    >>> [clock.tick(t) for t in (1000, 750, 750, 500, 1000)]
    [0, 1, 1, 2, 0]
    """

    def __init__(self) -> None:
        self.step = -1  # no call seen yet
        self.last: float | None = None

    def tick(self, timestep: Any) -> int:
        """The step of a call at ``timestep`` (a number or a tensor whose first element is the step's)."""
        value = float(torch.as_tensor(timestep).flatten()[0])
        if self.last is None or value > self.last:
            self.step = 0  # a new run starts from its noisiest timestep
        elif value != self.last:
            self.step += 1
        self.last = value
        return self.step

    def reset(self) -> None:
        """Forget the calls seen so far (the next call starts a run)."""
        self.step, self.last = -1, None
