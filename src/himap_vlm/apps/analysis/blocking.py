"""Flow blocking: forbid one visual information flow at one layer (HiMAP paper §3.2–3.3, suppl. §10–11).

At the blocked layer(s), the attention *logits* of the chosen (query, key) pairs are set to
``-inf`` before the softmax (the reference code's procedure; the softmax renormalises over the
keys left). This is done by handing the attention module of that layer a modified additive (eager)
or boolean (SDPA) mask through a forward pre-hook; every other layer is untouched. Flows:

``img2txt``
    queries in ``ins`` (tokens after the last image), keys in ``img`` — the visual → textual flow.
    Generated tokens are also after the last image, so their queries are blocked too during decode
    steps (as with the reference code's ``use_cache=False`` generation).
``img2img``
    queries and keys in ``img`` — the intra-visual flow.
``img2rnd``
    control: as many random query rows as there are ``ins`` tokens, drawn (seeded) from the
    positions outside ``sys`` (image, instruction, text between images), keys in ``img``.
``none``
    control: the hooks run, nothing is masked (consistency 1.0 by construction).

Metrics, each blocked run against the undisturbed run of the same sample (greedy decoding):

* score consistency: Jaccard similarity of the top-5 token ids of the first generated token;
* label consistency: the blocked run generates the same answer (normalised text) as the
  undisturbed run ("label loyalty");
* answer retention: among the samples whose undisturbed prediction contains the reference answer,
  the fraction whose blocked prediction still does (the authors' code judges predictions by
  whether they contain the reference answer); ``accuracy`` is the plain fraction of blocked
  predictions that contain it;
* prediction bias ``E_x,l = 1 - SC_x,l / SC_0`` with ``SC_0`` the score consistency of the
  undisturbed model (measured by a second undisturbed run through the same hooks: 1.0 on
  deterministic hardware), and the bias ratio ``D_l = log(E_vv,l / E_vt,l)`` (``vv`` = img2img,
  ``vt`` = img2txt; suppl. eq. 11–12, paper eq. 7). ``D_l > 0``: the intra-visual flow matters
  more at layer ``l``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from himap_vlm.apps.analysis._common import (
    AnalysisSession,
    PreparedSample,
    Progress,
    as_list,
    contains_answer,
    jsonable,
    nanmean,
    nanstd,
    normalise_answer,
    prepare_sample,
    resolve_layers,
)
from himap_vlm.apps.analysis.groups import TokenGroups
from himap_vlm.core import contract

FLOWS: tuple[str, ...] = ("img2txt", "img2img", "img2rnd", "none")
"""Every flow :func:`block_flow` knows."""

DEFAULT_FLOWS: tuple[str, ...] = ("img2txt", "img2img", "img2rnd")

DEFINITIONS: dict[str, str] = {
    "blocking": "attention logits of the blocked (query, key) pairs set to -inf before the softmax, at layers "
    "[l, l + span) only",
    "img2txt": "queries: tokens after the last image (and generated tokens); keys: image tokens",
    "img2img": "queries and keys: image tokens",
    "img2rnd": "control: as many random query rows outside sys as there are instruction tokens (seeded); keys: "
    "image tokens",
    "none": "control: hooks installed, nothing masked",
    "score_consistency": "Jaccard similarity of the top-5 token ids of the first generated token, blocked vs "
    "undisturbed",
    "label_consistency": "1 if the blocked run generates the same (normalised) answer as the undisturbed run",
    "answer_retention": "among samples whose undisturbed prediction contains the reference answer, fraction whose "
    "blocked prediction still does (NaN when there is none)",
    "accuracy": "fraction of blocked predictions that contain the reference answer",
    "prediction_bias": "E_x,l = 1 - SC_x,l / SC_0 (mean score consistencies; SC_0 = undisturbed vs a second "
    "undisturbed run)",
    "bias_ratio": "D_l = log(E_img2img,l / E_img2txt,l); > 0: intra-visual flow dominates at layer l",
    "std": "population standard deviation over samples",
}


# ---------------------------------------------------------------------- the blocking hooks


@dataclass(frozen=True)
class BlockSpec:
    """Which (query, key) pairs are blocked, in prompt positions.

    Attributes
    ----------
    rows : ndarray of int64
        Blocked query positions of the prompt.
    cols : ndarray of int64
        Blocked key positions of the prompt.
    generated_rows : bool
        Whether queries at positions ``>= prompt_length`` (generated tokens) are blocked too.
    prompt_length : int
    """

    rows: np.ndarray
    cols: np.ndarray
    generated_rows: bool
    prompt_length: int


def block_spec(groups: TokenGroups, flow: str, rng: np.random.Generator | None = None) -> BlockSpec:
    """The (query, key) sets of ``flow`` for a prompt with token groups ``groups``.

    Parameters
    ----------
    groups : TokenGroups
    flow : {"img2txt", "img2img", "img2rnd", "none"}
    rng : numpy Generator, optional
        Draws the random rows of ``img2rnd`` (default: seed 0).

    Raises
    ------
    ValueError
        For an unknown flow, or when an image query would be left with no key (no token before the
        first image).
    """
    empty = np.zeros(0, dtype=np.int64)
    if flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}; choose from {FLOWS}")
    if flow == "none":
        return BlockSpec(empty, empty, False, groups.length)
    if flow in ("img2img", "img2rnd") and len(groups.sys) == 0:
        raise ValueError(
            f"flow {flow!r} blocks image queries from every image key, but the prompt has no token before the "
            "first image: those queries would have no key left"
        )
    if flow == "img2txt":
        return BlockSpec(groups.ins, groups.img, True, groups.length)
    if flow == "img2img":
        return BlockSpec(groups.img, groups.img, False, groups.length)
    rng = rng if rng is not None else np.random.default_rng(0)
    pool = groups.outside_sys
    rows = np.sort(rng.choice(pool, size=min(len(groups.ins), len(pool)), replace=False)).astype(np.int64)
    return BlockSpec(rows, groups.img, False, groups.length)


def _blocked_pairs(spec: BlockSpec | None, offset: int, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Bool (q_len, k_len): True where query ``offset + a`` may not see key ``j`` (all False for ``None``)."""
    if spec is None:
        return torch.zeros(q_len, k_len, dtype=torch.bool, device=device)
    q_pos = torch.arange(offset, offset + q_len, device=device)
    row_blocked = torch.zeros(q_len, dtype=torch.bool, device=device)
    if len(spec.rows):
        row_blocked |= torch.isin(q_pos, torch.as_tensor(spec.rows, device=device))
    if spec.generated_rows:
        row_blocked |= q_pos >= spec.prompt_length
    col_blocked = torch.zeros(k_len, dtype=torch.bool, device=device)
    cols = torch.as_tensor(spec.cols[spec.cols < k_len], dtype=torch.long, device=device)
    col_blocked[cols] = True
    return row_blocked[:, None] & col_blocked[None, :]


def _block_mask(
    mask: Any,
    specs: Sequence[BlockSpec | None],
    offset: int,
    q_len: int,
    eager: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The layer's mask with each batch row's blocked pairs removed.

    Parameters
    ----------
    mask : Tensor of shape (B or 1, 1, q_len, K) (float additive or bool "allowed"), or None
        The mask the layer was given (``None``: plain causal, SDPA without padding).
    specs : sequence of BlockSpec or None, length B
        What each batch row blocks at this layer (``None``: nothing).

    Returns
    -------
    Tensor, shape (B, 1, q_len, K)
        Float masks get ``-inf`` at the blocked pairs, bool masks ``False``.
    """
    b = len(specs)
    if mask is None:
        k_len = offset + q_len
        q_pos = torch.arange(offset, offset + q_len, device=device)
        causal = torch.arange(k_len, device=device)[None, :] <= q_pos[:, None]
        mask = causal[None, None].expand(b, 1, q_len, k_len)
        if eager:
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, float("-inf"))
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise TypeError(f"flow blocking needs a 4-D tensor attention mask (eager or SDPA); got {type(mask).__name__}")
    if mask.shape[0] not in (1, b):
        raise ValueError(f"flow blocking: mask batch {mask.shape[0]} does not match {b} blocking rows")
    blocked = torch.stack(
        [_blocked_pairs(spec, offset, mask.shape[-2], mask.shape[-1], mask.device) for spec in specs]
    )[:, None]  # (B, 1, q, K)
    mask = mask.expand(b, *mask.shape[1:])
    if mask.dtype == torch.bool:
        return mask & ~blocked
    return mask.masked_fill(blocked, float("-inf"))


def _install_block_hooks(session: AnalysisSession, layer_specs: Mapping[int, Sequence[BlockSpec | None]]) -> None:
    """Pre-hooks on the attention modules of ``layer_specs``' layers (one spec per batch row)."""
    eager = session.attn_implementation == "eager"

    def make(layer_idx: int, specs: Sequence[BlockSpec | None]) -> Any:
        def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                hidden = args[0]
            elif "hidden_states" in kwargs:
                hidden = kwargs["hidden_states"]
            else:
                raise RuntimeError("flow blocking: the attention module was called without hidden_states")
            if "attention_mask" not in kwargs and len(args) > 1:
                raise RuntimeError("flow blocking expects the attention mask as the 'attention_mask' keyword")
            rows = list(specs)
            if len(rows) == 1 and hidden.shape[0] > 1:
                rows = rows * hidden.shape[0]  # one spec for every (identical) row
            if hidden.shape[0] != len(rows):
                raise ValueError(f"flow blocking: batch of {hidden.shape[0]} rows, {len(rows)} blocking specs")
            cache = session.contract.find_cache(kwargs, f"the attention module of layer {layer_idx}")
            offset = contract.cache_length(cache, layer_idx)
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = _block_mask(
                kwargs.get("attention_mask"), rows, offset, hidden.shape[1], eager, hidden.dtype, hidden.device
            )
            return args, kwargs

        return pre_hook

    for layer, specs in layer_specs.items():
        session.hook(session.attn_modules[layer].register_forward_pre_hook(make(layer, list(specs)), with_kwargs=True))


@contextlib.contextmanager
def _blocking_session(model: torch.nn.Module, layer_specs: Mapping[int, Sequence[BlockSpec | None]]) -> Iterator[None]:
    current = AnalysisSession(model).attn_implementation
    with AnalysisSession(model, attn_implementation=None if current in ("eager", "sdpa") else "sdpa") as session:
        _install_block_hooks(session, layer_specs)
        yield


@contextlib.contextmanager
def block_flow(
    model: torch.nn.Module,
    groups: TokenGroups,
    flow: str,
    layers: int | Sequence[int],
    *,
    seed: int = 0,
    rng: np.random.Generator | None = None,
) -> Iterator[BlockSpec]:
    """Block ``flow`` at ``layers`` while the context is open (forward calls of one sample).

    Installs a forward pre-hook on the attention module of each blocked layer that replaces its
    ``attention_mask`` keyword with one where the blocked (query, key) logits are ``-inf``.
    Works for prefill and for decode steps (the query positions are read from the layer's cache
    length). The attention implementation stays as it is when it is ``eager`` or ``sdpa``; any
    other (flash, flex) is switched to ``sdpa`` for the context. Everything is restored on exit.

    Parameters
    ----------
    model : nn.Module
    groups : TokenGroups
        Groups of the prompt that will be run (batch of one, or identical rows).
    flow : {"img2txt", "img2img", "img2rnd", "none"}
    layers : int or sequence of int
        Blocked layer(s).
    seed : int
        Seed of ``img2rnd``'s rows (when ``rng`` is not given).
    rng : numpy Generator, optional

    Yields
    ------
    BlockSpec
        The blocked pairs.
    """
    with AnalysisSession(model) as session:
        blocked = resolve_layers(layers, session.num_layers)
    spec = block_spec(groups, flow, rng if rng is not None else np.random.default_rng(seed))
    with _blocking_session(model, {layer: [spec] for layer in blocked}):
        yield spec


# ---------------------------------------------------------------------- the measurement


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
    model: torch.nn.Module, processor: Any, prep: PreparedSample, max_new_tokens: int, topk: int, rows: int = 1
) -> list[_Run]:
    """Greedy generation of ``rows`` copies of the sample; top-k of the first token and the text per row."""
    inputs = prep.inputs if rows == 1 else _repeat(prep.inputs, rows)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
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


@dataclass
class BlockingResult:
    """Flow-blocking measurements over a set of samples.

    Attributes
    ----------
    layers : list of int
        First blocked layer of every run; run ``k`` blocks layers ``[layers[k], layers[k] + span)``
        (clipped to the model).
    span : int
        Layers blocked per run.
    flows : tuple of str
    num_layers : int
        Decoder layers of the model.
    score_consistency, label_consistency, correct : dict of str -> ndarray, shape (N, len(layers))
        Per flow and sample; ``correct`` is 1.0 where the blocked prediction contains the
        reference answer.
    score_consistency_dense : ndarray, shape (N,)
        ``SC_0`` per sample: a second undisturbed run (through the hooks) vs the first.
    dense_correct : ndarray of bool, shape (N,)
    dense_predictions : list of str
    seed : int
    topk : int
    max_new_tokens : int
    definitions : dict
    """

    layers: list[int]
    span: int
    flows: tuple[str, ...]
    num_layers: int
    score_consistency: dict[str, np.ndarray]
    label_consistency: dict[str, np.ndarray]
    correct: dict[str, np.ndarray]
    score_consistency_dense: np.ndarray
    dense_correct: np.ndarray
    dense_predictions: list[str]
    seed: int = 0
    topk: int = 5
    max_new_tokens: int = 5
    definitions: dict[str, str] = field(default_factory=lambda: dict(DEFINITIONS))

    @property
    def n_samples(self) -> int:
        return int(self.dense_correct.shape[0])

    def mean(self, metric: str) -> dict[str, np.ndarray]:
        """Per flow, mean over samples of ``metric`` (``score_consistency``, ``label_consistency``,
        ``correct``), shape (len(layers),)."""
        return {f: nanmean(v) for f, v in getattr(self, metric).items()}

    def std(self, metric: str) -> dict[str, np.ndarray]:
        """Per flow, standard deviation over samples of ``metric``, shape (len(layers),)."""
        return {f: nanstd(v) for f, v in getattr(self, metric).items()}

    @property
    def accuracy(self) -> dict[str, np.ndarray]:
        """Per flow, fraction of blocked predictions containing the reference answer, shape (len(layers),)."""
        return self.mean("correct")

    @property
    def accuracy_dense(self) -> float:
        return float(self.dense_correct.mean())

    @property
    def answer_retention(self) -> dict[str, np.ndarray]:
        """Per flow, fraction of the undisturbed-correct samples still correct (NaN when none)."""
        if not self.dense_correct.any():
            return {f: np.full(len(self.layers), np.nan) for f in self.flows}
        return {f: v[self.dense_correct].mean(0) for f, v in self.correct.items()}

    @property
    def prediction_bias(self) -> dict[str, np.ndarray]:
        """Per flow, ``E_x,l = 1 - mean SC_x,l / mean SC_0``, shape (len(layers),)."""
        sc0 = float(np.mean(self.score_consistency_dense))
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
                "reference": "HiMAP paper §3.2-3.3 (Fig. 5-6), supplement §10-11",
                "definitions": self.definitions,
                "num_layers": self.num_layers,
                "n_samples": self.n_samples,
                "layers": self.layers,
                "span": self.span,
                "flows": list(self.flows),
                "seed": self.seed,
                "topk": self.topk,
                "max_new_tokens": self.max_new_tokens,
                "score_consistency": self.mean("score_consistency"),
                "score_consistency_std": self.std("score_consistency"),
                "label_consistency": self.mean("label_consistency"),
                "label_consistency_std": self.std("label_consistency"),
                "answer_retention": self.answer_retention,
                "accuracy": self.accuracy,
                "accuracy_dense": self.accuracy_dense,
                "score_consistency_dense": float(np.mean(self.score_consistency_dense)),
                "prediction_bias": self.prediction_bias,
                "bias_ratio": self.bias_ratio(),
                "dense_predictions": self.dense_predictions,
                "per_sample": {
                    "score_consistency": self.score_consistency,
                    "label_consistency": self.label_consistency,
                    "correct": self.correct,
                    "dense_correct": self.dense_correct,
                    "score_consistency_dense": self.score_consistency_dense,
                },
            }
        )


def flow_blocking(
    model: torch.nn.Module,
    processor: Any,
    samples: Iterable[Mapping[str, Any]],
    *,
    layers: int | Sequence[int] | None = None,
    flows: Sequence[str] = DEFAULT_FLOWS,
    span: int = 1,
    seed: int = 0,
    max_new_tokens: int = 5,
    topk: int = 5,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> BlockingResult:
    """Block each flow at each layer and compare the predictions with the undisturbed run.

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
    span : int
        Consecutive layers blocked per run (1: the paper's single layer).
    seed : int
        Seed of ``img2rnd``'s random rows (drawn per sample and layer from ``(seed, sample, layer)``).
    max_new_tokens : int
        Greedy tokens generated for the label metrics.
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
    records = as_list(samples)
    flows = tuple(flows)
    for f in flows:
        if f not in FLOWS:
            raise ValueError(f"unknown flow {f!r}; choose from {FLOWS}")
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    with AnalysisSession(model) as session:
        n_layers = session.num_layers
        starts = resolve_layers(layers, n_layers)
        n, k = len(records), len(starts)
        sc = {f: np.zeros((n, k)) for f in flows}
        lc = {f: np.zeros((n, k)) for f in flows}
        ok = {f: np.zeros((n, k)) for f in flows}
        sc0 = np.zeros(n)
        dense_ok = np.zeros(n, dtype=bool)
        dense_text: list[str] = []
        runs: list[tuple[str, int, int]] = [("none", -1, 0)]  # (flow, column, first layer)
        runs += [(f, j, start) for f in flows for j, start in enumerate(starts)]
        with torch.no_grad():
            for s, record in enumerate(records):
                prep = prepare_sample(session, processor, record)
                (dense,) = _generate(model, processor, prep, max_new_tokens, topk)
                dense_text.append(dense.text)
                dense_ok[s] = contains_answer(dense.text, prep.answer, prep.family)
                for lo in range(0, len(runs), batch_size):
                    chunk = runs[lo : lo + batch_size]
                    specs, layer_specs = [], {}
                    for f, _, start in chunk:
                        specs.append(block_spec(prep.groups, f, np.random.default_rng([seed, s, start])))
                    for r, (_, _, start) in enumerate(chunk):
                        for layer in range(start, min(start + span, n_layers)):
                            layer_specs.setdefault(layer, [None] * len(chunk))[r] = specs[r]
                    with _blocking_session(model, layer_specs):
                        results = _generate(model, processor, prep, max_new_tokens, topk, rows=len(chunk))
                    for (f, j, _), run in zip(chunk, results, strict=True):
                        if j < 0:
                            sc0[s] = jaccard(run.top, dense.top)
                            continue
                        sc[f][s, j] = jaccard(run.top, dense.top)
                        lc[f][s, j] = float(normalise_answer(run.text) == normalise_answer(dense.text))
                        ok[f][s, j] = float(contains_answer(run.text, prep.answer, prep.family))
                if progress is not None:
                    progress(1)
    return BlockingResult(
        layers=starts,
        span=span,
        flows=flows,
        num_layers=n_layers,
        score_consistency=sc,
        label_consistency=lc,
        correct=ok,
        score_consistency_dense=sc0,
        dense_correct=dense_ok,
        dense_predictions=dense_text,
        seed=seed,
        topk=topk,
        max_new_tokens=max_new_tokens,
    )
