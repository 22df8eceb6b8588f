"""Pruning methods: each decides *which* image tokens to keep; :mod:`himap.engine` does the rest."""

from __future__ import annotations

from himap.methods.base import AttentionEdit, PruneStep, PruningMethod, ScoreRequest, kept_count
from himap.methods.dense import Dense, DenseConfig
from himap.methods.fastv import FastV, FastVConfig
from himap.methods.himap import HiMAP, HiMAPConfig
from himap.methods.random import RandomPrune, RandomPruneConfig
from himap.methods.visipruner import VisiPruner, VisiPrunerConfig
from himap.methods.vtw import VTW, VTWConfig

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
