"""FastV: prune the least-attended image tokens once, after layer K.

Reference: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models" (FastV), ECCV 2024; the baseline of the HiMAP,
VTW and VisiPruner papers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from himap_vlm.core.interface import PruneStep, ScoreRequest, StepInput
from himap_vlm.core.methods.base import PruningMethod, kept_count, top_k_indices
from himap_vlm.core.methods.params import choice, layer, ratio
from himap_vlm.core.methods.registry import register

CRITERIA = ("last_token", "mean_received")


@register("fastv")
@dataclass(frozen=True)
class FastV(PruningMethod):
    """FastV image-token pruning.

    Score of image token v: mean over heads of A_{k-1}[h, last, v] (``criterion="last_token"``,
    the authors' code) or the average over all queries i of mean_h A_{k-1}[h, i, v]
    (``"mean_received"``, the paper's text). The lowest fraction ``r`` is pruned; layers
    ``k, k+1, ...`` run without them. Paper baseline setting in HiMAP's comparisons: ``k=2, r=0.5``.

    Parameters
    ----------
    k : int
        Filtering layer K (>= 1); scores come from the attention of layer K-1.
    r : float
        Fraction of the image tokens pruned, in [0, 1].
    criterion : {"last_token", "mean_received"}
        See above.
    """

    rank = 20

    k: int = layer(2, doc="filtering layer K")
    r: float = ratio(0.5, doc="fraction of image tokens pruned")
    criterion: str = choice("last_token", CRITERIA, doc="which attention ranks the image tokens")

    @classmethod
    def defaults_for(cls, num_layers: int) -> dict[str, Any]:
        """``k=2, r=0.5`` (the setting of the HiMAP paper's comparisons, any depth)."""
        return {"k": 2, "r": 0.5}

    @classmethod
    def budgets(cls, num_layers: int) -> list[dict[str, Any]]:
        """``r`` in ``{0.75, 0.9}``."""
        return [{**cls.defaults_for(num_layers), "r": r} for r in (0.75, 0.9)]

    def steps(self) -> list[PruneStep]:
        request = ScoreRequest("last") if self.criterion == "last_token" else ScoreRequest("all", reduce="mean")
        return [PruneStep(self.k, request)]

    def kept_after(self, step: int, num_image: int, num_image_input: int) -> int:
        return kept_count(num_image, self.r)

    def select(self, x: StepInput) -> torch.Tensor:
        return top_k_indices(x.scores, self.kept_after(x.step, x.num_image, x.num_image_input))
