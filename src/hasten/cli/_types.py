"""Argument types shared by the ``hasten`` subcommands (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse
import math


def size(text: str) -> tuple[int, ...]:
    """``"16"``, ``"16x16"`` or ``"4x8x8"`` (also comma-separated) -> a tuple of positive ints."""
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N, HxW or TxHxW, got {text!r}") from None
    if not values or any(v <= 0 for v in values) or len(values) > 3:
        raise argparse.ArgumentTypeError(f"expected positive N, HxW or TxHxW, got {text!r}")
    return values


def positive(text: str) -> int:
    """A positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def fraction(text: str) -> float:
    """A number in (0, 1], e.g. a budget or a ratio."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def finite(text: str) -> float:
    """A finite number (not nan, not inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value
