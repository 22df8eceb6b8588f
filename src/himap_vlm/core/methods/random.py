"""RandomPrune: a control that prunes a random subset of image tokens at layer K.

Used in the HiMAP and FastV papers' ablations to show that *which* tokens are kept matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from himap_vlm.core.methods.base import PruneStep, PruningMethod, check_layer, check_ratio, kept_count


@dataclass(frozen=True)
class RandomPruneConfig:
    """Configuration of :class:`RandomPrune`.

    Parameters
    ----------
    k : int
        Pruning layer (>= 1).
    r : float
        Fraction of image tokens pruned, in [0, 1].
    seed : int
        Seed of the selection.
    """

    k: int = 2
    r: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        check_layer("k", self.k)
        check_ratio("r", self.r)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")


class RandomPrune(PruningMethod):
    """Random image-token pruning (control).

    The kept subset is drawn from a generator seeded by ``(seed, layer, num_image)`` only, so a
    sample gets the same subset whether it runs alone or inside a padded batch.

    Parameters
    ----------
    k, r, seed
        See :class:`RandomPruneConfig`.
    """

    name = "random"

    def __init__(self, k: int = 2, r: float = 0.5, seed: int = 0):
        self.config = RandomPruneConfig(k=k, r=r, seed=seed)

    def steps(self) -> list[PruneStep]:
        return [PruneStep(self.config.k, None)]

    def select(self, step: int, scores: torch.Tensor | None, num_image: int, *, layer: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.config.seed * 1_000_003 + layer * 7919 + num_image) % (2**63))
        keep = kept_count(num_image, self.config.r)
        return torch.sort(torch.randperm(num_image, generator=gen)[:keep]).values
