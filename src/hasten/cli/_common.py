"""Checks the ``hasten`` subcommands run before computing anything: output locations.

Each raises a ``ValueError`` whose message names the option and what it accepts; the command
line turns it into one ``hasten: error: ...`` line and exit code 2. Nothing is created on disk
by a check (missing folders are created only when the result is saved).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["check_output_file", "check_output_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4", ".avi")


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if os.path.lexists(parent):
            return parent
    return Path(path.anchor or ".")


def _check_writable_folder(folder: Path, argument: str, given: Path) -> None:
    """``folder`` exists; it must be a folder in which this process can create a file."""
    if not folder.is_dir():
        raise ValueError(f"{argument} {given}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(
            f"{argument} {given}: cannot write in {folder} ({error.strerror or error}); choose a writable location"
        ) from None


def check_output_file(
    path: str | os.PathLike, argument: str = "--out", suffixes: tuple[str, ...] = IMAGE_SUFFIXES + VIDEO_SUFFIXES
) -> Path:
    """``path`` if a file can be written there: not a folder, its folder a (creatable) folder we
    may write in, its suffix one of ``suffixes``.

    Examples
    --------
    >>> check_output_file("/", suffixes=(".png",))
    Traceback (most recent call last):
    ...
    ValueError: --out / is a folder; give a file name inside it, e.g. --out /out.png
    >>> check_output_file("o.txt", suffixes=(".png", ".jpg"))
    Traceback (most recent call last):
    ...
    ValueError: --out o.txt: unsupported file type '.txt'; use .png or .jpg
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(
            f"{argument} {path} is a folder; give a file name inside it, e.g. {argument} {path / ('out' + suffixes[0])}"
        )
    if path.suffix.lower() not in suffixes:
        kind = f"unsupported file type {path.suffix!r}" if path.suffix else "no file type"
        choices = ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
        raise ValueError(f"{argument} {path}: {kind}; use {choices}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{argument} {path}: the file exists and cannot be overwritten (no write permission)")
    _check_writable_folder(_nearest_existing(path.parent if str(path.parent) else Path(".")), argument, path)
    return path


def check_output_folder(path: str | os.PathLike, argument: str = "--output") -> Path:
    """``path`` if it is, or can be created as, a folder we may write in.

    Examples
    --------
    >>> check_output_folder("/dev/null")
    Traceback (most recent call last):
    ...
    ValueError: --output /dev/null is a file; give a folder (it is created if missing)
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{argument} {path} is a file; give a folder (it is created if missing)")
    _check_writable_folder(_nearest_existing(path), argument, path)
    return path
