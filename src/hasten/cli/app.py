"""``hasten app NAME``: launch one of the Gradio demos in ``apps/`` (``apps/NAME_app.py``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
APPS_DIR = REPO_ROOT / "apps"


def available() -> tuple[str, ...]:
    """The app names found in ``apps/`` (``grat`` for ``apps/grat_app.py``, ...)."""
    return tuple(sorted(path.name[: -len("_app.py")] for path in APPS_DIR.glob("*_app.py")))


def register(commands) -> None:
    app = commands.add_parser("app", help="launch a Gradio demo app", description="Launch a Gradio demo app.")
    app.add_argument("name", choices=available(), help="which app")
    app.add_argument("app_args", nargs=argparse.REMAINDER, help="arguments for the app (see its --help)")
    app.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = APPS_DIR / f"{args.name}_app.py"
    if not path.exists():
        raise ValueError(f"app {args.name!r} not found at {path} (the apps ship with the source checkout)")
    spec = importlib.util.spec_from_file_location(f"hasten_app_{args.name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(REPO_ROOT))
    spec.loader.exec_module(module)
    return module.main(args.app_args) or 0
