"""Attention share of the last input token per token group (VTW paper, §"Unnecessity of Vision
Tokens in Deep Layers", Fig. 4).

For decoder layer ``l``, with ``A_l[h, i, j]`` the post-softmax attention and ``last`` the last
input position::

    share_l(X) = Σ_{j ∈ X} mean_h A_l[h, last, j]

for ``X`` in ``sys`` / ``img`` / ``ins`` / ``other`` (text between images). The shares of a layer
add up to 1. VTW reports that in LLaVA-1.5 the share of the (576) image tokens falls to a few
percent after the first layers while the (35) system tokens — an attention sink — take 80 % and
more. ``per_token`` divides a share by the group size (mean attention one token of the group gets).

The weights come from an eager forward pass (for this measurement only); only the last row of each
layer's map is kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from himap_vlm.apps.analysis._common import (
    AnalysisSession,
    Progress,
    as_list,
    jsonable,
    nanmean,
    nanstd,
    prepare_sample,
)
from himap_vlm.apps.analysis.groups import ALL_GROUPS, vector_group_sums
from himap_vlm.core import contract

DEFINITIONS: dict[str, str] = {
    "share": "sum over the group's tokens j of mean_h A_l[h, last, j] (last = last input token); groups add up "
    "to 1 per layer (VTW Fig. 4)",
    "per_token": "share divided by the group size",
    "groups": "sys = before the first image, img = image tokens, ins = after the last image, other = text "
    "between images",
    "std": "population standard deviation over samples",
}


@dataclass
class AttentionShareResult:
    """Attention of the last input token to every token group, per layer.

    Attributes
    ----------
    num_layers : int
    share : dict of str -> ndarray, shape (N, L)
        Per group (``sys``, ``img``, ``ins``, ``other``) and sample.
    group_sizes : dict of str -> ndarray, shape (N,)
    groups : tuple of str
    definitions : dict
    """

    num_layers: int
    share: dict[str, np.ndarray]
    group_sizes: dict[str, np.ndarray]
    groups: tuple[str, ...] = ALL_GROUPS
    definitions: dict[str, str] = field(default_factory=lambda: dict(DEFINITIONS))

    @property
    def n_samples(self) -> int:
        return int(next(iter(self.share.values())).shape[0])

    @property
    def per_layer(self) -> dict[str, np.ndarray]:
        """Mean share over samples per group, shape (L,)."""
        return {g: nanmean(v) for g, v in self.share.items()}

    @property
    def per_layer_std(self) -> dict[str, np.ndarray]:
        return {g: nanstd(v) for g, v in self.share.items()}

    @property
    def per_token(self) -> dict[str, np.ndarray]:
        """Mean over samples of share / group size, shape (L,) (NaN for a group empty everywhere)."""
        out = {}
        for g, v in self.share.items():
            size = self.group_sizes[g].astype(np.float64)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                out[g] = nanmean(np.where(size > 0, v / size, np.nan))
        return out

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "measurement": "attention_share",
                "reference": "VTW paper Fig. 4",
                "definitions": self.definitions,
                "num_layers": self.num_layers,
                "n_samples": self.n_samples,
                "groups": list(self.groups),
                "per_layer": self.per_layer,
                "per_layer_std": self.per_layer_std,
                "per_token": self.per_token,
                "group_sizes": self.group_sizes,
                "per_sample": self.share,
            }
        )


def attention_share(
    model: torch.nn.Module,
    processor: Any,
    samples: Iterable[Mapping[str, Any]],
    *,
    progress: Progress | None = None,
) -> AttentionShareResult:
    """Share of the last input token's attention going to each token group, per layer.

    Parameters
    ----------
    model : nn.Module
        A supported model (eager attention is used for this run only).
    processor
    samples : iterable of mapping
        ``{image, question, answer}`` records (``answer`` is not used).
    progress : callable, optional
        Called with ``1`` after every sample.

    Returns
    -------
    AttentionShareResult
    """
    records = as_list(samples)
    with AnalysisSession(model, attn_implementation="eager") as session:
        n_layers = session.num_layers
        share = {g: np.full((len(records), n_layers), np.nan) for g in ALL_GROUPS}
        sizes: dict[str, list[int]] = {g: [] for g in ALL_GROUPS}
        rows: dict[int, torch.Tensor] = {}

        def capture(layer_idx: int) -> Any:
            def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
                weights = contract.attention_weights(output)
                if weights is None:
                    raise RuntimeError(f"layer {layer_idx}: the attention module returned no weights")
                rows[layer_idx] = weights[0, :, -1, :].float().mean(0)  # (S,)

            return hook

        for idx, attn in enumerate(session.attn_modules):
            session.hook(attn.register_forward_hook(capture(idx)))
        with torch.no_grad():
            for n, record in enumerate(records):
                prep = prepare_sample(session, processor, record)
                rows.clear()
                model(**prep.inputs, use_cache=False, logits_to_keep=1)
                for layer in range(n_layers):
                    for g, v in vector_group_sums(rows[layer], prep.groups).items():
                        share[g][n, layer] = v
                for g, size in prep.groups.sizes.items():
                    sizes[g].append(size)
                if progress is not None:
                    progress(1)
    return AttentionShareResult(
        num_layers=n_layers, share=share, group_sizes={g: np.asarray(v) for g, v in sizes.items()}
    )
