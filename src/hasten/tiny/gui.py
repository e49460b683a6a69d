"""Synthetic GUI-agent trajectories: PIL-rendered screenshots with small changes between steps.

Offline test and benchmark data for GUI-KV. A trajectory starts from a desktop with one
application window (title bar, menu bar, buttons, a text field, a list) and applies one action
per step: a click opens or closes a menu, text is typed into the field, a list row is
selected, a checkbox is toggled. Most of each screenshot stays the same from step to step, which
is exactly the redundancy GUI-KV removes from the KV cache.

Examples
--------
>>> shots, actions = trajectory(steps=3, size=(96, 64), seed=0)
>>> len(shots), shots[0].size, len(actions)
(3, (96, 64), 2)
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from .._validation import check_positive_int

__all__ = ["GUIState", "render", "states", "trajectory"]

_WORDS = ("open", "file", "save", "search", "report", "agent", "click", "hello", "submit", "invoice")


@dataclass
class GUIState:
    """What is on screen: the widgets an action can change."""

    typed: str = ""
    menu_open: bool = False
    selected_row: int = -1
    checked: bool = False
    title: str = "Documents"
    rows: list[str] = field(default_factory=lambda: ["notes.txt", "budget.xls", "photo.png", "todo.md"])


def render(state: GUIState, size: tuple[int, int] = (224, 160)) -> Image.Image:
    """One screenshot of ``state`` at ``size`` (width, height)."""
    width, height = size
    image = Image.new("RGB", size, (40, 90, 140))  # desktop
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = width // 16, height // 12, width - width // 16, height - height // 8
    draw.rectangle([left, top, right, bottom], fill=(236, 236, 236), outline=(90, 90, 90))
    bar = max(6, height // 14)
    draw.rectangle([left, top, right, top + bar], fill=(60, 60, 160))
    draw.text((left + 3, top), state.title, fill=(255, 255, 255))
    menu_y = top + bar
    draw.rectangle([left, menu_y, right, menu_y + bar], fill=(214, 214, 214))
    for index, name in enumerate(("File", "Edit", "View")):
        draw.text((left + 3 + index * (width // 7), menu_y), name, fill=(0, 0, 0))
    field_y = menu_y + 2 * bar
    draw.rectangle([left + 4, field_y, right - width // 4, field_y + bar], fill=(255, 255, 255), outline=(0, 0, 0))
    draw.text((left + 6, field_y), state.typed[-18:], fill=(0, 0, 0))
    button_x = right - width // 4 + 4
    draw.rectangle([button_x, field_y, right - 4, field_y + bar], fill=(80, 160, 80), outline=(0, 0, 0))
    draw.text((button_x + 2, field_y), "Go", fill=(255, 255, 255))
    list_y = field_y + 2 * bar
    for index, row in enumerate(state.rows):
        y = list_y + index * bar
        if y + bar > bottom - bar:
            break
        fill = (170, 200, 255) if index == state.selected_row else (250, 250, 250)
        draw.rectangle([left + 4, y, right - width // 3, y + bar - 1], fill=fill)
        draw.text((left + 6, y), row, fill=(0, 0, 0))
    box = [right - width // 4, list_y, right - width // 4 + bar - 2, list_y + bar - 2]
    draw.rectangle(box, fill=(255, 255, 255), outline=(0, 0, 0))
    if state.checked:
        draw.line([box[0], box[1], box[2], box[3]], fill=(0, 0, 0), width=2)
        draw.line([box[0], box[3], box[2], box[1]], fill=(0, 0, 0), width=2)
    if state.menu_open:
        menu = [left + 2, menu_y + bar, left + width // 4, menu_y + 5 * bar]
        draw.rectangle(menu, fill=(250, 250, 250), outline=(0, 0, 0))
        for index, item in enumerate(("New", "Open", "Save", "Quit")):
            draw.text((menu[0] + 3, menu[1] + index * bar), item, fill=(0, 0, 0))
    return image


def _act(state: GUIState, rng: random.Random) -> str:
    action = rng.choice(("type", "menu", "select", "check"))
    if action == "type":
        word = rng.choice(_WORDS)
        state.typed += word + " "
        return f'type "{word}"'
    if action == "menu":
        state.menu_open = not state.menu_open
        return "click File" if state.menu_open else "close menu"
    if action == "select":
        state.selected_row = rng.randrange(len(state.rows))
        return f"select {state.rows[state.selected_row]}"
    state.checked = not state.checked
    return "toggle checkbox"


def _episode(steps: int, seed: int) -> tuple[list[GUIState], list[str]]:
    check_positive_int(steps, "steps")
    rng = random.Random(seed)
    state = GUIState()
    seen, actions = [copy.deepcopy(state)], []
    for _ in range(steps - 1):
        actions.append(_act(state, rng))
        seen.append(copy.deepcopy(state))
    return seen, actions


def states(steps: int = 5, seed: int = 0) -> list[GUIState]:
    """The ``steps`` screen states of the episode :func:`trajectory` renders for ``seed``
    (ground truth for questions about any screenshot).

    Examples
    --------
    >>> [s.menu_open for s in states(3, seed=0)] == [s.menu_open for s in states(3, seed=0)]
    True
    """
    return _episode(steps, seed)[0]


def trajectory(
    steps: int = 5, size: tuple[int, int] = (224, 160), seed: int = 0
) -> tuple[list[Image.Image], list[str]]:
    """``steps`` screenshots of one agent episode and the ``steps - 1`` actions between them."""
    seen, actions = _episode(steps, seed)
    return [render(state, size) for state in seen], actions
