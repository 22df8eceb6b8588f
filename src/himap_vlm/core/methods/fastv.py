"""FastV: prune the least-attended image tokens once, after layer K.

Reference: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models" (FastV), ECCV 2024; the baseline of the HiMAP,
VTW and VisiPruner papers.
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

CRITERIA = ("last_token", "mean_received")


@dataclass(frozen=True)
class FastVConfig:
    """Configuration of :class:`FastV`.

    Parameters
    ----------
    k : int
        Filtering layer K (>= 1); scores come from the attention of layer K-1.
    r : float
        Fraction of the image tokens pruned, in [0, 1].
    criterion : {"last_token", "mean_received"}
        ``"last_token"``: attention of the last input token (the authors' code);
        ``"mean_received"``: average attention each image token receives from all tokens (the
        paper's text).
    """

    k: int = 2
    r: float = 0.5
    criterion: str = "last_token"

    def __post_init__(self) -> None:
        check_layer("k", self.k)
        check_ratio("r", self.r)
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(map(repr, CRITERIA))}; got {self.criterion!r}")


class FastV(PruningMethod):
    """FastV image-token pruning.

    Score of image token v: mean over heads of A_{k-1}[h, last, v] (``criterion="last_token"``)
    or the average over all queries i of mean_h A_{k-1}[h, i, v] (``"mean_received"``). The
    lowest fraction ``r`` is pruned; layers ``k, k+1, ...`` run without them. Paper baseline
    setting in HiMAP's comparisons: ``k=2, r=0.5``.

    Parameters
    ----------
    k, r, criterion
        See :class:`FastVConfig`.
    """

    name = "fastv"

    def __init__(self, k: int = 2, r: float = 0.5, criterion: str = "last_token"):
        self.config = FastVConfig(k=k, r=r, criterion=criterion)

    def steps(self) -> list[PruneStep]:
        if self.config.criterion == "last_token":
            request = ScoreRequest("last")
        else:
            request = ScoreRequest("all", reduce="mean")
        return [PruneStep(self.config.k, request)]

    def select(self, step: int, scores: torch.Tensor | None, num_image: int, *, layer: int) -> torch.Tensor:
        return top_k_indices(scores, kept_count(num_image, self.config.r))
