"""What every benchmark shares: median timing in ms (:mod:`hasten.measure`), the machine line, JSON rows."""

from __future__ import annotations

import json
import platform
import time
from typing import Callable

import torch

from hasten.measure import median_seconds


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls
    (:func:`hasten.measure.median_seconds`, CUDA synced)."""
    return 1000 * median_seconds(fn, device, warmup=warmup, repeats=repeats)


def machine(device: torch.device) -> str:
    """One line naming the machine, torch version and date, for the head of a results table."""
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
    )
    return f"{where} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}"


def print_json(rows: list[dict]) -> None:
    for row in rows:
        print(json.dumps(row))


def build_model(model_class: type, config, device, dtype: torch.dtype):
    """``model_class(config)`` in eval mode, created directly on ``device`` in ``dtype`` (random
    weights; a full-size architecture never materialises in float32 on the host)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return model_class(config).eval()
    finally:
        torch.set_default_dtype(default)
