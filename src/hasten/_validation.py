"""Argument checks shared by the library: one rule, one wording, so every error names its argument.

``bool`` is never accepted as a number (``True`` is an ``int`` to Python, never a step count to a user).
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_int", "check_number", "check_positive_int"]


def check_int(value: Any, name: str, minimum: int = 1, maximum: int | None = None, why: str = "") -> int:
    """``value`` if it is an int (not a bool) in ``[minimum, maximum]``, else a ``ValueError`` naming ``name``
    (``why``, if given, is added in brackets: what the bound is for).

    Examples
    --------
    >>> check_int(4, "steps")
    4
    >>> check_int(0, "residual", minimum=0)
    0
    >>> check_int(9, "max_objects", maximum=8)
    Traceback (most recent call last):
    ...
    ValueError: `max_objects` must be an int in [1, 8], got 9
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        if maximum is not None:
            rule = f"an int in [{minimum}, {maximum}]"
        else:
            rule = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"`{name}` must be {rule}{f' ({why})' if why else ''}, got {value!r}")
    return value


def check_positive_int(value: Any, name: str) -> int:
    """``value`` if it is an int >= 1 (not a bool), else a ``ValueError`` naming ``name``.

    Examples
    --------
    >>> check_positive_int(0, "steps")
    Traceback (most recent call last):
    ...
    ValueError: `steps` must be a positive int, got 0
    """
    return check_int(value, name, 1)


def check_number(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
    why: str = "",
) -> float:
    """``value`` if it is a real number (int or float, not a bool) within the bounds, else a
    ``ValueError`` naming ``name``; ``open_low`` / ``open_high`` exclude the bound itself.

    Examples
    --------
    >>> check_number(0.5, "budget", 0, 1, open_low=True)
    0.5
    >>> check_number(0, "budget", 0, 1, open_low=True)
    Traceback (most recent call last):
    ...
    ValueError: `budget` must be a number in (0, 1], got 0
    >>> check_number(-1.0, "threshold", 0)
    Traceback (most recent call last):
    ...
    ValueError: `threshold` must be a number >= 0, got -1.0
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    inside = (
        number
        and value == value
        and (low is None or (value > low if open_low else value >= low))
        and (high is None or (value < high if open_high else value <= high))
    )
    if not inside:
        if low is not None and high is not None:
            rule = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        elif low is not None:
            rule = f"{'>' if open_low else '>='} {low}"
        elif high is not None:
            rule = f"{'<' if open_high else '<='} {high}"
        else:
            rule = "a real number"
        rule = rule if rule == "a real number" else f"a number {rule}"
        raise ValueError(f"`{name}` must be {rule}{f' ({why})' if why else ''}, got {value!r}")
    return value
