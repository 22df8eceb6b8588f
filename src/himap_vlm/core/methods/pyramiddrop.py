"""PyramidDrop: drop image tokens at several stage boundaries, ranked by the last token's attention.

Reference: Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", arXiv 2410.17247 (CVPR 2025); authors' code
``Cooperx521/PyramidDrop``, ``llava/model/modeling_llama_pdrop.py`` (``pdrop_forward``,
``pdrop_rank_drop``), launch scripts ``scripts/v1_5/pdrop_eval/*.sh``
(``--layer_list [8,16,24] --image_token_ratio_list [0.5,0.25,0.125]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from himap_vlm.core.interface import PositionPolicy, PruneStep, ScoreRequest, StepInput
from himap_vlm.core.methods.base import PruningMethod, top_k_indices
from himap_vlm.core.methods.params import choice, layer, ratio
from himap_vlm.core.methods.registry import register


@register("pyramiddrop", aliases=("pdrop", "pyramid_drop"))
@dataclass(frozen=True)
class PyramidDrop(PruningMethod):
    """PyramidDrop image-token pruning (a pyramid of stages).

    At each stage boundary ``k1 < k2 < k3`` the image tokens still present are ranked by the
    attention of the last input token computed with the **first layer of the next stage** — that
    layer's input norm, queries and keys at the current positions, softmax over every key it may
    attend, mean over heads — and stage ``s`` (``s = 1, 2, 3``) keeps ``int(n × (1 - r)^s)`` of
    the ``n`` image tokens of the input (576 → 288 → 144 → 72 for LLaVA-1.5 with ``r = 0.5``).
    Kept tokens stay in sequence order. Selection happens once, in the prefill.

    Positions (``positions``): the authors number the kept tokens ``0 .. n-1`` again after every
    drop (``"renumber"``, default; generated tokens then take the positions the model computes for
    them, the full-length numbering, as their code does with a KV cache); ``"compact"`` also
    continues each stage's numbering for generated tokens; ``"keep"`` keeps original positions
    (HiMAP/FastV's convention). Renumbering is undefined for 3-D M-RoPE (Qwen2-VL, Qwen2.5-VL,
    Qwen3-VL): use ``positions="keep"`` there.

    Deviations from the authors' code (no effect on LLaVA-1.5 batch-1 results): grouped-query
    heads are expanded before scoring (theirs has no ``repeat_kv``: MHA only); image tokens are
    found by id, several images count together; padded batches equal single runs.

    Parameters
    ----------
    k1, k2, k3 : int
        Stage boundaries: layers ``k_s, k_s + 1, ...`` run without the tokens dropped there
        (authors: 8, 16, 24 of 32). ``k3=None`` gives two drops.
    r : float
        Fraction of the remaining image tokens dropped at each boundary (authors' λ = 1 - r = 0.5).
    positions : {"renumber", "compact", "keep"}
        See above.
    """

    k1: int = layer(8, doc="first stage boundary")
    k2: int = layer(16, doc="second stage boundary (> k1)")
    k3: int | None = layer(24, optional=True, doc="third stage boundary (> k2); None: two drops")
    r: float = ratio(0.5, doc="fraction of the remaining image tokens dropped at each boundary")
    positions: str = choice("renumber", ("renumber", "compact", "keep"), doc="positions after a drop")

    rank = 60

    def check(self) -> None:
        if self.k2 <= self.k1:
            raise ValueError(f"k2={self.k2} must be greater than k1={self.k1} (stage boundaries increase)")
        if self.k3 is not None and self.k3 <= self.k2:
            raise ValueError(f"k3={self.k3} must be greater than k2={self.k2} (stage boundaries increase)")

    @classmethod
    def defaults_for(cls, num_layers: int) -> dict[str, Any]:
        """Boundaries at ``L/4, L/2, 3L/4`` (authors: 8, 16, 24 of 32), ``r = 0.5``."""
        k1 = max(1, num_layers // 4)
        k2 = max(k1 + 1, num_layers // 2)
        k3 = max(k2 + 1, 3 * num_layers // 4)
        return {"k1": k1, "k2": k2, "k3": k3 if k3 < num_layers else None, "r": 0.5}

    @classmethod
    def budgets(cls, num_layers: int) -> list[dict[str, Any]]:
        """``r`` in ``{0.7, 0.85}`` at the scaled boundaries."""
        base = cls.defaults_for(num_layers)
        return [{**base, "r": 0.7}, {**base, "r": 0.85}]

    @property
    def position_policy(self) -> PositionPolicy:
        return self.positions  # type: ignore[return-value]

    def boundaries(self) -> list[int]:
        """The stage boundaries in use."""
        return [k for k in (self.k1, self.k2, self.k3) if k is not None]

    def steps(self) -> list[PruneStep]:
        return [PruneStep(k, ScoreRequest("last", layer="pruning")) for k in self.boundaries()]

    def kept_after(self, step: int, num_image: int, num_image_input: int) -> int:
        fraction = round((1.0 - self.r) ** (step + 1), 12)
        return min(num_image, int(num_image_input * fraction))

    def select(self, x: StepInput) -> torch.Tensor:
        return top_k_indices(x.scores, self.kept_after(x.step, x.num_image, x.num_image_input))
