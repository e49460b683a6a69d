"""A small LRU cache keyed by tensors' identity in memory (data_ptr, shape, ...).

Each entry holds its key tensors alive, so their memory -- and so the data_ptrs in the key --
cannot be reused by other tensors while the entry exists; a stale hit is impossible.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch


class TensorKeyedCache:
    """``get_or_build(tensors, extra, build)``: ``build()``'s value for these tensors and extra key."""

    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple, tuple[tuple, Any]] = OrderedDict()

    def get_or_build(self, tensors: tuple[torch.Tensor | None, ...], extra: tuple, build: Callable[[], Any]) -> Any:
        key = tuple(None if t is None else (t.data_ptr(), tuple(t.shape), str(t.device)) for t in tensors) + extra
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry[1]
        value = build()
        self._entries[key] = (tensors, value)
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return value
