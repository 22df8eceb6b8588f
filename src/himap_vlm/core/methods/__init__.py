"""Pruning methods: each decides *which* image tokens to keep; :mod:`himap_vlm.core.engine` does the rest.

Every module of this package other than the shared ones (``base``, ``params``, ``registry``,
``spec``) is a method: a small file that declares the method's parameters once and registers it
(:func:`~himap_vlm.core.methods.registry.register`). They are imported here, so adding a method
means adding a file. Method classes are also reachable as attributes (``himap_vlm.core.methods.HiMAP``,
``himap_vlm.HiMAP``), looked up in the registry by class name.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from himap_vlm.core.methods.base import PruningMethod, kept_count, top_k_indices
from himap_vlm.core.methods.registry import METHODS, get_method, method_names, register
from himap_vlm.core.methods.spec import MethodSpec, MethodSpecError, parse_methods

_SHARED = {"base", "params", "registry", "spec"}


def _load_builtin_methods() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name not in _SHARED and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_load_builtin_methods()


def method_class(class_name: str) -> type[PruningMethod]:
    """The registered method whose class is called ``class_name`` (e.g. ``"HiMAP"``).

    Raises
    ------
    AttributeError
        If no registered method has that class name.
    """
    for name in method_names():
        cls = get_method(name)
        if cls.__name__ == class_name:
            return cls
    raise AttributeError(f"no registered method class named {class_name!r}")


def __getattr__(name: str) -> Any:
    return method_class(name)


__all__ = [
    "METHODS",
    "MethodSpec",
    "MethodSpecError",
    "PruningMethod",
    "get_method",
    "kept_count",
    "method_class",
    "method_names",
    "parse_methods",
    "register",
    "top_k_indices",
]
