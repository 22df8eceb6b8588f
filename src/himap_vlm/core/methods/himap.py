"""HiMAP: hierarchical image-token pruning (shallow img→instruction, deep img→img).

Reference: Zhang et al., "Lifting the Veil on Visual Information Flow in MLLMs: Unlocking
Pathways to Faster Inference" (HiMAP), §4; criteria as in the authors' code
(``ustc-hyin/HiMAP``), see ``shared/reference/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from himap_vlm.core.methods.base import (
    PruneStep,
    PruningMethod,
    ScoreRequest,
    check_layer,
    check_ratio,
    kept_count,
    top_k_indices,
)


@dataclass(frozen=True)
class HiMAPConfig:
    """Configuration of :class:`HiMAP`.

    Parameters
    ----------
    k1 : int
        Shallow filtering layer K1 (>= 1): layers K1, K1+1, ... run without the pruned tokens; the
        scores come from the attention of layer K1-1.
    r1 : float
        Fraction of the image tokens pruned at K1, in [0, 1].
    k2 : int
        Deep filtering layer K2 (> K1).
    r2 : float
        Fraction of the image tokens *remaining after K1* pruned at K2, in [0, 1].
    swap_criteria : bool
        Ablation of the paper's Tab. 4: score img→img at K1 and img→instruction at K2.
    """

    k1: int = 2
    r1: float = 0.5
    k2: int = 8
    r2: float = 0.75
    swap_criteria: bool = False

    def __post_init__(self) -> None:
        check_layer("k1", self.k1)
        check_layer("k2", self.k2)
        check_ratio("r1", self.r1)
        check_ratio("r2", self.r2)
        if self.k2 <= self.k1:
            raise ValueError(f"k2={self.k2} must be greater than k1={self.k1} (the deep module comes after the shallow one)")
        if not isinstance(self.swap_criteria, bool):
            raise ValueError(f"swap_criteria must be True or False; got {self.swap_criteria!r}")


class HiMAP(PruningMethod):
    """HiMAP image-token pruning (two modules).

    * Shallow module at layer ``k1``: score of image token v = Σ over instruction tokens i (every
      token after the last image span) of mean_h A_{k1-1}[h, i, v]; the lowest fraction ``r1``
      is pruned.
    * Deep module at layer ``k2``: on the kept image tokens only, score of v = Σ over kept image
      tokens u (queries, causal) of mean_h A_{k2-1}[h, u, v]; the lowest fraction ``r2`` of the
      remaining tokens is pruned.

    Paper settings (LLaVA-1.5-7B, 32 layers): QA ``k1=2, r1=0.5, k2=8, r2=0.75`` (about 24 % of
    the image-token FLOPs); captioning / open QA ``k2=15, r2=0.5``.

    Parameters
    ----------
    k1, r1, k2, r2, swap_criteria
        See :class:`HiMAPConfig`.
    """

    name = "himap"

    def __init__(self, k1: int = 2, r1: float = 0.5, k2: int = 8, r2: float = 0.75, swap_criteria: bool = False):
        self.config = HiMAPConfig(k1=k1, r1=r1, k2=k2, r2=r2, swap_criteria=swap_criteria)

    def steps(self) -> list[PruneStep]:
        shallow, deep = ScoreRequest("instruction"), ScoreRequest("image")
        if self.config.swap_criteria:
            shallow, deep = deep, shallow
        return [PruneStep(self.config.k1, shallow), PruneStep(self.config.k2, deep)]

    def select(self, step: int, scores: torch.Tensor | None, num_image: int, *, layer: int) -> torch.Tensor:
        ratio = self.config.r1 if step == 0 else self.config.r2
        return top_k_indices(scores, kept_count(num_image, ratio))
