"""Host overhead of a decoding loop: host milliseconds and device-to-host syncs per pass.

A speculative loop is fast only if the device never waits for the host: every ``.item()``,
``.tolist()``, ``.cpu()`` or Python ``int(tensor)`` / ``bool(tensor)`` / ``float(tensor)`` blocks
until the device has finished its queue. :class:`HostProfile` counts those calls while it is
active (by wrapping the tensor methods that read a value back) and splits wall time into the time
spent inside given modules' forwards (the model) and the rest (host bookkeeping).

On a CPU the split is exact (a forward returns when its work is done); on a GPU the model's
time also absorbs the queued work, so read host milliseconds there with a synchronising loop.

Examples
--------
>>> import torch
>>> with HostProfile() as profile:
...     n = int(torch.ones(3).sum())
...     values = torch.arange(4).tolist()
>>> profile.syncs
2
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Iterable

import torch

__all__ = ["HostProfile", "SYNC_METHODS"]

#: Tensor methods that copy a value back to the host (a device sync on an accelerator).
SYNC_METHODS: tuple[str, ...] = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostProfile:
    """Counts host reads of tensor values and times the given modules' forwards while active.

    Parameters
    ----------
    modules : iterable of torch.nn.Module, optional
        Their forward time (outermost calls only) is ``model_seconds``; the rest of the wall time
        is ``host_seconds``.

    Attributes
    ----------
    syncs : int
        Value reads (:data:`SYNC_METHODS`) outside the given modules' forwards.
    by_method : collections.Counter
        The same, per method name.
    model_seconds, wall_seconds : float

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> with HostProfile([layer]) as profile:
    ...     total = float(layer(torch.ones(1, 2)).detach().sum())
    >>> profile.syncs, profile.model_seconds <= profile.wall_seconds
    (1, True)
    """

    def __init__(self, modules: Iterable[torch.nn.Module] = ()):
        self.modules = list(modules)
        self.syncs = 0
        self.by_method: Counter = Counter()
        self.model_seconds = 0.0
        self.wall_seconds = 0.0
        self._depth = 0
        self._saved: dict[str, object] = {}
        self._handles: list = []

    @property
    def host_seconds(self) -> float:
        return self.wall_seconds - self.model_seconds

    def _wrap(self, name: str):
        original = getattr(torch.Tensor, name)
        profile = self

        def counted(tensor, *args, **kwargs):
            if profile._depth == 0:
                profile.syncs += 1
                profile.by_method[name] += 1
            return original(tensor, *args, **kwargs)

        counted.__name__ = name
        return original, counted

    def _pre(self, module, args, kwargs):
        if self._depth == 0:
            self._entered = time.perf_counter()
        self._depth += 1

    def _post(self, module, args, kwargs, output):
        self._depth -= 1
        if self._depth == 0:
            self.model_seconds += time.perf_counter() - self._entered

    def __enter__(self) -> "HostProfile":
        for name in SYNC_METHODS:
            original, counted = self._wrap(name)
            self._saved[name] = original
            setattr(torch.Tensor, name, counted)
        for module in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, with_kwargs=True, always_call=True))
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_seconds += time.perf_counter() - self._start
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
