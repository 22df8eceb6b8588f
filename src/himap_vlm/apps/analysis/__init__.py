"""Information-flow analysis of multimodal LLMs (HiMAP §2–3, VTW Fig. 4, VisiPruner §3.5/§5.2).

Every measurement takes ``(model, processor, samples)`` with samples ``{image, question, answer}``
records, processes one sample at a time, switches the model only for its own run (attention
implementation, ``requires_grad`` flags, hooks) and restores it afterwards. Results are plain
dataclasses of NumPy arrays (per sample and per layer, mean and std over samples) with a
``to_dict()`` for JSON; :mod:`himap_vlm.apps.analysis.plots` draws them. See ``docs/analysis.md``.

* :func:`saliency` — Taylor saliency ``I_l = mean_h |A ⊙ ∂L/∂A|``: group importances, ``S_vv``,
  ``S_vt``, block heat maps.
* :func:`flow_blocking` — block img2txt / img2img / img2rnd at a layer (logits to ``-inf``): score
  and label consistency, prediction bias, bias ratio ``D_l``.
* :func:`attention_share` — the last input token's attention per token group.
* :func:`logit_lens` — the last input token's hidden state of every layer read through the LM head.
"""

from __future__ import annotations

from himap_vlm.apps.analysis.attention import AttentionShareResult, attention_share
from himap_vlm.apps.analysis.blocking import (
    FLOWS,
    BlockingResult,
    BlockSpec,
    block_flow,
    block_spec,
    flow_blocking,
)
from himap_vlm.apps.analysis.groups import ALL_GROUPS, GROUPS, TokenGroups, token_groups
from himap_vlm.apps.analysis.logit_lens import LogitLensResult, logit_lens
from himap_vlm.apps.analysis.saliency import SaliencyResult, saliency, saliency_map, taylor_terms

__all__ = [
    "ALL_GROUPS",
    "FLOWS",
    "GROUPS",
    "AttentionShareResult",
    "BlockSpec",
    "BlockingResult",
    "LogitLensResult",
    "SaliencyResult",
    "TokenGroups",
    "attention_share",
    "block_flow",
    "block_spec",
    "flow_blocking",
    "logit_lens",
    "saliency",
    "saliency_map",
    "taylor_terms",
    "token_groups",
]
