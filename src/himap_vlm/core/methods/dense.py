"""Dense: the unpruned model, run through the same engine (for records and fair timing)."""

from __future__ import annotations

from dataclasses import dataclass

from himap_vlm.core.interface import PruneStep
from himap_vlm.core.methods.base import PruningMethod
from himap_vlm.core.methods.registry import register


@register("dense", aliases=("none",))
@dataclass(frozen=True)
class Dense(PruningMethod):
    """No pruning. ``with Dense()(model) as run`` still records per-layer token counts."""

    rank = 0

    def steps(self) -> list[PruneStep]:
        return []

    def kept_after(self, step: int, num_image: int, num_image_input: int) -> int:
        return num_image
