"""What every benchmark shares: median timing in ms (:mod:`hasten.measure`), the machine line, JSON rows,
and the fidelity benchmarks' dense-vs-GRAT variant runs (:func:`grat_variants`)."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

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


class AttentionTimer(TorchFunctionMode):
    """Accumulates the wall time of every ``scaled_dot_product_attention`` call (CPU: no sync)."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds += time.perf_counter() - start
        return out


GRAT_VARIANTS = (
    ("dense", None),
    ("GRAT-X", {"pattern": "cross"}),
    ("GRAT-B", {"pattern": "block", "window": 1}),
    ("GRAT-X dense_steps", {"pattern": "cross", "dense_steps": -1}),
    ("GRAT-B dense_steps", {"pattern": "block", "window": 1, "dense_steps": -1}),
)
"""The fidelity benchmarks' variants; ``dense_steps=-1`` stands for the benchmark's ``--dense-steps``."""

PATTERN_CHOICES = ("cross", "block")
"""``--patterns`` of the fidelity benchmarks: the GRAT variants to run beside dense (default both)."""


def patterns_arg(text: str) -> tuple[str, ...]:
    """Parse ``--patterns`` ("cross,block"): a clear error naming the argument on an unknown pattern."""
    import argparse

    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names or any(name not in PATTERN_CHOICES for name in names):
        raise argparse.ArgumentTypeError(
            f"--patterns takes a comma-separated subset of {PATTERN_CHOICES}; got {text!r}"
        )
    return names


@dataclass
class VariantRun:
    """One variant of :func:`grat_variants`: its outputs, the dense outputs from the same inputs, and its speed."""

    name: str
    outputs: torch.Tensor
    dense: torch.Tensor
    seconds: float
    speedup: float
    bound: float
    amdahl: float
    share: float

    @property
    def is_dense(self) -> bool:
        return self.outputs is self.dense

    def speed_fields(self) -> dict:
        """The JSON row's timing fields."""
        return {
            "seconds": round(self.seconds, 2),
            "speedup": round(self.speedup, 3),
            "attention_bound": round(self.bound, 2),
            "amdahl_bound": round(self.amdahl, 3),
            "attention_share": round(self.share, 3),
        }

    def line(self, label: str, tokens: int, accuracy: str, psnr: float | None, ssim: float | None) -> str:
        """The table row: label, tokens, variant, accuracy, PSNR/SSIM against dense, time, speedup, bounds."""
        psnr_text = "-" if psnr is None else f"{psnr:.1f}"
        ssim_text = "-" if ssim is None else f"{ssim:.3f}"
        return (
            f"{label:>9} {tokens:>6} {self.name:<20} {accuracy:>6} {psnr_text:>6} {ssim_text:>6} "
            f"{self.seconds:>8.2f} {self.speedup:>7.2f}x {self.bound:>6.2f} {self.amdahl:>6.2f}x"
        )


def grat_variants(
    pipe,
    generate: Callable[[bool], tuple[torch.Tensor, float]],
    group,
    steps: int,
    dense_steps: int,
    patterns: tuple[str, ...] = ("cross", "block"),
) -> Iterator[VariantRun]:
    """Dense and each of :data:`GRAT_VARIANTS` (backend "auto") whose pattern is in ``patterns``, the
    same inputs each time.

    ``generate(warmup)`` runs the pipeline (a short call when ``warmup``) and returns (outputs,
    seconds). The dense call runs under :class:`AttentionTimer`: attention's share ``a`` of it gives
    each variant's Amdahl bound ``1 / ((1 - a) + a * work)``, ``work`` = the dense steps' share + the
    sparse steps' share / the attention bound (1/density of the largest layout, padding counted).
    """
    from hasten.hooks.grat import GratConfig, apply_grat, grat_state, remove_grat

    remove_grat(pipe)
    generate(True)
    timer = AttentionTimer()
    with timer:
        dense, dense_seconds = generate(False)
    share = timer.seconds / dense_seconds
    for name, settings in GRAT_VARIANTS:
        if settings is not None and settings["pattern"] not in patterns:
            continue
        if settings is None:
            outputs, seconds, bound, sparse = dense, dense_seconds, 1.0, 0.0
        else:
            settings = dict(settings)
            if settings.get("dense_steps") == -1:
                settings["dense_steps"] = dense_steps
            apply_grat(pipe, GratConfig(group_size=group, **settings))
            try:
                generate(True)  # layouts built
                outputs, seconds = generate(False)
                bound = max(grat_state(pipe).layouts.values(), key=lambda layout: layout.seq_len).bound
            finally:
                remove_grat(pipe)
            sparse = max(0, steps - settings.get("dense_steps", 0)) / steps
        work = (1 - sparse) + sparse / bound
        yield VariantRun(
            name, outputs, dense, seconds, dense_seconds / seconds, bound, 1.0 / ((1 - share) + share * work), share
        )
