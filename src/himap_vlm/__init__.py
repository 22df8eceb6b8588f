"""himap_vlm: prune image tokens inside multimodal LLMs, on stock transformers.

>>> from himap_vlm import HiMAP
>>> with HiMAP(k1=2, r1=0.5, k2=8, r2=0.75)(model) as run:   # doctest: +SKIP
...     out = model.generate(**inputs, max_new_tokens=32)
>>> run.image_tokens_per_layer                                   # doctest: +SKIP

Every registered method is importable from here by its class name (``from himap_vlm import
PyramidDrop``); :data:`METHODS` lists them by name.
"""

from __future__ import annotations

from typing import Any

from himap_vlm.core.engine import PruningRun
from himap_vlm.core.families import FAMILIES, ModelFamily, resolve_family, supported_classes
from himap_vlm.core.interface import (
    AttentionEdit,
    FeatureRequest,
    LayerView,
    PruneStep,
    ScoreRequest,
    StepInput,
)
from himap_vlm.core.methods import (
    METHODS,
    MethodSpec,
    PruningMethod,
    get_method,
    method_class,
    method_names,
    parse_methods,
    register,
)

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Method classes by class name, from the registry (``himap_vlm.HiMAP``)."""
    try:
        return method_class(name)
    except AttributeError:
        raise AttributeError(f"module 'himap_vlm' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | {get_method(n).__name__ for n in method_names()})


__all__ = [
    "FAMILIES",
    "METHODS",
    "AttentionEdit",
    "FeatureRequest",
    "LayerView",
    "MethodSpec",
    "ModelFamily",
    "PruneStep",
    "PruningMethod",
    "PruningRun",
    "ScoreRequest",
    "StepInput",
    "__version__",
    "get_method",
    "method_names",
    "parse_methods",
    "register",
    "resolve_family",
    "supported_classes",
]
