"""User-facing pipelines: editing (ConsistEdit, masked K/V, VoxHammer), LatentWarp video translation and SJD.

Names load lazily from their own modules, so importing one pipeline never imports the others'
dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ConsistEditPipeline": ".consistedit",
    "LatentWarpPipeline": ".latentwarp",
    "MaskedKVEditPipeline": ".masked_kv",
    "VoxelEditPipeline": ".voxhammer",
    "SJDConfig": ".sjd",
    "SJDPipeline": ".sjd",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
