"""VTW: Visual Tokens Withdrawal — every image token leaves the language model at layer K.

Reference: Lin et al., "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal
for Rapid Inference" (VTW), AAAI 2025, §"Visual Tokens Withdrawal" (eq. 5) and the choice of K by
a KL-divergence criterion (eq. 6); authors' code ``lzhxmu/VTW``. The calibration of K lives in
:mod:`himap_vlm.apps.calibrate` (:func:`~himap_vlm.apps.calibrate.calibrate_vtw`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from himap_vlm.core.methods.base import PruneStep, PruningMethod, check_layer


@dataclass(frozen=True)
class VTWConfig:
    """Configuration of :class:`VTW`.

    Parameters
    ----------
    k : int
        Withdrawal layer K (0-based, >= 1): layers ``k, k+1, ...`` run without any image token and
        their KV caches hold no image keys/values. Must be below the model's number of layers.
        The authors' code (0-based layer index) uses 15/16 for LLaVA-1.5-7B, 20 for 13B.
    """

    k: int = 16

    def __post_init__(self) -> None:
        check_layer("k", self.k)


class VTW(PruningMethod):
    """Visual Tokens Withdrawal.

    In the prefill, layers ``0 ... k-1`` see every token; from layer ``k`` on, every image token is
    withdrawn (its hidden state leaves the sequence, kept tokens keep their original RoPE
    positions — the paper's "keep" variant). Decode steps attend to the shortened caches. No
    attention scores are needed, so any attention kernel (SDPA, flash) keeps running.

    Parameters
    ----------
    k : int
        See :class:`VTWConfig`.

    Examples
    --------
    >>> with VTW(k=16)(model) as run:                     # doctest: +SKIP
    ...     model.generate(**inputs, max_new_tokens=32)
    >>> run.image_tokens_per_layer[16]                     # doctest: +SKIP
    [0]
    """

    name = "vtw"

    def __init__(self, k: int = 16):
        self.config = VTWConfig(k=k)

    def steps(self) -> list[PruneStep]:
        return [PruneStep(self.config.k, None)]

    def select(self, step: int, scores: torch.Tensor | None, num_image: int, *, layer: int) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)
