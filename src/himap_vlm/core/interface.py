"""What a method and the engine exchange: the types both sides import (and nothing else).

A method (:mod:`himap_vlm.core.methods`) declares *what it needs* — :class:`PruneStep` s with a
:class:`ScoreRequest` or a :class:`FeatureRequest`, :class:`AttentionEdit` s — and decides *which
image tokens to keep* from a :class:`StepInput` (static steps) or a :class:`LayerView` (dynamic
methods). The engine (:mod:`himap_vlm.core.engine`) computes what was asked for and does every
mechanical part of dropping tokens. Neither imports the other's implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "FEATURES",
    "AttentionEdit",
    "FeatureRequest",
    "LastTokenContributions",
    "LayerView",
    "PositionPolicy",
    "PruneStep",
    "QuerySet",
    "ScoreRequest",
    "StepInput",
]

QuerySet = Literal["instruction", "image", "last", "all"]
PositionPolicy = Literal["keep", "renumber", "compact"]
"""How kept tokens are positioned after a drop. ``"keep"``: their original RoPE positions (HiMAP,
FastV, VTW; the default). ``"renumber"``: in the prefill, every later layer numbers its tokens
``0 .. n-1``; generated tokens keep the positions the model computes for them (the full-length
numbering), as PyramidDrop's authors' code does with a KV cache. ``"compact"``: renumbered as in
``"renumber"``, and generated tokens continue each pruned layer's own numbering."""

FEATURES = {
    "key_l1": "L1 norm of the layer before the pruning layer's keys (post-RoPE, kv heads concatenated)",
    "hidden_normed": "the pruning layer's input (the previous layer's output) through the final norm",
}
"""Per-token features a :class:`FeatureRequest` may ask for, and what they are."""


@dataclass(frozen=True)
class ScoreRequest:
    """Which attention rows the engine scores for a pruning step.

    The engine recomputes the post-softmax attention of the chosen query rows over the current
    keys (from the scoring layer's own queries and keys, with RoPE, grouped-query heads expanded),
    averages it over heads and reduces it over the query rows, keeping only the columns of the
    image tokens still present.

    Parameters
    ----------
    queries : {"instruction", "image", "last", "all"}
        ``"instruction"``: the tokens after the last image span (instruction and chat template);
        ``"image"``: the image tokens still present; ``"last"``: the last input token;
        ``"all"``: every (non-padding) token. Padding never counts.
    reduce : {"sum", "mean"}
        How the query rows are combined. ``"mean"`` divides, per key, by the number of query rows
        that may attend to it under the causal mask (the average attention a token receives).
    layer : {"previous", "pruning"}
        ``"previous"``: the attention the layer before the pruning layer computed (HiMAP, FastV:
        pruning at K ranks with layer K-1's attention). ``"pruning"``: the pruning layer's own
        attention on its input, before anything is dropped (its input norm, queries and keys at
        the current positions; PyramidDrop).
    """

    queries: QuerySet
    reduce: Literal["sum", "mean"] = "sum"
    layer: Literal["previous", "pruning"] = "previous"

    def __post_init__(self) -> None:
        if self.queries not in ("instruction", "image", "last", "all"):
            raise ValueError(
                f"ScoreRequest.queries must be one of 'instruction', 'image', 'last', 'all'; got {self.queries!r}"
            )
        if self.reduce not in ("sum", "mean"):
            raise ValueError(f"ScoreRequest.reduce must be 'sum' or 'mean'; got {self.reduce!r}")
        if self.layer not in ("previous", "pruning"):
            raise ValueError(f"ScoreRequest.layer must be 'previous' or 'pruning'; got {self.layer!r}")


@dataclass(frozen=True)
class FeatureRequest:
    """Per-token features (no attention weights) the engine computes for a pruning step.

    Parameters
    ----------
    names : tuple of str
        Keys of :data:`FEATURES`.
    """

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        unknown = [n for n in self.names if n not in FEATURES]
        if unknown or not self.names:
            raise ValueError(
                f"FeatureRequest.names must be a non-empty tuple of {', '.join(FEATURES)}; got {self.names!r}"
            )


@dataclass(frozen=True)
class PruneStep:
    """One pruning step: layers ``layer, layer+1, ...`` run without the pruned image tokens.

    Parameters
    ----------
    layer : int
        The first decoder layer (0-based) that no longer sees the pruned tokens (the paper's K).
    score : ScoreRequest, optional
        Attention rows to score; ``None`` when the method needs no attention.
    features : FeatureRequest, optional
        Per-token features to compute.
    """

    layer: int
    score: ScoreRequest | None = None
    features: FeatureRequest | None = None


@dataclass(frozen=True)
class StepInput:
    """What a static method sees of one sample at one pruning step.

    Attributes
    ----------
    step : int
        Index into the method's steps.
    layer : int
        The pruning layer of this step.
    num_image : int
        Image tokens of this sample still present before the step.
    num_image_input : int
        Image tokens of this sample in the input (before any step).
    scores : Tensor, shape (num_image,), optional
        float32 reduced attention of the step's :class:`ScoreRequest`, in sequence order.
    features : mapping, optional
        For a :class:`FeatureRequest`: each requested feature over the sample's real tokens still
        present, in sequence order (``key_l1``: shape (T,); ``hidden_normed``: shape (T, D)),
        plus ``is_image`` and ``after_image`` (BoolTensor, shape (T,)) saying which of those T
        tokens are image tokens and which come after the sample's last image.
    """

    step: int
    layer: int
    num_image: int
    num_image_input: int
    scores: torch.Tensor | None = None
    features: Mapping[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class AttentionEdit:
    """Post-softmax edits of one layer's attention between text queries and image keys.

    The weights are edited *after* the softmax and not renormalised (a dropped key still counts in
    the softmax denominator). Edits apply to the queries of the prefill; decode-step (generated)
    queries attend normally, as in VisiPruner's authors' code. The engine applies them without
    switching the model's attention kernel.

    Parameters
    ----------
    text_to_image : {"keep", "drop", "merge"}
        Weights of non-image queries on image keys. ``"drop"`` zeroes them; ``"merge"`` moves
        their sum onto one image key, the *sink* (``o_i = Σ_text a_ij v_j + (Σ_img a_ij) v_sink``).
    image_to_image : {"keep", "drop"}
        Weights of image queries on image keys (``"drop"`` zeroes all of them, the diagonal
        included).
    sink : int
        The sink of ``"merge"``: index into the image tokens of the sample's *first* image span
        (0 = its first token), so that it precedes every query that sees an image.
    text_image_fraction : float
        With ``text_to_image="drop"``: the fraction of each sample's image tokens (the first
        ones, in sequence order, all images together) whose weights from text queries are zeroed;
        1.0 (default) zeroes them all. VisiPruner's authors' 13B layer-0 variant zeroes the first
        half (0.5, ``int(n / 2)`` tokens).
    """

    text_to_image: Literal["keep", "drop", "merge"] = "keep"
    image_to_image: Literal["keep", "drop"] = "keep"
    sink: int = 0
    text_image_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.text_to_image not in ("keep", "drop", "merge"):
            raise ValueError(
                f"AttentionEdit.text_to_image must be 'keep', 'drop' or 'merge'; got {self.text_to_image!r}"
            )
        if self.image_to_image not in ("keep", "drop"):
            raise ValueError(f"AttentionEdit.image_to_image must be 'keep' or 'drop'; got {self.image_to_image!r}")
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"AttentionEdit.sink must be an integer >= 0; got {self.sink!r}")
        if not 0.0 < float(self.text_image_fraction) <= 1.0:
            raise ValueError(f"AttentionEdit.text_image_fraction must be in (0, 1]; got {self.text_image_fraction!r}")
        if self.text_image_fraction != 1.0 and self.text_to_image != "drop":
            raise ValueError("AttentionEdit.text_image_fraction applies to text_to_image='drop' only")

    @property
    def is_identity(self) -> bool:
        """Whether the edit changes nothing."""
        return self.text_to_image == "keep" and self.image_to_image == "keep"


@dataclass
class LastTokenContributions:
    """Per-key contributions to the last input token's attention output in one layer.

    ``c_j = concat_h a[h, last, j] · v[h, j]`` (before ``o_proj``; grouped-query value heads
    repeated), and ``output = Σ_j c_j`` over every key the last token attends to (its attention
    output before ``o_proj``). Removing key ``j`` from the last token's attention (its weight set
    to 0 in every head, no renormalisation) turns the output into ``output - c_j``.

    Attributes
    ----------
    image : list of Tensor
        Per sample, shape (image tokens present, H * head_dim), float32, in sequence order.
    output : Tensor, shape (B, H * head_dim)
        float32.
    """

    image: list[torch.Tensor]
    output: torch.Tensor

    def influence(self, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos(o - c_j, o), ||c_j||_2)`` of every image token of ``sample``, each shape (n,)."""
        c = self.image[sample]
        o = self.output[sample]
        cos = torch.nn.functional.cosine_similarity(o[None, :] - c, o[None, :].expand_as(c), dim=-1, eps=1e-12)
        return cos, c.norm(dim=-1)


@dataclass
class LayerView:
    """One decoder layer of a prefill, as a dynamic method sees it (``PruningMethod.on_layer``).

    Everything is per sample and in the current layout (tokens dropped earlier are absent);
    contributions are computed lazily, once, the first time a method asks for them.

    Attributes
    ----------
    layer : int
        The decoder layer.
    num_layers : int
        Decoder layers of the model.
    image_counts : list of int
        Image tokens present in this layer, per sample.
    state : dict
        A scratch dict for the method that lives for one prefill (shared by all its layers).
    record : dict
        ``run.record``: method-specific results of this prefill.
    """

    layer: int
    num_layers: int
    image_counts: list[int]
    state: dict[str, Any]
    record: dict[str, Any]
    _positions: Callable[[int], torch.Tensor] = field(repr=False)
    _contributions: Callable[[], LastTokenContributions] = field(repr=False)
    _cached: LastTokenContributions | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        """Samples in the batch."""
        return len(self.image_counts)

    def image_positions(self, sample: int) -> torch.Tensor:
        """Input positions (indices into the padded input) of ``sample``'s image tokens present here."""
        return self._positions(sample)

    def last_token_contributions(self) -> LastTokenContributions:
        """This layer's per-key contributions to the last input token's attention output.

        Recomputed from the layer's own q/k (RoPE, GQA) and ``v`` for the last query row only
        (cost: one row of attention plus the k and v projections).
        """
        if self._cached is None:
            with torch.no_grad():
                self._cached = self._contributions()
        return self._cached
