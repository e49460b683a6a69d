"""Measuring: wall time (one helper, CUDA-synchronised), PSNR/SSIM fidelity, and dense vs GRAT.

Every timing in hasten and its benchmarks goes through :func:`timed` (one call) or
:func:`median_seconds` (the median of repeated calls after warm-up), so a GPU's queued work is
always inside the measured interval; every image fidelity figure through :func:`psnr` and
:func:`ssim`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np
import torch

from ._validation import check_int

if TYPE_CHECKING:
    from .hooks.grat import GratConfig

T = TypeVar("T")

__all__ = ["GratComparison", "compare_grat", "median_seconds", "psnr", "ssim", "timed"]


def _synchronize(device: torch.device | str | None) -> None:
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device | str | None = None) -> tuple[T, float]:
    """``(fn(), wall seconds)``, with CUDA synchronised before and after when ``device`` is a GPU
    (``None``: whichever GPU torch has started, if any).

    Examples
    --------
    >>> value, seconds = timed(lambda: sum(range(1000)))
    >>> value, seconds >= 0
    (499500, True)
    """
    _synchronize(device)
    start = time.perf_counter()
    result = fn()
    _synchronize(device)
    return result, time.perf_counter() - start


def median_seconds(
    fn: Callable[[], Any], device: torch.device | str | None = None, warmup: int = 1, repeats: int = 5
) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` timed calls after ``warmup`` untimed ones.

    Examples
    --------
    >>> median_seconds(lambda: sum(range(1000)), repeats=3) >= 0
    True
    """
    check_int(warmup, "warmup", 0)
    check_int(repeats, "repeats", 1)
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[1] for _ in range(repeats))


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio between two outputs in [0, peak] (inf when identical).

    Examples
    --------
    >>> round(psnr(torch.zeros(4), torch.full((4,), 0.1)), 2)
    20.0
    """
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * float(np.log10(peak**2 / mse))


def ssim(a: torch.Tensor, b: torch.Tensor, keep: Any = None) -> float:
    """Mean structural similarity of images in [0, 1], ``(3, H, W)`` or a batch ``(B, 3, H, W)``
    (scikit-image's, 7-pixel window); with ``keep`` (``(H, W)`` bool), averaged over those pixels only.

    Examples
    --------
    >>> image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> ssim(image, image)
    1.0
    """
    from skimage.metrics import structural_similarity

    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if a.shape != b.shape or a.dim() not in (3, 4):
        raise ValueError(
            f"`a` and `b` must be images (3, H, W) or batches (B, 3, H, W) of one shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    values = []
    for x, y in zip(a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:])):
        _, local = structural_similarity(
            x.permute(1, 2, 0).numpy(),
            y.permute(1, 2, 0).numpy(),
            channel_axis=2,
            data_range=1.0,
            full=True,
            win_size=7,
        )
        local = local.mean(-1)
        values.append(float(local[np.asarray(keep, bool)].mean() if keep is not None else local.mean()))
    return float(np.mean(values))


def _seeded_call(pipe: Any, seed: int, call_kwargs: dict) -> tuple[torch.Tensor, float]:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    output, seconds = timed(
        lambda: pipe(**call_kwargs, generator=generator, output_type="pt", return_dict=False)[0], pipe.device
    )
    return output.float().cpu().clamp(0, 1), seconds


@dataclass
class GratComparison:
    """Dense vs GRAT on the same pipeline call and seed (see :func:`compare_grat`)."""

    dense: Any
    grat: Any
    dense_seconds: float
    grat_seconds: float
    psnr: float
    density: float
    bound: float
    config: GratConfig

    @property
    def speedup(self) -> float:
        return self.dense_seconds / self.grat_seconds

    def summary(self) -> str:
        return (
            f"dense {self.dense_seconds:.3f} s | GRAT-{'X' if self.config.pattern == 'cross' else 'B'} "
            f"{self.grat_seconds:.3f} s | speedup {self.speedup:.2f}x (attention bound "
            f"{self.bound:.2f}x, density {self.density:.1%}) | PSNR {self.psnr:.2f} dB"
        )


def compare_grat(
    pipe, config: GratConfig | None = None, *, seed: int = 0, warmup: bool = True, **call_kwargs
) -> GratComparison:
    """Run ``pipe(**call_kwargs)`` dense and with GRAT, same seed; time both and compare outputs.

    The pipeline is left as it was found (GRAT removed). ``warmup`` runs each variant once before
    timing, so one-off costs (kernel compilation, layout building) are not counted.

    Examples
    --------
    >>> import hasten.tiny
    >>> from hasten import GratConfig
    >>> pipe = hasten.tiny.pipeline("flux")
    >>> result = compare_grat(pipe, GratConfig(group_size=4), prompt="a cat", num_inference_steps=2,
    ...                       height=32, width=32, warmup=False)
    >>> result.grat.shape == result.dense.shape
    True
    """
    from .hooks.grat import GratConfig, apply_grat, grat_state, remove_grat

    config = config or GratConfig()
    remove_grat(pipe)
    if warmup:
        _seeded_call(pipe, seed, call_kwargs)
    dense, dense_seconds = _seeded_call(pipe, seed, call_kwargs)
    resolved = apply_grat(pipe, config)
    try:
        if warmup:
            _seeded_call(pipe, seed, call_kwargs)
        sparse, grat_seconds = _seeded_call(pipe, seed, call_kwargs)
        layout = max(grat_state(pipe).layouts.values(), key=lambda layout: layout.seq_len)
    finally:
        remove_grat(pipe)
    return GratComparison(
        dense, sparse, dense_seconds, grat_seconds, psnr(dense, sparse), layout.density, layout.bound, resolved
    )
