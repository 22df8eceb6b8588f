"""FLOPs reports: prefill and decode-step FLOPs of a schedule, with the dense reference.

:func:`prefill_flops` and :func:`decode_step_flops` evaluate the formulas of
:mod:`~himap_vlm.apps.flops.formulas` on a layout and per-layer counts, per sample, and combine
batched counts; :func:`flops_ratio_for_run` reads the layout and dimensions from a model run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from himap_vlm.apps.flops.configs import TextDims, VisionDims
from himap_vlm.apps.flops.formulas import (
    _exact_decode_layer_flops,
    _exact_layer_flops,
    _vision_flops,
    paper_layer_flops,
)
from himap_vlm.apps.flops.layout import (
    Counts,
    Layout,
    _non_negative_int,
    _per_sample_counts,
    layout_from_inputs,
)

__all__ = ["CONVENTIONS", "FlopsReport", "decode_step_flops", "flops_ratio_for_run", "prefill_flops"]

CONVENTIONS: tuple[str, ...] = ("exact", "paper")
"""Names accepted by the ``convention`` parameter."""

_BATCH_REDUCE = ("mean", "sum", "first")
_LOGITS = ("last", "all", "none")

Convention = Literal["exact", "paper"]
BatchReduce = Literal["mean", "sum", "first"]


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; use one of: {', '.join(repr(c) for c in choices)}")
    return value


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs of one forward pass (prefill or one decode step), with the dense reference.

    Attributes
    ----------
    convention : {"exact", "paper"}
    phase : {"prefill", "decode"}
    image_tokens_per_layer : list of float
        Image tokens present in each decoder layer (batch-reduced like the FLOPs).
    per_layer : list of float
        FLOPs of each decoder layer.
    dense_per_layer : list of float
        The same with every image token in every layer.
    other : dict of str to float
        FLOPs outside the decoder layers (``"lm_head"``, ``"vision_tower"``, ``"projector"``);
        empty in the paper convention.
    dense_other : dict of str to float
        The same for the dense reference (differs from :attr:`other` only for the LM head over
        all positions, ``logits="all"``).
    """

    convention: str
    phase: str
    image_tokens_per_layer: list[float]
    per_layer: list[float]
    dense_per_layer: list[float]
    other: dict[str, float] = field(default_factory=dict)
    dense_other: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """FLOPs of the pass: decoder layers plus :attr:`other`."""
        return sum(self.per_layer) + sum(self.other.values())

    @property
    def dense_total(self) -> float:
        """FLOPs of the same pass without pruning."""
        return sum(self.dense_per_layer) + sum(self.dense_other.values())

    @property
    def ratio(self) -> float:
        """``total / dense_total`` (1.0 for dense; 0.246 for HiMAP on LLaVA-1.5-7B, paper)."""
        return self.total / self.dense_total if self.dense_total else 1.0

    @property
    def tflops(self) -> float:
        """:attr:`total` in TFLOPs (1e12)."""
        return self.total / 1e12

    @property
    def tflops_dense(self) -> float:
        """:attr:`dense_total` in TFLOPs (1e12)."""
        return self.dense_total / 1e12

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (totals, ratio and per-layer lists)."""
        return {
            "convention": self.convention,
            "phase": self.phase,
            "flops": self.total,
            "flops_dense": self.dense_total,
            "tflops": self.tflops,
            "tflops_dense": self.tflops_dense,
            "ratio": self.ratio,
            "image_tokens_per_layer": list(self.image_tokens_per_layer),
            "per_layer_flops": list(self.per_layer),
            "per_layer_flops_dense": list(self.dense_per_layer),
            "other_flops": dict(self.other),
            "other_flops_dense": dict(self.dense_other),
        }


def _reduce(rows: list[list[int]], how: str) -> list[float]:
    if how == "first" or len(rows) == 1:
        return list(rows[0])
    sums = [sum(col) for col in zip(*rows, strict=True)]
    if how == "sum":
        return sums
    return [v / len(rows) for v in sums]


def _prepare(
    dims: TextDims, layout: Layout, counts: Any, convention: str, batch_reduce: str
) -> list[list[int]]:
    if not isinstance(dims, TextDims):
        raise ValueError(
            f"dims must be a TextDims (use TextDims.from_config(...)); got {type(dims).__name__}"
        )
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be a Layout(before, image, after); got {type(layout).__name__}")
    _check_choice("convention", convention, CONVENTIONS)
    _check_choice("batch_reduce", batch_reduce, _BATCH_REDUCE)
    return _per_sample_counts(counts, dims.num_layers, layout.image)


def prefill_flops(
    dims: TextDims,
    layout: Layout,
    image_tokens_per_layer: Counts | None = None,
    convention: Convention = "exact",
    *,
    causal: bool = True,
    logits: Literal["last", "all", "none"] = "last",
    vision: VisionDims | None = None,
    batch_reduce: BatchReduce = "mean",
) -> FlopsReport:
    """FLOPs of the prefill (the forward pass over the prompt).

    Parameters
    ----------
    dims : TextDims
        Text-model dimensions.
    layout : Layout
        Prompt layout; ``layout.image`` is the image-token count before any pruning.
    image_tokens_per_layer : list of int, or list over layers of lists over the batch, optional
        Image tokens present in each decoder layer (``None``: dense). See the module docstring
        for the batched shape.
    convention : {"exact", "paper"}
        See the module docstring.
    causal : bool
        Exact convention: count the causal triangle of attention (default) or, with ``False``,
        the full ``s x s`` square that attention kernels compute (and that
        ``torch.utils.flop_counter`` reports).
    logits : {"last", "all", "none"}
        Exact convention: LM head on the last position only (generation), on every position
        still present in the last layer, or not at all.
    vision : VisionDims, optional
        Exact convention: also count the vision tower and projector, for
        ``layout.image // vision.num_image_tokens`` images.
    batch_reduce : {"mean", "sum", "first"}
        How per-sample FLOPs of batched counts are combined.

    Returns
    -------
    FlopsReport

    Raises
    ------
    ValueError
        For an unknown convention / option, bad counts, or options that apply only to the exact
        convention.
    """
    samples = _prepare(dims, layout, image_tokens_per_layer, convention, batch_reduce)
    _check_choice("logits", logits, _LOGITS)
    scale = len(samples) if batch_reduce == "sum" else 1
    other: dict[str, float] = {}
    dense_other: dict[str, float] = {}
    if convention == "paper":
        if vision is not None:
            raise ValueError(
                "vision applies only to convention='exact' (the paper formula counts image tokens in the LLM only)"
            )
        d, m = dims.hidden_size, dims.intermediate_size
        per_sample = [[paper_layer_flops(n, d, m) for n in sample] for sample in samples]
        dense = [paper_layer_flops(layout.image, d, m)] * dims.num_layers
    else:
        text = layout.text
        per_sample = [[_exact_layer_flops(dims, text + n, causal) for n in sample] for sample in samples]
        dense = [_exact_layer_flops(dims, layout.total, causal)] * dims.num_layers
        lm_per_position = 2 * dims.hidden_size * dims.vocab_size
        if logits == "last":
            other["lm_head"] = dense_other["lm_head"] = lm_per_position * scale
        elif logits == "all":
            # every position still present after the last decoder layer
            other["lm_head"] = _reduce([[lm_per_position * (text + s[-1])] for s in samples], batch_reduce)[0]
            dense_other["lm_head"] = lm_per_position * layout.total * scale
        if vision is not None:
            if not isinstance(vision, VisionDims):
                raise ValueError(
                    f"vision must be a VisionDims (use VisionDims.from_config(...)); got {type(vision).__name__}"
                )
            per_image = vision.num_image_tokens
            if layout.image % per_image:
                raise ValueError(
                    f"layout.image = {layout.image} is not a multiple of the {per_image} tokens one image yields with this "
                    "vision tower; fix the layout or leave vision out"
                )
            for key, value in _vision_flops(vision, layout.image // per_image).items():
                other[key] = dense_other[key] = value * scale
    return FlopsReport(
        convention=convention,
        phase="prefill",
        image_tokens_per_layer=_reduce(samples, batch_reduce),
        per_layer=_reduce(per_sample, batch_reduce),
        dense_per_layer=[v * scale for v in dense],
        other=other,
        dense_other=dense_other,
    )


def decode_step_flops(
    dims: TextDims,
    layout: Layout,
    image_tokens_per_layer: Counts | None = None,
    convention: Convention = "exact",
    *,
    generated: int = 0,
    batch_reduce: BatchReduce = "mean",
) -> FlopsReport:
    """FLOPs of one decode step: one new token attending to each layer's KV cache.

    In layer ``l`` the new token attends to ``kv_len = text + image_tokens_per_layer[l] +
    generated + 1`` keys: the prompt tokens cached in that layer at prefill, the ``generated``
    tokens decoded before it, and itself.

    Parameters
    ----------
    dims, layout, image_tokens_per_layer, batch_reduce
        As in :func:`prefill_flops`.
    convention : {"exact", "paper"}
        ``"exact"``: projections, attention over ``kv_len`` keys, gated FFN and the LM head on
        the new token. ``"paper"``: the part of the step due to image tokens only, i.e. the new
        query's scores and weighted sum over the ``n`` cached image tokens, ``4*n*d`` per layer
        (the image tokens themselves are not recomputed during decoding).
    generated : int
        Tokens decoded (and cached) before this step; 0 for the first decode step after the
        prefill.

    Returns
    -------
    FlopsReport
    """
    samples = _prepare(dims, layout, image_tokens_per_layer, convention, batch_reduce)
    generated = _non_negative_int("generated", generated)
    scale = len(samples) if batch_reduce == "sum" else 1
    if convention == "paper":
        d = dims.hidden_size
        per_sample = [[4 * n * d for n in sample] for sample in samples]
        dense = [4 * layout.image * d] * dims.num_layers
        other: dict[str, float] = {}
    else:
        base = layout.text + generated + 1
        per_sample = [[_exact_decode_layer_flops(dims, base + n) for n in sample] for sample in samples]
        dense = [_exact_decode_layer_flops(dims, base + layout.image)] * dims.num_layers
        other = {"lm_head": 2 * dims.hidden_size * dims.vocab_size * scale}
    return FlopsReport(
        convention=convention,
        phase="decode",
        image_tokens_per_layer=_reduce(samples, batch_reduce),
        per_layer=_reduce(per_sample, batch_reduce),
        dense_per_layer=[v * scale for v in dense],
        other=other,
        dense_other=dict(other),
    )


def flops_ratio_for_run(
    model: Any,
    inputs: Mapping[str, Any],
    image_tokens_per_layer: Counts,
    convention: Convention = "exact",
    *,
    sample: int = 0,
) -> float:
    """Prefill FLOPs of a pruned run over the dense prefill of the same input.

    The layout comes from ``inputs`` (:func:`layout_from_inputs`, sample ``sample``), the text
    dimensions from the model's text config, and the counts are what the engine measured
    (``[c[sample] for c in run.image_tokens_per_layer]``, or the batched list itself).

    Parameters
    ----------
    model : transformers model
        A supported multimodal model (its config has an ``image_token_id``).
    inputs : mapping
        The processor's output (``input_ids``, optionally ``attention_mask``).
    image_tokens_per_layer : list of int, or list over layers of lists over the batch
        Image tokens present in each decoder layer; batched counts are reduced to ``sample``.
    convention : {"exact", "paper"}
        See the module docstring; the exact convention counts the LM head on the last position.
    sample : int
        Which sample of the batch (layout and, for batched counts, the counts).

    Returns
    -------
    float
        ``prefill_flops(...).ratio``: 1.0 for dense.
    """
    config = model.config
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    if token_id is None:
        raise ValueError("the model config has no image_token_id: cannot locate image tokens in the inputs")
    layout = layout_from_inputs(inputs["input_ids"], int(token_id), inputs.get("attention_mask"), sample)
    counts: Any = image_tokens_per_layer
    if counts and isinstance(counts[0], Sequence):
        counts = [int(c[sample]) for c in counts]
    dims = TextDims.from_config(config)
    return prefill_flops(dims, layout, counts, convention).ratio
