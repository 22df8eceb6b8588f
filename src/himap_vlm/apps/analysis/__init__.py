"""Information-flow analysis of multimodal LLMs (HiMAP §2–3, VTW Fig. 4, VisiPruner §3.5/§5.2).

Every measurement takes ``(model, processor, samples)`` with samples ``{image, question, answer}``
records, processes one sample at a time, switches the model only for its own run (attention
implementation, ``requires_grad`` flags, hooks) and restores it afterwards. Results are plain
dataclasses of NumPy arrays (per sample and per layer, mean and std over samples) with a
``to_dict()`` for JSON; :mod:`himap_vlm.apps.analysis.plots` draws them. See ``docs/analysis.md``.

* :func:`saliency` — Taylor saliency ``I_l = mean_h |A^p ⊙ ∂L/∂A|`` (``p = 2`` in the authors' code,
  ``1`` in the paper's eq. 1): group importances, ``S_vv``, ``S_vt``, block heat maps.
* :func:`flow_blocking` — block img2txt / img2img / img2rnd from a layer on (logits to ``-inf``):
  score consistency, answer retained / output unchanged, prediction bias, bias ratio ``D_l``.

:func:`saliency`, :func:`flow_blocking` and ``himap analyze`` take ``convention="authors"`` (the
default: the HiMAP authors' code, which made the published figures) or ``convention="paper"``
(the paper's text); :mod:`himap_vlm.apps.analysis.conventions` lists every difference.
* :func:`attention_share` — the last input token's attention per token group.
* :func:`logit_lens` — the last input token's hidden state of every layer read through the LM head.
"""

from __future__ import annotations

from himap_vlm.apps.analysis.attention import AttentionShareResult, attention_share
from himap_vlm.apps.analysis.blocking import BlockingResult, flow_blocking
from himap_vlm.apps.analysis.conventions import CONVENTIONS, Convention, get_convention
from himap_vlm.apps.analysis.groups import ALL_GROUPS, GROUPS, TokenGroups, token_groups
from himap_vlm.apps.analysis.logit_lens import LogitLensResult, logit_lens
from himap_vlm.apps.analysis.masking import FLOWS, BlockSpec, block_flow, block_spec
from himap_vlm.apps.analysis.saliency import SaliencyResult, saliency, saliency_map, taylor_terms

__all__ = [
    "ALL_GROUPS",
    "CONVENTIONS",
    "FLOWS",
    "GROUPS",
    "AttentionShareResult",
    "BlockSpec",
    "BlockingResult",
    "Convention",
    "LogitLensResult",
    "SaliencyResult",
    "TokenGroups",
    "attention_share",
    "block_flow",
    "block_spec",
    "flow_blocking",
    "get_convention",
    "logit_lens",
    "saliency",
    "saliency_map",
    "taylor_terms",
    "token_groups",
]
