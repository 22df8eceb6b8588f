"""Flow blocking: the prediction after forbidding one visual flow (HiMAP §3.2–3.3, suppl. §10–11).

For every sample and every (flow, first blocked layer ``l``) the model generates greedily with the
flow blocked (:mod:`himap_vlm.apps.analysis.masking`) and is compared with its undisturbed run.
Two conventions (:mod:`himap_vlm.apps.analysis.conventions`):

* ``authors`` (default; ``src/HiMAP/validate/disruption_forward.py`` and ``attn_disruption.py``):
  the flow is blocked in layers ``l … L−1`` (their mask edit is in place and reaches every later
  layer); ``img2rnd`` rows are redrawn at every forward pass (full recompute, as their
  ``use_cache=False`` generation); 8 generated tokens; the label metric is ``answer_retained`` (the
  reference answer is a raw substring of the blocked output); means are taken over the samples
  the undisturbed model answers correctly (their question files were filtered that way).
* ``paper``: layer ``l`` only (``span`` layers); ``img2rnd`` rows drawn once per sample and layer;
  5 generated tokens; the label metric is ``output_unchanged`` (blocked text equals undisturbed
  text, the paper's "consistent before and after disruption"); answers judged by normalised
  whole-word containment; means over all samples.

Metrics, each blocked run against the undisturbed run of the same sample:

* ``score_consistency``: Jaccard similarity of the top-5 token ids of the first generated token;
* ``output_unchanged``: the normalised blocked text equals the normalised undisturbed text;
* ``answer_retained``: among samples whose undisturbed output contains the reference answer, the
  fraction whose blocked output still does (answer rule of the convention);
* ``accuracy``: fraction of all samples whose blocked output contains the answer;
* ``prediction_bias`` ``E_x,l = 1 − SC_x,l / SC_0`` and ``bias_ratio`` ``D_l = log(E_vv,l / E_vt,l)``
  (suppl. eq. 11–12, paper eq. 7), with ``SC_0`` a second undisturbed run through the hooks.

Both label metrics are computed under both conventions; ``BlockingResult.label_metric`` names
the one that plays the paper's "label consistency".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from himap_vlm.apps.analysis._common import (
    AnalysisSession,
    PreparedSample,
    Progress,
    answer_in_output,
    as_list,
    normalise_answer,
    prepare_sample,
    resolve_layers,
)
from himap_vlm.apps.analysis.blocking_result import METRICS, BlockingResult
from himap_vlm.apps.analysis.conventions import DEFAULT_CONVENTION, get_convention
from himap_vlm.apps.analysis.masking import (
    DEFAULT_FLOWS,
    FLOWS,
    BlockSpec,
    block_flow,
    block_spec,
    blocking_session,
)

__all__ = [
    "DEFAULT_FLOWS",
    "METRICS",
    "FLOWS",
    "BlockSpec",
    "BlockingResult",
    "block_flow",
    "block_spec",
    "flow_blocking",
    "jaccard",
]

# ---------------------------------------------------------------------- generation


@dataclass
class _Run:
    top: set[int]
    text: str


def _repeat(inputs: Any, times: int) -> dict[str, Any]:
    """Every tensor of a batch-of-one processor output repeated ``times`` along dim 0.

    Per-image tensors (``pixel_values``, ``image_sizes``, ``image_grid_thw``, ...) are stacked over
    images in sample order, so repeating them along dim 0 gives ``times`` copies of the sample.
    """
    out: dict[str, Any] = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = value.repeat(times, *([1] * (value.dim() - 1)))
        else:
            out[key] = value
    return out


def _generate(
    model: torch.nn.Module,
    processor: Any,
    prep: PreparedSample,
    max_new_tokens: int,
    topk: int,
    rows: int = 1,
    use_cache: bool = True,
    image_token_id: int | None = None,
) -> list[_Run]:
    """Greedy generation of ``rows`` copies of the sample; top-k of the first token and the text per row.

    ``use_cache=False`` recomputes every position at every step (the authors' generation; needed
    when the blocked rows change from one forward pass to the next). ``image_token_id`` is never
    generated (a generated placeholder would be read as an image slot by the next full pass); the
    top-k comes from the raw logits, before that suppression.
    """
    inputs = prep.inputs if rows == 1 else _repeat(prep.inputs, rows)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=use_cache,
        suppress_tokens=None if image_token_id is None else [image_token_id],
        output_logits=True,
        return_dict_in_generate=True,
    )
    first = out.logits[0].float()  # (rows, V)
    top = first.topk(min(topk, first.shape[-1]), dim=-1).indices
    tokenizer = getattr(processor, "tokenizer", processor)
    texts = tokenizer.batch_decode(out.sequences[:, prep.length :], skip_special_tokens=True)
    return [_Run(top={int(i) for i in top[r]}, text=texts[r]) for r in range(rows)]


def jaccard(a: set[int], b: set[int]) -> float:
    """``|a ∩ b| / |a ∪ b|`` (1.0 for two empty sets)."""
    union = a | b
    return len(a & b) / len(union) if union else 1.0


# ---------------------------------------------------------------------- the measurement


def _windows(starts: Sequence[int], span: int | None, num_layers: int) -> list[tuple[int, int]]:
    return [(s, num_layers if span is None else min(s + span, num_layers)) for s in starts]


def flow_blocking(
    model: torch.nn.Module,
    processor: Any,
    samples: Iterable[Mapping[str, Any]],
    *,
    layers: int | Sequence[int] | None = None,
    flows: Sequence[str] = DEFAULT_FLOWS,
    convention: str = DEFAULT_CONVENTION,
    span: int | None = None,
    seed: int = 0,
    max_new_tokens: int | None = None,
    topk: int = 5,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> BlockingResult:
    """Block each flow from each layer on and compare the predictions with the undisturbed run.

    For every sample: one undisturbed greedy generation, then — as rows of batched generations
    of the same prompt, each row with its own mask — one control run through the hooks with
    nothing blocked (``SC_0``) and one blocked run per (flow, layer).

    Parameters
    ----------
    model : nn.Module
    processor
    samples : iterable of mapping
        ``{image, question, answer}`` records (see :func:`himap_vlm.apps.analysis.saliency`).
    layers : int, sequence of int, or None
        First blocked layer of each run (``None``: every layer, one run each).
    flows : sequence of str
        Any of :data:`FLOWS`.
    convention : {"authors", "paper"}
        ``"authors"`` (default, reproduces the published figures) or ``"paper"``; see the module
        docstring and :mod:`himap_vlm.apps.analysis.conventions`.
    span : int, optional
        Layers blocked per run; ``None``: the convention's window (``authors``: to the last layer,
        ``paper``: 1). A value that differs is recorded in ``overrides``.
    seed : int
        Seed of ``img2rnd``'s random rows (per sample and layer from ``(seed, sample, layer)``).
    max_new_tokens : int, optional
        Greedy tokens per run; ``None``: the convention's (8 / 5).
    topk : int
        Size of the token sets of the score consistency (5 in the paper).
    batch_size : int
        Runs of one sample generated together as rows of one batch (each row with its own
        blocking mask); lower it to bound memory on large models.
    progress : callable, optional
        Called with ``1`` after every sample.

    Returns
    -------
    BlockingResult
    """
    conv = get_convention(convention)
    records = as_list(samples)
    flows = tuple(flows)
    for f in flows:
        if f not in FLOWS:
            raise ValueError(f"unknown flow {f!r}; choose from {FLOWS}")
    if span is not None and span < 1:
        raise ValueError(f"span must be >= 1 (or None for the convention's window), got {span}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    overrides: dict[str, Any] = {}
    if span is not None and span != conv.default_span:
        overrides["span"] = span
    if max_new_tokens is not None and max_new_tokens != conv.max_new_tokens:
        overrides["max_new_tokens"] = max_new_tokens
    span = conv.default_span if span is None else span
    n_new = conv.max_new_tokens if max_new_tokens is None else max_new_tokens
    with AnalysisSession(model) as session:
        n_layers = session.num_layers
        starts = resolve_layers(layers, n_layers)
        windows = _windows(starts, span, n_layers)
        n, k = len(records), len(starts)
        sc = {f: np.zeros((n, k)) for f in flows}
        same = {f: np.zeros((n, k)) for f in flows}
        found = {f: np.zeros((n, k)) for f in flows}
        texts: dict[str, list[list[str]]] = {f: [[""] * k for _ in range(n)] for f in flows}
        sc0 = np.zeros(n)
        dense_found = np.zeros(n, dtype=bool)
        dense_text: list[str] = []
        runs: list[tuple[str, int]] = [("none", -1)] + [(f, j) for f in flows for j in range(k)]
        with torch.no_grad():
            for s, record in enumerate(records):
                prep = prepare_sample(session, processor, record)
                (dense,) = _generate(model, processor, prep, n_new, topk, image_token_id=session.image_token_id)
                dense_text.append(dense.text)
                dense_found[s] = answer_in_output(dense.text, prep.answer, prep.family, conv.answer_rule)
                specs: dict[tuple[str, int], BlockSpec] = {
                    (f, j): block_spec(prep.groups, f, np.random.default_rng([seed, s, starts[max(j, 0)]]),
                                       convention=conv)
                    for f, j in runs
                }
                # rows whose blocked set changes between forward passes need full-recompute generation
                groups = [[r for r in runs if specs[r].needs_full_recompute == recompute] for recompute in (False, True)]
                for recompute, group in zip((False, True), groups, strict=True):
                    for lo in range(0, len(group), batch_size):
                        chunk = group[lo : lo + batch_size]
                        layer_specs: dict[int, list[BlockSpec | None]] = {}
                        for r, (f, j) in enumerate(chunk):
                            start, stop = windows[max(j, 0)]
                            for layer in range(start, stop):
                                layer_specs.setdefault(layer, [None] * len(chunk))[r] = specs[(f, j)]
                        with blocking_session(model, layer_specs):
                            results = _generate(model, processor, prep, n_new, topk, rows=len(chunk),
                                                use_cache=not recompute, image_token_id=session.image_token_id)
                        for (f, j), run in zip(chunk, results, strict=True):
                            if j < 0:
                                sc0[s] = jaccard(run.top, dense.top)
                                continue
                            sc[f][s, j] = jaccard(run.top, dense.top)
                            same[f][s, j] = float(normalise_answer(run.text) == normalise_answer(dense.text))
                            found[f][s, j] = float(answer_in_output(run.text, prep.answer, prep.family,
                                                                    conv.answer_rule))
                            texts[f][s][j] = run.text
                if progress is not None:
                    progress(1)
    return BlockingResult(
        layers=starts,
        windows=windows,
        flows=flows,
        num_layers=n_layers,
        score_consistency=sc,
        output_unchanged=same,
        answer_found=found,
        score_consistency_dense=sc0,
        dense_answer_found=dense_found,
        dense_predictions=dense_text,
        convention=conv.name,
        predictions=texts,
        seed=seed,
        topk=topk,
        max_new_tokens=n_new,
        overrides=overrides,
    )
