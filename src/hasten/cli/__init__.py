"""The ``hasten`` command.

Each subcommand lives in its own module of this package and exposes
``register(commands)``, which adds its parser to the ``argparse`` sub-parsers and sets
``run=<function(args) -> int>`` as its default. Modules are found automatically, so a new
command is one new file. Heavy imports (diffusers pipelines, transformers models) happen
inside ``run``, so ``hasten --help`` stays fast.

    hasten generate [--model tiny-flux] [--prompt ...] [--grat cross] [--compare] ...
    hasten app grat [--model ...] [--port ...]
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hasten", description="Training-free acceleration for diffusers pipelines and transformers VLMs."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``hasten`` command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except ValueError as error:
        parser.exit(2, f"hasten: error: {error}\n")
