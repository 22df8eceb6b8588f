"""The typer application shared by every ``himap`` sub-command module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="himap",
    help="Prune image tokens inside multimodal LLMs, measure the gain, and analyse why it works.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """himap: prune image tokens inside multimodal LLMs (HiMAP, FastV, VTW, VisiPruner)."""
