"""The result of :func:`himap_vlm.apps.analysis.flow_blocking`: per-sample metrics and their reductions.

:class:`BlockingResult` holds the per-sample arrays of one run of the measurement and reduces them
as its convention says (:mod:`himap_vlm.apps.analysis.conventions`): which samples the means are
taken over, which metric plays the paper's "label consistency", the prediction bias
``E_x,l = 1 − SC_x,l / SC_0`` and the bias ratio ``D_l = log(E_vv,l / E_vt,l)`` (HiMAP suppl.
eq. 11–12, paper eq. 7). It carries the convention into its JSON (``to_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from himap_vlm.apps.analysis._common import jsonable, nanmean, nanstd
from himap_vlm.apps.analysis.conventions import DEFAULT_CONVENTION, get_convention

METRICS: tuple[str, ...] = ("score_consistency", "output_unchanged", "answer_found")
"""Per-sample metrics of :class:`BlockingResult` (arrays of shape (N, len(layers)) per flow)."""


def _definitions(convention: str) -> dict[str, str]:
    conv = get_convention(convention)
    window = (
        "layers [l, L) (the authors' in-place mask edit reaches every later layer)"
        if conv.window == "to_last_layer"
        else "layers [l, l + span)"
    )
    rnd = (
        "as many random query rows as tokens after the image (generated ones included), among the positions "
        "after sys, redrawn at every forward pass (full recompute)"
        if conv.random_rows == "per_forward_pass"
        else "as many random query rows outside sys as there are instruction tokens, drawn once per sample and layer"
    )
    rule = (
        "the reference answer is a raw substring of the stripped output (authors' code)"
        if conv.answer_rule == "substring"
        else "the normalised reference answer occurs as whole words in the normalised output (synthetic records: "
        "their scorer)"
    )
    return {
        "convention": f"{conv.name} ({conv.title})",
        "blocking": f"attention logits of the blocked (query, key) pairs set to -inf before the softmax, in {window}",
        "img2txt": "queries: tokens after the last image (and generated tokens); keys: image tokens",
        "img2img": "queries and keys: image tokens",
        "img2rnd": f"control, keys: image tokens; queries: {rnd}",
        "none": "control: hooks installed, nothing masked",
        "score_consistency": "Jaccard similarity of the top-5 token ids of the first generated token, blocked vs "
        "undisturbed",
        "output_unchanged": "1 if the normalised blocked output equals the normalised undisturbed output",
        "answer_found": f"1 if {rule}",
        "answer_retained": "among samples whose undisturbed output contains the answer, fraction whose blocked output "
        "still does (NaN when there is none)",
        "accuracy": "fraction of all samples whose blocked output contains the answer",
        "label_metric": f"{conv.label_metric}: the metric that plays the paper's 'label consistency' here",
        "samples_used": "samples the means are taken over: "
        + ("those whose undisturbed output contains the answer" if conv.samples == "dense_correct" else "all"),
        "prediction_bias": "E_x,l = 1 - SC_x,l / SC_0 (mean score consistencies over the samples used; SC_0 = "
        "undisturbed vs a second undisturbed run)",
        "bias_ratio": "D_l = log(E_img2img,l / E_img2txt,l); > 0: intra-visual flow dominates at layer l",
        "std": "population standard deviation over the samples used",
    }


@dataclass
class BlockingResult:
    """Flow-blocking measurements over a set of samples.

    Attributes
    ----------
    layers : list of int
        First blocked layer ``l`` of every run (one column per entry).
    windows : list of (int, int)
        Blocked layers ``[start, stop)`` of every run.
    flows : tuple of str
    num_layers : int
        Decoder layers of the model.
    convention : {"authors", "paper"}
    score_consistency, output_unchanged, answer_found : dict of str -> ndarray, shape (N, len(layers))
        Per flow and sample (see :data:`METRICS` and ``definitions``).
    score_consistency_dense : ndarray, shape (N,)
        ``SC_0`` per sample: a second undisturbed run (through the hooks) vs the first.
    dense_answer_found : ndarray of bool, shape (N,)
        Whether the undisturbed output contains the answer (answer rule of the convention).
    dense_predictions : list of str
    predictions : dict of str -> list of list of str
        Blocked outputs per flow, ``[sample][column]``.
    seed, topk, max_new_tokens : int
    overrides : dict
        Settings given explicitly that differ from the convention's (e.g. ``span``).
    definitions : dict
    """

    layers: list[int]
    windows: list[tuple[int, int]]
    flows: tuple[str, ...]
    num_layers: int
    score_consistency: dict[str, np.ndarray]
    output_unchanged: dict[str, np.ndarray]
    answer_found: dict[str, np.ndarray]
    score_consistency_dense: np.ndarray
    dense_answer_found: np.ndarray
    dense_predictions: list[str]
    convention: str = DEFAULT_CONVENTION
    predictions: dict[str, list[list[str]]] = field(default_factory=dict)
    seed: int = 0
    topk: int = 5
    max_new_tokens: int = 8
    overrides: dict[str, Any] = field(default_factory=dict)
    definitions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_convention(self.convention)
        self.dense_answer_found = np.asarray(self.dense_answer_found, dtype=bool)
        if not self.definitions:
            self.definitions = _definitions(self.convention)

    @property
    def n_samples(self) -> int:
        return int(self.dense_answer_found.shape[0])

    @property
    def label_metric(self) -> str:
        """The metric that plays the paper's "label consistency" under this convention."""
        return get_convention(self.convention).label_metric

    @property
    def samples_used(self) -> np.ndarray:
        """Bool (N,): the samples means are taken over (``authors``: undisturbed output correct)."""
        if get_convention(self.convention).samples == "dense_correct":
            return self.dense_answer_found.copy()
        return np.ones(self.n_samples, dtype=bool)

    @property
    def n_used(self) -> int:
        return int(self.samples_used.sum())

    def _per_sample(self, metric: str) -> dict[str, np.ndarray]:
        if metric == "answer_retained":
            return {f: np.where(self.dense_answer_found[:, None], v, np.nan) for f, v in self.answer_found.items()}
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {(*METRICS, 'answer_retained')}")
        return getattr(self, metric)

    def mean(self, metric: str) -> dict[str, np.ndarray]:
        """Per flow, mean over :attr:`samples_used` of ``metric``, shape (len(layers),) (NaN when none).

        ``metric``: one of :data:`METRICS` or ``"answer_retained"`` (always over the samples whose
        undisturbed output contains the answer).
        """
        used = self.samples_used
        return {f: nanmean(v[used]) if used.any() else np.full(len(self.layers), np.nan)
                for f, v in self._per_sample(metric).items()}

    def std(self, metric: str) -> dict[str, np.ndarray]:
        """Per flow, population std over :attr:`samples_used` of ``metric``, shape (len(layers),)."""
        used = self.samples_used
        return {f: nanstd(v[used]) if used.any() else np.full(len(self.layers), np.nan)
                for f, v in self._per_sample(metric).items()}

    @property
    def answer_retained(self) -> dict[str, np.ndarray]:
        """Per flow, fraction of the undisturbed-correct samples still correct (NaN when none)."""
        return self.mean("answer_retained")

    @property
    def label_consistency(self) -> dict[str, np.ndarray]:
        """Per flow, the mean of :attr:`label_metric` (the convention's reading of label consistency)."""
        return self.mean(self.label_metric)

    @property
    def accuracy(self) -> dict[str, np.ndarray]:
        """Per flow, fraction of all samples whose blocked output contains the answer, shape (len(layers),)."""
        return {f: nanmean(v) for f, v in self.answer_found.items()}

    @property
    def accuracy_dense(self) -> float:
        return float(self.dense_answer_found.mean()) if self.n_samples else float("nan")

    @property
    def sc0(self) -> float:
        """Mean ``SC_0`` over :attr:`samples_used`."""
        used = self.samples_used
        return float(np.mean(self.score_consistency_dense[used])) if used.any() else float("nan")

    @property
    def prediction_bias(self) -> dict[str, np.ndarray]:
        """Per flow, ``E_x,l = 1 - mean SC_x,l / mean SC_0`` over :attr:`samples_used`."""
        sc0 = self.sc0
        return {f: 1.0 - m / sc0 for f, m in self.mean("score_consistency").items()}

    def bias_ratio(self, vv: str = "img2img", vt: str = "img2txt") -> np.ndarray | None:
        """``D_l = log(E_vv,l / E_vt,l)``, shape (len(layers),); ``None`` unless both flows were run.

        NaN / ±inf where a bias is zero (the blocked flow changed no top-5 set).
        """
        if vv not in self.flows or vt not in self.flows:
            return None
        e = self.prediction_bias
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(e[vv] / e[vt])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (NaN / inf -> ``None``)."""
        return jsonable(
            {
                "measurement": "blocking",
                "convention": self.convention,
                "convention_settings": get_convention(self.convention).to_dict(),
                "overrides": self.overrides,
                "reference": "HiMAP paper §3.2-3.3 (Fig. 5-6), supplement §10-11",
                "definitions": self.definitions,
                "num_layers": self.num_layers,
                "n_samples": self.n_samples,
                "n_used": self.n_used,
                "layers": self.layers,
                "windows": [list(w) for w in self.windows],
                "flows": list(self.flows),
                "seed": self.seed,
                "topk": self.topk,
                "max_new_tokens": self.max_new_tokens,
                "label_metric": self.label_metric,
                "score_consistency": self.mean("score_consistency"),
                "score_consistency_std": self.std("score_consistency"),
                "answer_retained": self.answer_retained,
                "answer_retained_std": self.std("answer_retained"),
                "output_unchanged": self.mean("output_unchanged"),
                "output_unchanged_std": self.std("output_unchanged"),
                "accuracy": self.accuracy,
                "accuracy_dense": self.accuracy_dense,
                "score_consistency_dense": self.sc0,
                "prediction_bias": self.prediction_bias,
                "bias_ratio": self.bias_ratio(),
                "dense_predictions": self.dense_predictions,
                "per_sample": {
                    "samples_used": self.samples_used,
                    "score_consistency": self.score_consistency,
                    "output_unchanged": self.output_unchanged,
                    "answer_found": self.answer_found,
                    "dense_answer_found": self.dense_answer_found,
                    "score_consistency_dense": self.score_consistency_dense,
                    "predictions": self.predictions,
                },
            }
        )


