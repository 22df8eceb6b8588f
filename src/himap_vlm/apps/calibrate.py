"""Calibration of VTW's withdrawal layer K (the KL criterion of the VTW paper, eq. 6).

On a few samples (20 in the paper), for every candidate layer ``d`` (5 ... L-1 in the paper), the
first output token's distribution with every image token withdrawn at ``d`` is compared with the
dense model's: ``KL(P_withdrawn || P_dense)`` of the softmax of the last input position's logits
(the authors' code: ``KLDivLoss(log_softmax(dense), softmax(withdrawn))``), averaged over the
samples. K is the first candidate whose mean KL is at most ``eta`` (0.003 for LLaVA-1.5-7B,
0.0005 for 13B, 0.0001 for LLaVA-NeXT-7B).

Cost: one dense forward per sample batch, then one withdrawn forward per candidate per batch —
``batches × (candidates + 1)`` forwards (the authors' code runs the same number).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from himap_vlm.apps.prompting import build_inputs, to_model
from himap_vlm.core.families import resolve_family
from himap_vlm.core.methods.spec import MethodSpec

KLFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class VTWCalibration:
    """Result of :func:`calibrate_vtw`.

    Attributes
    ----------
    layer : int or None
        The chosen withdrawal layer K: the first candidate with mean KL <= ``eta``; ``None``
        when no candidate qualifies.
    eta : float
        The threshold.
    candidates : list of int
        Candidate layers, increasing.
    kl : list of float
        Mean KL over the samples, one per candidate (the whole curve).
    per_sample : list of list of float
        KL per sample (outer) and candidate (inner).
    num_samples : int
    forwards : int
        Model forwards run (``batches × (candidates + 1)``).
    """

    layer: int | None
    eta: float
    candidates: list[int]
    kl: list[float]
    per_sample: list[list[float]]
    num_samples: int
    forwards: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


def choose_layer(candidates: Sequence[int], kl: Sequence[float], eta: float) -> int | None:
    """The first candidate whose mean KL is at most ``eta`` (``None`` if there is none)."""
    for d, value in zip(candidates, kl, strict=True):
        if value <= eta:
            return int(d)
    return None


def first_token_kl(withdrawn_logits: torch.Tensor, dense_logits: torch.Tensor) -> torch.Tensor:
    """``KL(P_withdrawn || P_dense)`` of next-token distributions, per sample.

    Parameters
    ----------
    withdrawn_logits, dense_logits : Tensor, shape (B, V)
        Logits of the last input position.

    Returns
    -------
    Tensor, shape (B,)
        float64, >= 0.
    """
    log_w = torch.log_softmax(withdrawn_logits.double(), dim=-1)
    log_d = torch.log_softmax(dense_logits.double(), dim=-1)
    return (log_w.exp() * (log_w - log_d)).sum(dim=-1).clamp(min=0.0)


def candidate_layers(num_layers: int, start: int = 5, stop: int | None = None) -> list[int]:
    """Candidate withdrawal layers ``start ... stop`` (default: the last layer, ``num_layers - 1``).

    Raises
    ------
    ValueError
        When the range is empty or outside ``[1, num_layers - 1]``.
    """
    stop = num_layers - 1 if stop is None else stop
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_layers - 1:
            raise ValueError(
                f"{name}={value!r} is out of range: candidate layers must be in [1, {num_layers - 1}] "
                f"for a model with {num_layers} decoder layers"
            )
    if start > stop:
        raise ValueError(f"start={start} must not exceed stop={stop}")
    return list(range(start, stop + 1))


def vtw_spec(layer: int, num_layers: int | None = None) -> MethodSpec:
    """VTW withdrawing at ``layer``, in the one spec syntax (``vtw(k=5)``), checked against the depth.

    Raises
    ------
    himap_vlm.core.methods.spec.MethodSpecError
        When ``layer`` is not a layer of a ``num_layers``-layer model.
    """
    return MethodSpec("vtw", {"k": int(layer)}, num_layers)


@torch.no_grad()
def _last_logits(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    out = model(**batch, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1].float()


@torch.no_grad()
def vtw_kl_curve(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    candidates: Sequence[int],
    *,
    kl: KLFunction = first_token_kl,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[list[float]], int]:
    """Per-sample KL of every candidate, from left-padded model-input batches.

    Returns
    -------
    per_sample : list of list of float
        ``[sample][candidate]``.
    forwards : int
        Model forwards run.
    """
    num_layers = int(resolve_family(model).text_config(model).num_hidden_layers)
    withdrawn_at = {int(d): vtw_spec(int(d), num_layers).build() for d in candidates}  # checked up front
    per_sample: list[list[float]] = []
    forwards = 0
    for batch in batches:
        dense = _last_logits(model, batch)
        forwards += 1
        if progress is not None:
            progress(1)
        rows = [[] for _ in range(dense.shape[0])]
        for d in candidates:
            with withdrawn_at[int(d)](model):
                withdrawn = _last_logits(model, batch)
            forwards += 1
            for i, value in enumerate(kl(withdrawn, dense).tolist()):
                rows[i].append(float(value))
            if progress is not None:
                progress(1)
        per_sample.extend(rows)
    return per_sample, forwards


def calibrate_vtw(
    model: nn.Module,
    processor: Any,
    samples: Sequence[Mapping[str, Any]],
    *,
    eta: float = 0.003,
    start: int = 5,
    stop: int | None = None,
    batch_size: int = 1,
    kl: KLFunction = first_token_kl,
    progress: Callable[[int, int], None] | None = None,
) -> VTWCalibration:
    """Choose VTW's withdrawal layer K on calibration samples (VTW paper, eq. 6).

    Parameters
    ----------
    model : nn.Module
        A supported multimodal model (eval mode).
    processor
        Its processor; prompts follow :func:`himap_vlm.apps.prompting.build_prompt`.
    samples : sequence of mapping
        Records with ``image`` (a PIL image, or a list of them) and ``question`` — e.g. from
        :func:`himap_vlm.apps.data.synthetic.read_jsonl`. The paper uses 20.
    eta : float
        KL threshold, finite and >= 0.
    start, stop : int
        First and last candidate layer (default 5 and the model's last layer).
    batch_size : int
        Samples per forward (left-padded); the KL values do not depend on it.
    kl : callable
        ``kl(withdrawn_logits, dense_logits) -> (B,)``; default :func:`first_token_kl`.
    progress : callable, optional
        ``progress(done, total)`` after every forward.

    Returns
    -------
    VTWCalibration

    Raises
    ------
    ValueError
        For an empty sample list, a bad ``eta``/``batch_size``, candidates outside the model, or
        a model whose ``config.image_token_id`` is not a token of its vocabulary (the engine's
        check, before any forward).
    """
    if not samples:
        raise ValueError("calibrate_vtw needs at least one sample")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0 (KL threshold); got {eta!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    family = resolve_family(model)
    num_layers = len(getattr(family.decoder(model), family.layers_attr))
    candidates = candidate_layers(num_layers, start, stop)
    vtw_spec(candidates[0], num_layers).build()(model)  # the engine's image-token check, before any forward
    for i, rec in enumerate(samples):
        if "question" not in rec or "image" not in rec:
            raise ValueError(f"sample {i} needs 'image' and 'question' fields; got {sorted(rec)}")
    groups = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    total = len(groups) * (len(candidates) + 1)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    def batches() -> Iterable[Mapping[str, Any]]:
        for group in groups:
            batch = build_inputs(
                processor, [r["image"] for r in group], [str(r["question"]) for r in group], padding_side="left"
            )
            yield to_model(batch, model)

    per_sample, forwards = vtw_kl_curve(model, batches(), candidates, kl=kl, progress=tick)
    mean = [sum(col) / len(col) for col in zip(*per_sample, strict=True)]
    return VTWCalibration(
        layer=choose_layer(candidates, mean, float(eta)),
        eta=float(eta),
        candidates=candidates,
        kl=mean,
        per_sample=per_sample,
        num_samples=len(per_sample),
        forwards=forwards,
    )
