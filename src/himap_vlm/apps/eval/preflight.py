"""Checks the commands (``himap eval``, ``himap demo``, ``himap calibrate``) run before the expensive part.

Each raises :class:`PreflightError` (a ``ValueError``) with a one-line message, so a command can
print it and exit with status 2 instead of a traceback from torch or transformers. What can be
checked from files alone (the output folder, the model's depth from its ``config.json``, method
specs against that depth) is checked before the model is loaded; what needs the model (its
``image_token_id``, through the engine's own check) right after.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "PreflightError",
    "fail",
    "check_image_tokens",
    "check_output_dir",
    "model_config",
    "model_depth",
    "one_line",
    "resolve_model_path",
]


class PreflightError(ValueError):
    """Bad input found before (or right after) loading the model; the message is one line."""


def one_line(message: object) -> str:
    """``message`` on one line: whitespace runs (newlines included) become one space, and a prefix
    said twice (``"fastv: fastv: k=9 ..."``, a method's message wrapped by the spec) once."""
    text = " ".join(str(message).split())
    head, sep, rest = text.partition(": ")
    if sep and head and " " not in head and rest.startswith(head + ": "):
        text = rest
    return text


def fail(message: object) -> None:
    """For commands: print ``error: <message>`` on one line (stderr) and exit with status 2."""
    import typer

    typer.secho(f"error: {one_line(message)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def check_output_dir(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Check that ``path`` is, or can be created as, a folder this process can write in.

    Nothing is created: the nearest existing ancestor must be a folder in which a file can be
    created (probed with a temporary file, removed at once).

    Raises
    ------
    PreflightError
        When ``path`` is a regular file, lies below one, or cannot be written.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise PreflightError(f"{what} {str(out)!r} is a file, not a folder")
    probe = out
    while not probe.exists():
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if probe.exists() and not probe.is_dir():
        raise PreflightError(f"{what} {str(out)!r} cannot be created: {str(probe)!r} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".himap-write-test-", dir=probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise PreflightError(
            f"{what} {str(out)!r} cannot be written: no file can be created in {str(probe)!r} ({reason})"
        ) from None
    os.close(fd)
    os.unlink(tmp)
    return out


def resolve_model_path(model: str | os.PathLike[str]) -> str:
    """A named model (``tiny-llava``, ``smol-llava``) as its local folder, else ``model`` unchanged.

    Raises
    ------
    PreflightError
        When a named model is not available in this build.
    """
    from himap_vlm.models import resolve_model

    try:
        return resolve_model(model)
    except (FileNotFoundError, ImportError, ValueError) as exc:  # ImportError: smol-llava's base model missing
        raise PreflightError(one_line(exc)) from None


def model_config(model: str) -> Any:
    """The model's configuration (``config.json`` only: no weights are read).

    Raises
    ------
    PreflightError
        For a local path that does not exist or a folder without a readable config.
    """
    from transformers import AutoConfig

    local = Path(model).expanduser()
    if not local.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise PreflightError(
            f"model path {model!r} does not exist (pass a local directory, a named model such as tiny-llava, "
            "or a hub id like org/name)"
        )
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError, KeyError) as exc:
        raise PreflightError(f"cannot read a model config from {model!r}: {one_line(exc)}") from None


def model_depth(config: Any) -> int | None:
    """Decoder layers of the language model a (multimodal) config describes (``None`` if it says none)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    return int(layers) if isinstance(layers, int) and layers > 0 else None


def check_image_tokens(model: Any, processor: Any = None) -> int:
    """The model's image token id, checked: the engine's own check, then the processor's token.

    Returns
    -------
    int
        ``config.image_token_id``.

    Raises
    ------
    PreflightError
        When ``config.image_token_id`` is not a token of the model's vocabulary (the engine's
        ``ValueError``, on one line), or is not the id the processor writes for each image.
    """
    from himap_vlm.apps.prompting import image_token
    from himap_vlm.core.methods import get_method

    try:
        run = get_method("dense")()(model)  # the engine checks config.image_token_id when it binds
    except ValueError as exc:
        raise PreflightError(one_line(exc)) from None
    token_id = int(run.image_token_id)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "convert_tokens_to_ids"):
        token = image_token(processor)
        try:
            written = tokenizer.convert_tokens_to_ids(token)
        except (KeyError, TypeError, ValueError):  # pragma: no cover - exotic tokenizers
            written = None
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(written, int) and written != unk and written != token_id:
            raise PreflightError(
                f"{type(model).__name__}: config.image_token_id={token_id} but the processor writes {token!r} "
                f"(id {written}) for each image token, so image tokens cannot be found in input_ids. Set "
                f"model.config.image_token_id to {written}."
            )
    return token_id
