"""What every benchmark shares: median timing with warm-up, the machine line, JSON rows."""

from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Median wall milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls (CUDA synced)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def machine(device: torch.device) -> str:
    """One line naming the machine, torch version and date, for the head of a results table."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
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
