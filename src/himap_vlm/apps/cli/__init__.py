"""Command-line interface: ``himap <command>``.

Every module in this package (other than ``_app``) registers its commands on the shared
:data:`himap_vlm.apps.cli._app.app` when imported; this file imports them all, so a new command is a new
module and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from himap_vlm.apps.cli._app import app


def _load_commands() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def main() -> None:
    """Entry point of the ``himap`` console script."""
    _load_commands()
    app()


__all__ = ["app", "main"]
