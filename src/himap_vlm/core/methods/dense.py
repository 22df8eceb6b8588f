"""Dense: the unpruned model, run through the same engine (for records and fair timing)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from himap_vlm.core.methods.base import PruneStep, PruningMethod


@dataclass(frozen=True)
class DenseConfig:
    """Dense has no parameters."""


class Dense(PruningMethod):
    """No pruning. ``with Dense()(model) as run`` still records per-layer token counts."""

    name = "dense"

    def __init__(self) -> None:
        self.config = DenseConfig()

    def steps(self) -> list[PruneStep]:
        return []

    def select(self, step: int, scores: torch.Tensor | None, num_image: int, *, layer: int) -> torch.Tensor:
        return torch.arange(num_image)
