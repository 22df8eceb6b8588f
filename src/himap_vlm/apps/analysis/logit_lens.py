"""Logit lens of the last input token per layer (VisiPruner paper §3.5 eq. 2, §5.2; nostalgebraist 2020).

For decoder layer ``l`` with output hidden state ``h_l`` at the last input position::

    D_l = softmax(lm_head(norm(h_l)))

(the language model's final norm, then the output embedding; Gemma-style final logit soft-capping
is applied when the config has it). The last layer's ``D`` is the model's own next-token
distribution. Reported per layer: the probability and rank (0 = top) of the reference answer's
first token, the top-1 token and its probability, the entropy, and whether the top-1 token is
already the model's final prediction. VisiPruner reads task words emerging in middle layers and the
answer in deep layers.
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

DEFINITIONS: dict[str, str] = {
    "D_l": "softmax(lm_head(final_norm(h_l[last]))), h_l = output of decoder layer l at the last input position "
    "(VisiPruner eq. 2)",
    "answer_prob": "D_l at the first token of the reference answer",
    "answer_rank": "rank of that token in D_l (0 = top-1)",
    "top1": "argmax of D_l (id and decoded text)",
    "top1_prob": "max of D_l",
    "entropy": "entropy of D_l in nats",
    "matches_final": "1 if the top-1 token of layer l equals the last layer's top-1 (the model's prediction)",
    "std": "population standard deviation over samples",
}

PER_SAMPLE_KEYS: tuple[str, ...] = ("answer_prob", "answer_rank", "top1_prob", "entropy", "matches_final")


@dataclass
class LogitLensResult:
    """Logit lens of the last input token over a set of samples.

    Attributes
    ----------
    num_layers : int
    per_sample : dict of str -> ndarray, shape (N, L)
        Keys :data:`PER_SAMPLE_KEYS`.
    top1_ids : ndarray of int64, shape (N, L)
    top1_tokens : list of list of str
        Decoded top-1 token per sample and layer.
    target_ids : list of int
        First answer token per sample.
    definitions : dict
    """

    num_layers: int
    per_sample: dict[str, np.ndarray]
    top1_ids: np.ndarray
    top1_tokens: list[list[str]]
    target_ids: list[int]
    definitions: dict[str, str] = field(default_factory=lambda: dict(DEFINITIONS))

    @property
    def n_samples(self) -> int:
        return int(self.top1_ids.shape[0])

    @property
    def per_layer(self) -> dict[str, np.ndarray]:
        """Mean over samples, shape (L,)."""
        return {k: nanmean(v) for k, v in self.per_sample.items()}

    @property
    def per_layer_std(self) -> dict[str, np.ndarray]:
        return {k: nanstd(v) for k, v in self.per_sample.items()}

    def most_common_top1(self) -> list[str]:
        """Per layer, the most frequent top-1 token over samples."""
        out = []
        for layer in range(self.num_layers):
            column = [row[layer] for row in self.top1_tokens]
            out.append(max(set(column), key=column.count) if column else "")
        return out

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "measurement": "logit_lens",
                "reference": "VisiPruner paper §3.5 eq. 2, §5.2",
                "definitions": self.definitions,
                "num_layers": self.num_layers,
                "n_samples": self.n_samples,
                "per_layer": self.per_layer,
                "per_layer_std": self.per_layer_std,
                "most_common_top1": self.most_common_top1(),
                "target_ids": self.target_ids,
                "per_sample": {**self.per_sample, "top1_ids": self.top1_ids, "top1_tokens": self.top1_tokens},
            }
        )


def lens_logits(session: AnalysisSession, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + lm_head (+ soft-capping) applied to hidden states, in float32.

    Parameters
    ----------
    hidden : Tensor, shape (..., D)

    Returns
    -------
    Tensor, shape (..., V)
    """
    logits = session.lm_head(session.norm(hidden)).float()
    cap = getattr(session.family.text_config(session.model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def logit_lens(
    model: torch.nn.Module,
    processor: Any,
    samples: Iterable[Mapping[str, Any]],
    *,
    progress: Progress | None = None,
) -> LogitLensResult:
    """Project the last input token's hidden state of every layer onto the vocabulary.

    Parameters
    ----------
    model : nn.Module
        A supported model (any attention implementation).
    processor
    samples : iterable of mapping
        ``{image, question, answer}`` records.
    progress : callable, optional
        Called with ``1`` after every sample.

    Returns
    -------
    LogitLensResult
    """
    records = as_list(samples)
    tokenizer = getattr(processor, "tokenizer", processor)
    with AnalysisSession(model) as session:
        n_layers = session.num_layers
        per_sample = {k: np.full((len(records), n_layers), np.nan) for k in PER_SAMPLE_KEYS}
        top1_ids = np.zeros((len(records), n_layers), dtype=np.int64)
        top1_tokens: list[list[str]] = []
        targets: list[int] = []
        last: dict[int, torch.Tensor] = {}

        def capture(layer_idx: int) -> Any:
            def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
                h = output[0] if isinstance(output, tuple) else output
                last[layer_idx] = h[0, -1].detach()

            return hook

        for idx, layer in enumerate(session.layers):
            session.hook(layer.register_forward_hook(capture(idx)))
        with torch.no_grad():
            for n, record in enumerate(records):
                prep = prepare_sample(session, processor, record)
                last.clear()
                model(**prep.inputs, use_cache=False, logits_to_keep=1)
                hidden = torch.stack([last[i] for i in range(n_layers)])  # (L, D)
                logp = torch.log_softmax(lens_logits(session, hidden), dim=-1)  # (L, V)
                probs = logp.exp()
                target = prep.target_id
                t_logp = logp[:, target]
                per_sample["answer_prob"][n] = probs[:, target].cpu().numpy()
                per_sample["answer_rank"][n] = (logp > t_logp[:, None]).sum(-1).cpu().numpy()
                top_p, top_i = probs.max(-1)
                per_sample["top1_prob"][n] = top_p.cpu().numpy()
                per_sample["entropy"][n] = (-(probs * logp).nan_to_num().sum(-1)).cpu().numpy()
                per_sample["matches_final"][n] = (top_i == top_i[-1]).float().cpu().numpy()
                top1_ids[n] = top_i.cpu().numpy()
                top1_tokens.append([tokenizer.decode([int(i)]) for i in top_i])
                targets.append(target)
                if progress is not None:
                    progress(1)
    return LogitLensResult(
        num_layers=n_layers, per_sample=per_sample, top1_ids=top1_ids, top1_tokens=top1_tokens, target_ids=targets
    )
