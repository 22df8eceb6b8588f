"""RandomPrune: a control that prunes a random subset of image tokens at layer K.

Used in the HiMAP and FastV papers' ablations to show that *which* tokens are kept matters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from himap_vlm.core.interface import PruneStep, StepInput
from himap_vlm.core.methods.base import PruningMethod, kept_count
from himap_vlm.core.methods.params import integer, layer, ratio
from himap_vlm.core.methods.registry import register


@register("random", aliases=("randomprune", "random_prune"))
@dataclass(frozen=True)
class RandomPrune(PruningMethod):
    """Random image-token pruning (control).

    The kept subset is drawn from a generator seeded by ``(seed, layer, num_image)`` only, so a
    sample gets the same subset whether it runs alone or inside a padded batch.

    Parameters
    ----------
    k : int
        Pruning layer (>= 1).
    r : float
        Fraction of image tokens pruned, in [0, 1].
    seed : int
        Seed of the selection.
    """

    rank = 30

    k: int = layer(2, doc="pruning layer")
    r: float = ratio(0.5, doc="fraction of image tokens pruned")
    seed: int = integer(0, doc="seed of the random selection")

    @classmethod
    def defaults_for(cls, num_layers: int) -> dict[str, Any]:
        """``k=2, r=0.5`` (FastV's setting, random choice)."""
        return {"k": 2, "r": 0.5}

    @classmethod
    def budgets(cls, num_layers: int) -> list[dict[str, Any]]:
        """``r`` in ``{0.75, 0.9}``."""
        return [{**cls.defaults_for(num_layers), "r": r} for r in (0.75, 0.9)]

    def steps(self) -> list[PruneStep]:
        return [PruneStep(self.k)]

    def kept_after(self, step: int, num_image: int, num_image_input: int) -> int:
        return kept_count(num_image, self.r)

    def select(self, x: StepInput) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + x.layer * 7919 + x.num_image) % (2**63))
        keep = self.kept_after(x.step, x.num_image, x.num_image_input)
        return torch.sort(torch.randperm(x.num_image, generator=gen)[:keep]).values
