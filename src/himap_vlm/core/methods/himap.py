"""HiMAP: hierarchical image-token pruning (shallow img→instruction, deep img→img).

Reference: Zhang et al., "Lifting the Veil on Visual Information Flow in MLLMs: Unlocking
Pathways to Faster Inference" (HiMAP), §4; criteria as in the authors' code
(``ustc-hyin/HiMAP``), see ``shared/reference/methods.md``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from himap_vlm.core.interface import PruneStep, ScoreRequest, StepInput
from himap_vlm.core.methods.base import PruningMethod, kept_count, top_k_indices
from himap_vlm.core.methods.params import flag, layer, ratio
from himap_vlm.core.methods.registry import register


@register("himap")
@dataclass(frozen=True)
class HiMAP(PruningMethod):
    """HiMAP image-token pruning (two modules).

    * Shallow module at layer ``k1``: score of image token v = Σ over instruction tokens i (every
      token after the last image span) of mean_h A_{k1-1}[h, i, v]; the lowest fraction ``r1``
      is pruned.
    * Deep module at layer ``k2``: on the kept image tokens only, score of v = Σ over kept image
      tokens u (queries, causal) of mean_h A_{k2-1}[h, u, v]; the lowest fraction ``r2`` of the
      remaining tokens is pruned.

    Paper settings (LLaVA-1.5-7B, 32 layers): QA ``k1=2, r1=0.5, k2=8, r2=0.75`` (about 24 % of
    the image-token FLOPs); captioning / open QA ``k2=15, r2=0.5``. A sample with no token after
    its last image has no instruction queries: its shallow scores are all 0 and the first image
    tokens in sequence order are kept (a warning says so).

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

    rank = 10

    k1: int = layer(2, doc="shallow filtering layer K1")
    r1: float = ratio(0.5, doc="fraction of image tokens pruned at K1")
    k2: int = layer(8, doc="deep filtering layer K2 (> K1)")
    r2: float = ratio(0.75, doc="fraction of the remaining image tokens pruned at K2")
    swap_criteria: bool = flag(False, doc="the paper's Tab. 4 ablation: criteria swapped")

    def check(self) -> None:
        if self.k2 <= self.k1:
            raise ValueError(f"k2={self.k2} must be greater than k1={self.k1} (the deep module comes after the shallow one)")

    @classmethod
    def defaults_for(cls, num_layers: int) -> dict[str, Any]:
        """``k1=2, r1=0.5, k2=max(3, L//4), r2=0.75`` (paper: K2=8 of 32 layers)."""
        return {"k1": 2, "r1": 0.5, "k2": max(3, num_layers // 4), "r2": 0.75}

    @classmethod
    def budgets(cls, num_layers: int) -> list[dict[str, Any]]:
        """``(r1, r2)`` in ``{(0.75, 0.9), (0.9, 0.95)}`` at the scaled layers."""
        base = cls.defaults_for(num_layers)
        return [{**base, "r1": 0.75, "r2": 0.9}, {**base, "r1": 0.9, "r2": 0.95}]

    def steps(self) -> list[PruneStep]:
        shallow, deep = ScoreRequest("instruction"), ScoreRequest("image")
        if self.swap_criteria:
            shallow, deep = deep, shallow
        return [PruneStep(self.k1, shallow), PruneStep(self.k2, deep)]

    def kept_after(self, step: int, num_image: int, num_image_input: int) -> int:
        return kept_count(num_image, self.r1 if step == 0 else self.r2)

    def select(self, x: StepInput) -> torch.Tensor:
        request = self.steps()[x.step].score
        if request is not None and request.queries == "instruction" and x.scores is not None and x.num_image:
            if not bool((x.scores != 0).any()):
                warnings.warn(
                    f"HiMAP: a sample has no instruction token after its last image (all scores at layer "
                    f"{x.layer - 1} are 0); its first image tokens in sequence order are kept. Put the question "
                    "after the image to rank by image->instruction attention.",
                    stacklevel=2,
                )
        return top_k_indices(x.scores, self.kept_after(x.step, x.num_image, x.num_image_input))
