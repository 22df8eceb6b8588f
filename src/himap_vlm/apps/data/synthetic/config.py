"""The benchmark's parameters (:class:`SceneQAConfig`) and its splits."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .vocab import COLORS, FAMILIES, LETTERS, NUMBER_WORDS, SHAPES, SPLITS

__all__ = ["SceneQAConfig"]

_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
# Cumulative upper bounds of the content-hash buckets of each split.
_SPLIT_BOUNDS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}


def _check_names(name: str, values: Any, known: Sequence[str], minimum: int) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of names from {list(known)}, got {values!r}")
    out = tuple(values)
    unknown = [v for v in out if v not in known]
    if unknown:
        raise ValueError(f"{name} contains unknown value(s) {unknown}; choose from {list(known)}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} contains duplicates: {list(out)}")
    if len(out) < minimum:
        raise ValueError(f"{name} needs at least {minimum} value(s), got {list(out)}")
    return out


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


@dataclass(frozen=True)
class SceneQAConfig:
    """Parameters of the synthetic scene-QA benchmark (validated at construction).

    Parameters
    ----------
    image_size : int, default 48
        Side of the square RGB image in pixels; must leave at least 8 px per grid cell
        (``image_size >= 8 * grid``).
    grid : int, default 3
        The image is divided into ``grid x grid`` cells; each object occupies one cell.
    min_objects, max_objects : int, default 1 and 4
        Number of objects per scene, drawn uniformly in ``[min_objects, max_objects]``;
        ``max_objects <= min(grid ** 2, 9)``.
    families : sequence of str, default :data:`FAMILIES`
        Question families to generate, cycled in this order by :func:`load_synthetic`.
    seed : int, default 0
        Non-negative base seed; scenes and questions are a pure function of it.
    shapes, colors : sequence of str, default :data:`SHAPES` and :data:`COLORS`
        Subsets of the known shapes and colours to draw from (at least two of each).
    choice_options : int, default 4
        Number of options of ``choice`` questions (2-4; fewer when the attribute has fewer
        values).
    questions_per_scene : int, default 1
        Questions asked about each scene by :func:`load_synthetic` (more questions per scene
        means fewer distinct images for the same number of records).
    background : tuple of int, default (32, 32, 32)
        RGB background colour.
    supersample : int, default 4
        Shapes are drawn at ``supersample`` times the resolution and box-filtered down
        (anti-aliasing); 1 disables it.
    """

    image_size: int = 48
    grid: int = 3
    min_objects: int = 1
    max_objects: int = 4
    families: tuple[str, ...] = FAMILIES
    seed: int = 0
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLORS
    choice_options: int = 4
    questions_per_scene: int = 1
    background: tuple[int, int, int] = (32, 32, 32)
    supersample: int = 4

    def __post_init__(self) -> None:
        _check_int("grid", self.grid, 2, 16)
        _check_int("image_size", self.image_size, 8 * self.grid)
        _check_int("min_objects", self.min_objects, 1)
        _check_int("max_objects", self.max_objects, self.min_objects, min(self.grid**2, len(NUMBER_WORDS)))
        _check_int("seed", self.seed, 0)
        _check_int("choice_options", self.choice_options, 2, len(LETTERS))
        _check_int("questions_per_scene", self.questions_per_scene, 1)
        _check_int("supersample", self.supersample, 1, 16)
        object.__setattr__(self, "families", _check_names("families", self.families, FAMILIES, 1))
        object.__setattr__(self, "shapes", _check_names("shapes", self.shapes, SHAPES, 2))
        object.__setattr__(self, "colors", _check_names("colors", self.colors, COLORS, 2))
        bg = self.background
        if (
            isinstance(bg, str)
            or not isinstance(bg, Sequence)
            or len(bg) != 3
            or any(
                isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c <= 255 for c in bg
            )
        ):
            raise ValueError(f"background must be three integers in [0, 255], got {bg!r}")
        object.__setattr__(self, "background", tuple(int(c) for c in bg))
        if "spatial" in self.families and self.max_objects < 2:
            raise ValueError("the 'spatial' family needs max_objects >= 2")


def _resolve_split(split: str) -> str:
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"split must be one of {list(SPLITS)} (or 'val'), got {split!r}")
    return _SPLIT_ALIASES[split]
