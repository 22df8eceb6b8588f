"""VTW: Visual Tokens Withdrawal — every image token leaves the language model at layer K.

Reference: Lin et al., "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal
for Rapid Inference" (VTW), AAAI 2025, §"Visual Tokens Withdrawal" (eq. 5) and the choice of K by
a KL-divergence criterion (eq. 6); authors' code ``lzhxmu/VTW``. The calibration of K lives in
:mod:`himap_vlm.apps.calibrate` (:func:`~himap_vlm.apps.calibrate.calibrate_vtw`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from himap_vlm.core.interface import PruneStep, StepInput
from himap_vlm.core.methods.base import PruningMethod
from himap_vlm.core.methods.params import layer
from himap_vlm.core.methods.registry import register


@register("vtw")
@dataclass(frozen=True)
class VTW(PruningMethod):
    """Visual Tokens Withdrawal.

    In the prefill, layers ``0 ... k-1`` see every token; from layer ``k`` on, every image token is
    withdrawn (its hidden state leaves the sequence, kept tokens keep their original RoPE
    positions — the paper's "keep" variant). Decode steps attend to the shortened caches. No
    attention scores are needed, so any attention kernel (SDPA, flash) keeps running.

    Parameters
    ----------
    k : int
        Withdrawal layer K (0-based, >= 1): layers ``k, k+1, ...`` run without any image token and
        their KV caches hold no image keys/values. The authors' code uses 15/16 for
        LLaVA-1.5-7B, 20 for 13B.

    Examples
    --------
    >>> with VTW(k=16)(model) as run:                     # doctest: +SKIP
    ...     model.generate(**inputs, max_new_tokens=32)
    >>> run.image_tokens_per_layer[16]                     # doctest: +SKIP
    [0]
    """

    rank = 40

    k: int = layer(16, doc="withdrawal layer K")

    @classmethod
    def defaults_for(cls, num_layers: int) -> dict[str, Any]:
        """``k = L // 2`` (paper: K=16 of 32 layers)."""
        return {"k": max(1, num_layers // 2)}

    @classmethod
    def budgets(cls, num_layers: int) -> list[dict[str, Any]]:
        """``k`` in ``{L//4, min(L-1, 3L//4)}``."""
        return [{"k": max(1, num_layers // 4)}, {"k": max(1, min(num_layers - 1, 3 * num_layers // 4))}]

    def steps(self) -> list[PruneStep]:
        return [PruneStep(self.k)]

    def kept_after(self, step: int, num_image: int, num_image_input: int) -> int:
        return 0

    def select(self, x: StepInput) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.long)
