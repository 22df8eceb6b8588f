"""Helpers shared by CLI commands: one-line errors, loading models, parsing method specs.

Method configurations are parsed by :mod:`himap_vlm.core.methods.spec` and nothing else: a
command passes the text of ``--method`` / ``--methods`` (and ``--method-arg KEY=VALUE`` pairs,
appended to the spec) together with the model's depth, so bare names take the method's
:meth:`~himap_vlm.core.methods.base.PruningMethod.defaults_for` that depth.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from himap_vlm.apps.prompting import build_prompt  # noqa: F401  (re-exported for CLI modules)

_PAIR = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*([^,()=\s][^,()=]*?)\s*$")
_DTYPES = ("float32", "bfloat16", "float16")


def fail(message: str) -> None:
    """Print ``error: message`` on one line and exit with status 2 (no traceback)."""
    typer.secho(f"error: {' '.join(str(message).split())}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def resolve_model_path(path_or_name: str) -> str:
    """``--model``: a named model (``tiny-llava``, ``smol-llava``), a local directory or a hub id.

    Exits with status 2 when a named model is unavailable or a path does not exist.
    """
    from himap_vlm.models import NAMED_MODELS, resolve_model

    try:
        resolved = resolve_model(path_or_name)
    except (FileNotFoundError, ImportError, ValueError) as exc:  # ImportError: smol-llava's base model missing
        fail(f"--model {path_or_name}: {exc}")
    if not Path(resolved).exists() and (resolved.startswith((".", "/", "~")) or resolved.count("/") != 1):
        fail(
            f"model path {path_or_name!r} does not exist: pass a local model directory, a hub id like org/name, "
            f"or a named model ({', '.join(NAMED_MODELS)})"
        )
    return resolved


def model_config(path_or_name: str) -> tuple[str, Any]:
    """The resolved path of ``--model`` and its transformers config (no weights loaded)."""
    from transformers import AutoConfig

    path = resolve_model_path(path_or_name)
    try:
        return path, AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        fail(f"cannot read a model config from {path_or_name!r}: {exc}")
        raise  # unreachable: fail() exits


def num_layers_of(config: Any) -> int:
    """Decoder layers of a (multimodal) model's language model, from its config."""
    from himap_vlm.apps.flops import TextDims

    try:
        return TextDims.from_config(config).num_layers
    except ValueError as exc:
        fail(str(exc))
        raise  # unreachable


def load_model(path_or_id: str, attn_implementation: str | None = None, dtype: str = "float32"):
    """Load a supported model and its processor with ``from_pretrained``.

    ``path_or_id`` may be a named model (``tiny-llava``, ``smol-llava``; see
    :func:`himap_vlm.models.resolve_model`), a local directory or a hub id (which needs network).
    ``trust_remote_code`` is never enabled.

    Returns
    -------
    (model, processor)
    """
    import torch
    from transformers import AutoProcessor

    from himap_vlm.core.families import resolve_family, supported_classes

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        fail(f"--dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")
    path, config = model_config(path_or_id)
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
    try:
        model = cls.from_pretrained(path, **kwargs)
    except (ImportError, ValueError) as exc:  # e.g. an attention kernel that is not installed
        fail(f"cannot load {path_or_id!r}: {exc}")
    model.eval()
    resolve_family(model)
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


# ---------------------------------------------------------------------------------------------
# method specs (parsed by himap_vlm.core.methods.spec only)
# ---------------------------------------------------------------------------------------------
def _one_line(exc: Exception) -> str:
    """A spec error as one line, without the method name repeated (``fastv: fastv: k=9 ...``)."""
    text = " ".join(str(exc).split())
    head, sep, rest = text.partition(": ")
    if sep and rest.startswith(head + ": "):
        text = rest
    return text


def with_method_args(method: str, method_args: Sequence[str]) -> str:
    """``method`` with ``--method-arg KEY=VALUE`` pairs appended inside its parentheses.

    ``with_method_args("himap(k1=2)", ["k2=6"])`` -> ``"himap(k1=2,k2=6)"``; the result is parsed
    by the one spec parser like any ``--method`` (a key given twice is refused there). Exits with
    status 2 for a pair that is not ``KEY=VALUE``.
    """
    pairs = []
    for item in method_args:
        m = _PAIR.match(item)
        if m is None:
            fail(f"--method-arg expects KEY=VALUE (e.g. --method-arg k2=4); got {item!r}")
        pairs.append(f"{m.group(1)}={m.group(2)}")
    text = method.strip()
    if not pairs:
        return text
    if text.endswith(")") and "(" in text:
        head, inner = text[: text.index("(")], text[text.index("(") + 1 : -1].strip()
        return f"{head}({inner + ',' if inner else ''}{','.join(pairs)})"
    return f"{text}({','.join(pairs)})"


def method_spec(method: str, method_args: Sequence[str] = (), num_layers: int | None = None):
    """Parse ``--method`` (plus ``--method-arg`` pairs) for a model of ``num_layers`` layers.

    Returns
    -------
    MethodSpec
        Bare names take ``defaults_for(num_layers)``; the configuration is checked against the
        depth. Exits with status 2 and a one-line reason for any error.
    """
    from himap_vlm.core.methods.spec import MethodSpec, MethodSpecError

    text = with_method_args(method, method_args)
    try:
        return MethodSpec.parse(text, num_layers=num_layers)
    except MethodSpecError as exc:
        fail(f"--method {text}: {_one_line(exc)}")
        raise  # unreachable


def method_list(methods: str, num_layers: int | None = None, option: str = "--methods"):
    """Parse a method list (``dense,himap,fastv(r=0.75)`` or ``all``) for a model of ``num_layers`` layers.

    Returns
    -------
    list of MethodSpec
        Exits with status 2 and a one-line reason for any error.
    """
    from himap_vlm.apps.bench.rows import expand_all
    from himap_vlm.core.methods.spec import MethodSpecError, parse_methods

    try:
        return parse_methods(expand_all(methods), num_layers=num_layers)
    except MethodSpecError as exc:
        fail(f"{option} {methods}: {_one_line(exc)}")
        raise  # unreachable


def spec_error(exc: Exception, option: str, value: str) -> None:
    """Exit with a one-line error for a spec problem found later (e.g. against the model's depth)."""
    fail(f"{option} {value}: {_one_line(exc)}")


# ---------------------------------------------------------------------------------------------
# output and inputs
# ---------------------------------------------------------------------------------------------
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
