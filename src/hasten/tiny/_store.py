"""Where tiny models live on disk, and how they get there: built once, saved atomically, seeded.

Every tiny model family (diffusers pipelines, transformers VLMs, autoregressive image models)
goes through :func:`saved_folder`, so all of them share one build-and-save rule: a missing folder
is built in a temporary folder next to its final place and moved there with one ``os.replace``.
Concurrent processes or an interrupted build never leave a half-written folder behind.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Iterator

import torch

__all__ = ["home", "saved_folder", "seeded"]


def home() -> pathlib.Path:
    """hasten's cache folder: ``$HASTEN_HOME``, or ``~/.cache/hasten`` when unset or empty.

    Examples
    --------
    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"HASTEN_HOME": "/tmp/hasten-doc"}):
    ...     print(home())
    /tmp/hasten-doc
    """
    value = os.environ.get("HASTEN_HOME")
    return pathlib.Path(value).expanduser() if value else pathlib.Path.home() / ".cache" / "hasten"


def saved_folder(name: str, marker: str, save: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """``home() / "tiny" / name``, calling ``save(tmp_folder)`` first if ``marker`` is missing in it.

    Parameters
    ----------
    name : str
        Folder name under ``home() / "tiny"``, versioned (e.g. ``"flux-v1"``) so that a changed
        build never reuses a stale folder.
    marker : str
        A file that exists in the folder once saving finished (e.g. ``"model_index.json"``).
    save : callable
        Builds the model and writes it into the temporary folder it is given.

    Returns
    -------
    pathlib.Path
        The finished folder (``0o755``).
    """
    folder = home() / "tiny" / name
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        save(tmp)
        try:
            os.replace(tmp, folder)
        except OSError as error:
            # Another process got there first (a non-empty folder cannot be replaced): use theirs.
            if not (folder / marker).is_file():
                raise OSError(f"{folder} exists but holds no saved model; remove it and retry") from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch for one component, in float32, leaving the caller's RNG state and default dtype alone."""
    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)
