"""Pruning methods: each decides *which* image tokens to keep; :mod:`himap_vlm.core.engine` does the rest."""

from __future__ import annotations

from himap_vlm.core.methods.base import AttentionEdit, PruneStep, PruningMethod, ScoreRequest, kept_count
from himap_vlm.core.methods.dense import Dense, DenseConfig
from himap_vlm.core.methods.fastv import FastV, FastVConfig
from himap_vlm.core.methods.himap import HiMAP, HiMAPConfig
from himap_vlm.core.methods.random import RandomPrune, RandomPruneConfig
from himap_vlm.core.methods.visipruner import VisiPruner, VisiPrunerConfig
from himap_vlm.core.methods.vtw import VTW, VTWConfig

METHODS: dict[str, type[PruningMethod]] = {
    "dense": Dense,
    "himap": HiMAP,
    "fastv": FastV,
    "random": RandomPrune,
    "vtw": VTW,
    "visipruner": VisiPruner,
}


def get_method(name: str) -> type[PruningMethod]:
    """The method class registered under ``name`` (case-insensitive).

    Raises
    ------
    ValueError
        For an unknown name, listing the known ones.
    """
    key = name.strip().lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[key]


__all__ = [
    "METHODS",
    "VTW",
    "AttentionEdit",
    "Dense",
    "DenseConfig",
    "FastV",
    "FastVConfig",
    "HiMAP",
    "HiMAPConfig",
    "PruneStep",
    "PruningMethod",
    "RandomPrune",
    "RandomPruneConfig",
    "ScoreRequest",
    "VTWConfig",
    "VisiPruner",
    "VisiPrunerConfig",
    "get_method",
    "kept_count",
]
