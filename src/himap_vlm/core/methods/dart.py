"""DART: keep the image tokens least duplicated by a few pivot tokens.

Reference: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More" (DART), arXiv 2502.11494; authors' code ``modeling_llama_self.py``
(``DART.forward``, ``get_retained_image_token``), see ``shared/reference/transformers-v5-notes.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from himap_vlm.core.interface import FeatureRequest, PruneStep, StepInput
from himap_vlm.core.methods.base import PruningMethod, kept_count, top_k_indices
from himap_vlm.core.methods.params import integer, layer, ratio
from himap_vlm.core.methods.registry import register


@register("dart")
@dataclass(frozen=True)
class DART(PruningMethod):
    """DART image-token pruning (duplication-aware, no attention weights).

    One drop before layer ``k``. *Pivots*: the ``image_pivots`` image tokens and the
    ``text_pivots`` tokens after the sample's last image with the largest L1 norm of layer
    ``k-1``'s keys (post-RoPE, kv heads concatenated). For each pivot in turn, the image tokens
    not yet kept whose layer-``k-1`` outputs (through the final norm) are **least** cosine-similar
    to the pivot's are kept, ``(budget - image pivots) // pivots`` per pivot (the first pivots take
    one more when it does not divide); image pivots are kept too. The budget is the usual
    ``kept_count(n, r)``: the authors' ``4 + 8 × 16 = 132`` of 576 is ``r = 0.77``.

    It needs no attention weights: the model keeps SDPA / flash everywhere and no attention row is
    recomputed (only layer ``k-1``'s keys, once). Original positions are kept; selection happens
    once, in the prefill.

    Deterministic where the authors' code is not: their pivots are processed in the order of a
    Python ``set`` and run batch 1 only. Here pivots are processed by decreasing key norm (image
    pivots first, then text pivots; ties by position), so a sample keeps the same tokens alone or
    in a padded batch.

    Parameters
    ----------
    k : int
        Pruning layer (authors: 2): layers ``k, k+1, ...`` run without the dropped tokens.
    r : float
        Fraction of the image tokens dropped.
    image_pivots, text_pivots : int
        Pivot counts (authors: 4 and 4). At least one pivot in total.
    """

    k: int = layer(2, doc="pruning layer")
    r: float = ratio(0.77, doc="fraction of image tokens dropped (0.77: 132 of 576 kept, the authors' budget)")
    image_pivots: int = integer(4, minimum=0, doc="image-token pivots")
    text_pivots: int = integer(4, minimum=0, doc="pivots among the tokens after the last image")

    rank = 70

    def check(self) -> None:
        if self.image_pivots + self.text_pivots < 1:
            raise ValueError("image_pivots + text_pivots must be at least 1 (DART compares tokens to pivots)")

    @classmethod
    def defaults_for(cls, num_layers: int) -> dict[str, Any]:
        """``k=2, r=0.77`` (the authors' LLaVA-1.5 setting at any depth), 4 + 4 pivots."""
        return {"k": 2, "r": 0.77}

    @classmethod
    def budgets(cls, num_layers: int) -> list[dict[str, Any]]:
        """``r`` in ``{0.88, 0.94}`` (about 64 and 32 of 576 kept)."""
        return [{**cls.defaults_for(num_layers), "r": r} for r in (0.88, 0.94)]

    def steps(self) -> list[PruneStep]:
        return [PruneStep(self.k, features=FeatureRequest(("key_l1", "hidden_normed")))]

    def kept_after(self, step: int, num_image: int, num_image_input: int) -> int:
        return kept_count(num_image, self.r)

    def select(self, x: StepInput) -> torch.Tensor:
        budget = self.kept_after(x.step, x.num_image, x.num_image_input)
        f = x.features
        norms, hidden = f["key_l1"].float(), f["hidden_normed"].float()
        is_img, after = f["is_image"], f["after_image"]
        img_idx = torch.nonzero(is_img).flatten()  # token index of every image token, sequence order
        txt_idx = torch.nonzero(after & ~is_img).flatten()
        n_img_piv = min(self.image_pivots, budget, img_idx.numel())
        img_piv = img_idx[top_k_by_value(norms[img_idx], n_img_piv)]
        txt_piv = txt_idx[top_k_by_value(norms[txt_idx], min(self.text_pivots, txt_idx.numel()))]
        pivots = [*img_piv.tolist(), *txt_piv.tolist()]
        kept = torch.zeros(img_idx.numel(), dtype=torch.bool)
        kept[torch.isin(img_idx, img_piv)] = True
        remaining = budget - int(kept.sum())
        if remaining > 0 and not pivots:  # pragma: no cover - at least one pivot is required by check()
            return top_k_indices(norms[img_idx], budget)
        normed = torch.nn.functional.normalize(hidden, dim=-1)
        share, extra = divmod(max(remaining, 0), max(len(pivots), 1))
        for rank_, pivot in enumerate(pivots):
            want = share + (1 if rank_ < extra else 0)
            candidates = torch.nonzero(~kept).flatten()
            if want == 0 or candidates.numel() == 0:
                continue
            sim = normed[img_idx[candidates]] @ normed[pivot]
            pick = candidates[top_k_indices(-sim, want)]
            kept[pick] = True
        return torch.nonzero(kept).flatten()


def top_k_by_value(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values, largest first (ties: lower index first)."""
    return torch.sort(values, descending=True, stable=True).indices[:k]
