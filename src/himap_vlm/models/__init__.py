"""Model builders and the models the package ships, addressable by name.

* :mod:`~himap_vlm.models.tiny` / :mod:`~himap_vlm.models.tiny_families`: tiny *random* models of
  every supported family, built offline (tests, examples, ``himap tiny-model``);
* :mod:`~himap_vlm.models.tiny_llava`: the trained tiny LLaVA shipped in :mod:`himap_vlm.assets`;
* named models: every ``--model`` option and :func:`resolve_model` accept ``tiny-llava`` (the
  shipped tiny LLaVA) and ``smol-llava`` (a LLaVA on the pretrained SmolLM2-135M, assembled offline
  on first use) besides a path or hub id.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

__all__ = ["NAMED_MODELS", "named_model", "named_model_path", "resolve_model"]


def _tiny_llava() -> Path:
    from himap_vlm.assets import has_tiny_llava, tiny_llava_path

    path = tiny_llava_path()
    if not has_tiny_llava(path):
        raise FileNotFoundError(f"this build of himap-vlm does not ship the tiny LLaVA ({path} is missing)")
    return path


def _smol_llava() -> Path:
    try:
        module = importlib.import_module("himap_vlm.models.smol_llava")
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise FileNotFoundError(f"smol-llava is not available in this build of himap-vlm ({exc})") from None
    return module.smol_llava_path()


NAMED_MODELS: dict[str, Callable[[], Path]] = {"tiny-llava": _tiny_llava, "smol-llava": _smol_llava}
"""Model names -> a function returning the model's local ``save_pretrained`` directory."""


def _key(name: str | Path) -> str:
    return str(name).strip().lower().replace("_", "-")


def named_model(path_or_name: str | Path) -> str | None:
    """The canonical name (``tiny-llava``, ``smol-llava``) if ``path_or_name`` names a named model
    rather than an existing path, else ``None``."""
    key = _key(path_or_name)
    return key if key in NAMED_MODELS and not Path(str(path_or_name)).exists() else None


def named_model_path(name: str) -> Path:
    """The local directory of a named model (``tiny-llava``, ``smol-llava``).

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    FileNotFoundError
        If the model is not available in this build (or cannot be assembled).
    """
    key = _key(name)
    if key not in NAMED_MODELS:
        raise ValueError(f"unknown model name {name!r}; named models: {', '.join(NAMED_MODELS)}")
    return NAMED_MODELS[key]()


def resolve_model(path_or_name: str | Path) -> str:
    """What to hand ``from_pretrained``: a named model's directory, else ``path_or_name`` unchanged."""
    key = named_model(path_or_name)
    return str(named_model_path(key)) if key is not None else str(path_or_name)
