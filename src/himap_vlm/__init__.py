"""himap: prune image tokens inside multimodal LLMs, on stock transformers v5.

>>> from himap_vlm import HiMAP
>>> with HiMAP(k1=2, r1=0.5, k2=8, r2=0.75)(model) as run:   # doctest: +SKIP
...     out = model.generate(**inputs, max_new_tokens=32)
>>> run.image_tokens_per_layer                                   # doctest: +SKIP
"""

from __future__ import annotations

from himap_vlm.core.engine import PruningRun
from himap_vlm.core.families import FAMILIES, ModelFamily, resolve_family, supported_classes
from himap_vlm.core.methods import (
    METHODS,
    VTW,
    Dense,
    FastV,
    HiMAP,
    PruneStep,
    PruningMethod,
    RandomPrune,
    ScoreRequest,
    VisiPruner,
    get_method,
)

__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "METHODS",
    "Dense",
    "FastV",
    "HiMAP",
    "ModelFamily",
    "PruneStep",
    "PruningMethod",
    "PruningRun",
    "RandomPrune",
    "ScoreRequest",
    "VTW",
    "VisiPruner",
    "__version__",
    "get_method",
    "resolve_family",
    "supported_classes",
]
