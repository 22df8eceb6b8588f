"""The method registry: a method registers itself with :func:`register`; everything else reads it.

Built-in methods are the modules of :mod:`himap_vlm.core.methods` (imported by its ``__init__``);
code outside the package registers its own with the same decorator::

    @register("mymethod", aliases=("my-method",))
    @dataclass(frozen=True)
    class MyMethod(PruningMethod):
        k: int = layer(2, doc="pruning layer")
        ...
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from himap_vlm.core.methods.base import PruningMethod

__all__ = ["METHODS", "get_method", "method_names", "register", "restored", "unregister"]

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_CLASSES: dict[str, type[PruningMethod]] = {}
_ALIASES: dict[str, str] = {}

M = TypeVar("M", bound="type[PruningMethod]")


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[M], M]:
    """Class decorator: register a method under ``name`` (and ``aliases``); sets ``cls.name``.

    Raises
    ------
    ValueError
        For a malformed name, or a name or alias already taken by another method.
    """

    def deco(cls: M) -> M:
        if not _NAME.match(name):
            raise ValueError(f"method name {name!r} must be lowercase letters, digits and '_' (starting with a letter)")
        keys = [name, *(_key(a) for a in aliases)]
        for key in keys:
            owner = _CLASSES.get(key) or _CLASSES.get(_ALIASES.get(key, ""))
            if owner is not None and owner is not cls:
                raise ValueError(f"method name {key!r} is already registered by {owner.__name__}")
        cls.name = name
        cls.aliases = tuple(aliases)
        _CLASSES[name] = cls
        for key in keys[1:]:
            _ALIASES[key] = name
        return cls

    return deco


def unregister(name: str) -> None:
    """Remove the method registered under ``name`` (canonical name or alias) and its aliases.

    Raises
    ------
    ValueError
        For an unknown name.
    """
    canonical = get_method(name).name
    del _CLASSES[canonical]
    for alias in [a for a, target in _ALIASES.items() if target == canonical]:
        del _ALIASES[alias]


@contextlib.contextmanager
def restored() -> Iterator[None]:
    """Undo every registration and removal made inside the block (tests, notebooks)."""
    classes, aliases = dict(_CLASSES), dict(_ALIASES)
    try:
        yield
    finally:
        _CLASSES.clear()
        _CLASSES.update(classes)
        _ALIASES.clear()
        _ALIASES.update(aliases)


def get_method(name: str) -> type[PruningMethod]:
    """The method class registered under ``name`` or one of its aliases (case-insensitive).

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    key = _key(str(name))
    key = _ALIASES.get(key, key)
    if key not in _CLASSES:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}")
    return _CLASSES[key]


def method_names() -> list[str]:
    """Canonical names of every registered method, by the methods' ``rank`` then registration order."""
    order = {name: i for i, name in enumerate(_CLASSES)}
    return sorted(_CLASSES, key=lambda n: (getattr(_CLASSES[n], "rank", 100), order[n]))


class _Registry(Mapping[str, "type[PruningMethod]"]):
    """Read-only view of the registry: canonical name -> class."""

    def __getitem__(self, key: str) -> type[PruningMethod]:
        return get_method(key)

    def __iter__(self) -> Iterator[str]:
        return iter(method_names())

    def __len__(self) -> int:
        return len(_CLASSES)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and _ALIASES.get(_key(key), _key(key)) in _CLASSES

    def __repr__(self) -> str:
        return f"METHODS({', '.join(_CLASSES)})"


METHODS: Mapping[str, type[PruningMethod]] = _Registry()
"""Every registered method by canonical name (a live, read-only view)."""
