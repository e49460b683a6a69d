"""``hasten app NAME``: launch one of the Gradio demos shipped in :mod:`hasten.apps` (``hasten app --list``)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

from .. import apps


def available() -> tuple[str, ...]:
    """The app names in :mod:`hasten.apps` (``grat`` for ``hasten/apps/grat_app.py``, ...).

    Examples
    --------
    >>> "grat" in available()
    True
    """
    return tuple(
        sorted(
            module.name[: -len("_app")]
            for module in pkgutil.iter_modules(apps.__path__)
            if module.name.endswith("_app")
        )
    )


def register(commands) -> None:
    app = commands.add_parser("app", help="launch a Gradio demo app", description="Launch a Gradio demo app.")
    app.add_argument("name", nargs="?", choices=available(), help="which app")
    app.add_argument("--list", action="store_true", help="print the app names and exit")
    app.add_argument("app_args", nargs=argparse.REMAINDER, help="arguments for the app (see its --help)")
    app.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(available()))
        return 0
    if args.name is None:
        raise ValueError(f"name an app: one of {', '.join(available())} (`hasten app --list`)")
    module = importlib.import_module(f"{apps.__name__}.{args.name}_app")
    return module.main(args.app_args) or 0
