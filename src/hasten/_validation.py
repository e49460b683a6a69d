"""Argument checks shared by the library: one rule, one wording, so every error names its argument."""

from __future__ import annotations

from typing import Any

__all__ = ["check_positive_int"]


def check_positive_int(value: Any, name: str) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ``ValueError`` naming ``name``.

    Examples
    --------
    >>> check_positive_int(4, "steps")
    4
    >>> check_positive_int(0, "steps")
    Traceback (most recent call last):
    ...
    ValueError: `steps` must be a positive int, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value
