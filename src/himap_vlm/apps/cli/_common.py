"""Helpers shared by CLI commands: loading models offline-first and building methods from options."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from himap_vlm.apps.prompting import build_prompt  # noqa: F401  (re-exported for CLI modules)


def fail(message: str) -> None:
    """Print a clear error and exit with status 2 (no traceback)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def load_model(path_or_id: str, attn_implementation: str | None = None, dtype: str = "float32"):
    """Load a supported model and its processor with ``from_pretrained``.

    ``trust_remote_code`` is never enabled. A local path is loaded offline; a hub id needs network.

    Returns
    -------
    (model, processor)
    """
    import torch
    from transformers import AutoConfig, AutoProcessor

    from himap_vlm.core.families import resolve_family, supported_classes

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        fail(f"--dtype must be one of float32, bfloat16, float16; got {dtype!r}")
    local = Path(path_or_id)
    if not local.exists() and (path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1):
        fail(f"model path {path_or_id!r} does not exist (pass a local directory or a hub id like org/name)")
    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except OSError as exc:
        fail(f"cannot read a model config from {path_or_id!r}: {exc}")
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    class_name = None
    for arch in getattr(config, "architectures", None) or []:
        if arch in supported_classes():
            class_name = arch
    if class_name is None:
        fail(
            f"{path_or_id!r} is a {', '.join(getattr(config, 'architectures', None) or [type(config).__name__])} "
            f"model; himap supports: {', '.join(supported_classes())}"
        )
    cls = getattr(transformers, class_name)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = cls.from_pretrained(path_or_id, **kwargs)
    model.eval()
    resolve_family(model)
    processor = AutoProcessor.from_pretrained(path_or_id)
    return model, processor


def parse_method_args(pairs: Sequence[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values are read as int, float, bool or string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            fail(f"--method-arg expects KEY=VALUE; got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        out[key] = _coerce(value.strip())
    return out


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return value


def build_method(name: str, options: dict[str, Any], explicit_none: frozenset[str] = frozenset()):
    """Instantiate method ``name`` from CLI options, refusing options it does not take.

    Options whose value is ``None`` are treated as not given, except those named in
    ``explicit_none`` (``--method-arg KEY=None``).
    """
    from himap_vlm.core.methods import get_method

    try:
        cls = get_method(name)
    except ValueError as exc:
        fail(str(exc))
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    given = {k: v for k, v in options.items() if v is not None or k in explicit_none}
    unknown = sorted(set(given) - accepted)
    if unknown:
        fail(
            f"method {name!r} does not take {', '.join('--' + u.replace('_', '-') for u in unknown)}; "
            f"its parameters are: {', '.join(sorted(accepted)) or '(none)'}"
        )
    try:
        return cls(**given)
    except (TypeError, ValueError) as exc:
        fail(f"{name}: {exc}")


def summarize_counts(counts: Sequence[int]) -> str:
    """Compress per-layer counts: ``[576, 576, 288, 288]`` -> ``"L0-1: 576 · L2-3: 288"``."""
    parts = []
    start = 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or counts[i] != counts[start]:
            span = f"L{start}" if i - 1 == start else f"L{start}-{i - 1}"
            parts.append(f"{span}: {counts[start]}")
            start = i
    return " · ".join(parts)


def load_images(paths: Sequence[Path]) -> list:
    """Open image files as RGB PIL images, with a clear error for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for p in paths:
        if not Path(p).is_file():
            fail(f"image file not found: {p}")
        try:
            images.append(Image.open(p).convert("RGB"))
        except (UnidentifiedImageError, OSError) as exc:
            fail(f"cannot read image {p}: {exc}")
    return images
