"""What every pruning method shares: the contract with the engine and config validation.

A method only *decides which image tokens to keep*. The engine (:mod:`himap_vlm.core.engine`) owns every
mechanic: hooks, attention scores, keep indices, masks, RoPE, KV caches and batches. A method
declares a list of :class:`PruneStep` (at which layer it prunes and which attention rows it needs
scored), and for each step and each sample it turns the scores into the indices to keep.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

if TYPE_CHECKING:
    from himap_vlm.core.engine import LayerView, PruningRun

QuerySet = Literal["instruction", "image", "last", "all"]


@dataclass(frozen=True)
class ScoreRequest:
    """Which attention rows the engine scores for a pruning step.

    The engine recomputes, in the layer *before* the pruning layer, the post-softmax attention of
    the chosen query rows over the current keys (from that layer's own queries and keys, with RoPE,
    grouped-query heads expanded), averages it over heads and reduces it over the query rows,
    keeping only the columns of the image tokens still present.

    Parameters
    ----------
    queries : {"instruction", "image", "last", "all"}
        ``"instruction"``: the tokens after the last image span (instruction and chat template);
        ``"image"``: the image tokens still present; ``"last"``: the last input token;
        ``"all"``: every (non-padding) token. Padding never counts.
    reduce : {"sum", "mean"}
        How the query rows are combined. ``"mean"`` divides, per key, by the number of query rows
        that may attend to it under the causal mask (the average attention a token receives).
    """

    queries: QuerySet
    reduce: Literal["sum", "mean"] = "sum"

    def __post_init__(self) -> None:
        if self.queries not in ("instruction", "image", "last", "all"):
            raise ValueError(
                f"ScoreRequest.queries must be one of 'instruction', 'image', 'last', 'all'; got {self.queries!r}"
            )
        if self.reduce not in ("sum", "mean"):
            raise ValueError(f"ScoreRequest.reduce must be 'sum' or 'mean'; got {self.reduce!r}")


@dataclass(frozen=True)
class PruneStep:
    """One pruning step: layers ``layer, layer+1, ...`` run without the pruned image tokens.

    Parameters
    ----------
    layer : int
        The first decoder layer (0-based) that no longer sees the pruned tokens (the paper's K).
    score : ScoreRequest or None
        Attention rows scored in layer ``layer - 1``; ``None`` when the method needs no scores.
    """

    layer: int
    score: ScoreRequest | None


@dataclass(frozen=True)
class AttentionEdit:
    """Post-softmax edits of one layer's attention between text queries and image keys.

    The weights are edited *after* the softmax and not renormalised (a dropped key still counts in
    the softmax denominator). Edits apply to every query of the layer, prefill and decode steps
    alike (generated tokens are text queries). The engine applies them without switching the
    model's attention kernel; see :class:`himap_vlm.core.engine.PruningRun`.

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
    """

    text_to_image: Literal["keep", "drop", "merge"] = "keep"
    image_to_image: Literal["keep", "drop"] = "keep"
    sink: int = 0

    def __post_init__(self) -> None:
        if self.text_to_image not in ("keep", "drop", "merge"):
            raise ValueError(
                f"AttentionEdit.text_to_image must be 'keep', 'drop' or 'merge'; got {self.text_to_image!r}"
            )
        if self.image_to_image not in ("keep", "drop"):
            raise ValueError(f"AttentionEdit.image_to_image must be 'keep' or 'drop'; got {self.image_to_image!r}")
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise ValueError(f"AttentionEdit.sink must be an integer >= 0; got {self.sink!r}")

    @property
    def is_identity(self) -> bool:
        """Whether the edit changes nothing."""
        return self.text_to_image == "keep" and self.image_to_image == "keep"


def kept_count(n: int, ratio: float) -> int:
    """Number of image tokens kept when a fraction ``ratio`` of ``n`` is pruned.

    ``n - floor(ratio * n + 0.5)``: 576 tokens at 50 % keep 288, and 288 at 75 % keep 72, the
    absolute counts of the HiMAP reference configuration.
    """
    return n - int(math.floor(ratio * n + 0.5))


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in ascending index order (ties: lower index first).

    Parameters
    ----------
    scores : Tensor, shape (n,)
    k : int

    Returns
    -------
    LongTensor, shape (k,)
    """
    k = max(0, min(int(k), scores.numel()))
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def check_layer(name: str, value: Any, *, minimum: int = 1) -> int:
    """Validate a layer index parameter at construction (type and lower bound)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer layer index (>= {minimum}); got {value!r}")
    if value < minimum:
        raise ValueError(
            f"{name}={value} is out of range: it must be >= {minimum} "
            f"(pruning at layer K uses the attention of layer K-1)"
        )
    return value


def check_ratio(name: str, value: Any) -> float:
    """Validate a pruning ratio (fraction of image tokens pruned) in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in [0, 1] (fraction of image tokens pruned); got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}={value} is out of range: it must be in [0, 1] (fraction of image tokens pruned)")
    return float(value)


class PruningMethod(ABC):
    """Base class of every method.

    Subclasses set :attr:`name`, hold a validated config dataclass in :attr:`config`, and implement
    :meth:`steps` and :meth:`select`. Calling the method on a model returns a
    :class:`~himap_vlm.core.engine.PruningRun`, a context manager that installs the engine's hooks and always
    removes them::

        with HiMAP(k1=2, r1=0.5, k2=8, r2=0.75)(model) as run:
            model.generate(**inputs)

    Two optional extensions: a method whose decisions depend on the input at layers it cannot
    name in advance sets ``dynamic = True`` and implements :meth:`on_layer` (VisiPruner); a method
    that edits attention weights between text and image tokens returns them from
    :meth:`attention_edits`.
    """

    name: ClassVar[str] = "method"
    dynamic: ClassVar[bool] = False
    config: Any

    # ------------------------------------------------------------------ engine contract
    @abstractmethod
    def steps(self) -> list[PruneStep]:
        """The pruning steps, in increasing layer order."""

    def select(self, step: int, scores: torch.Tensor | None, num_image: int, *, layer: int) -> torch.Tensor:
        """Indices (into the image tokens still present in one sample) to keep at ``step``.

        Parameters
        ----------
        step : int
            Index into :meth:`steps`.
        scores : Tensor of shape (num_image,) or None
            The reduced attention scores of the step's :class:`ScoreRequest`, one per image token
            still present, in sequence order; ``None`` when the step requested none.
        num_image : int
            Image tokens of this sample still present before the step.
        layer : int
            The pruning layer of this step.

        Returns
        -------
        LongTensor, shape (k,)
            Sorted indices in ``[0, num_image)``.
        """
        raise NotImplementedError

    def attention_edits(self) -> dict[int, AttentionEdit]:
        """Post-softmax attention edits per decoder layer (default: none). See :class:`AttentionEdit`."""
        return {}

    def on_layer(self, layer: int, view: LayerView) -> list[torch.Tensor | None] | None:
        """Input-dependent decisions of a *dynamic* method (``dynamic = True``), once per prefill layer.

        The engine calls this in every prefill, in layer order, from the attention pre-hook of
        each layer that may still decide (layers ``first - 1 ... L - 2``, where ``first`` is the
        first layer tokens may be dropped from). ``view`` exposes that layer's image tokens and
        lazily computed quantities (see :class:`himap_vlm.core.engine.LayerView`); ``view.state`` is a
        dict that lives for one prefill and ``view.record`` is ``run.record``.

        Returns
        -------
        list of (LongTensor or None), one per sample, or None
            For a sample, the indices (into its image tokens present in this layer, sequence
            order) to keep from layer ``layer + 1`` on; ``None`` keeps them all. Returning
            ``None`` changes nothing for any sample.
        """
        return None

    # ------------------------------------------------------------------ validation
    def validate_for_model(self, num_layers: int) -> None:
        """Check the configuration against a model with ``num_layers`` decoder layers.

        Raises
        ------
        ValueError
            Naming the parameter and the valid range.
        """
        for f in fields(self.config):
            if f.name in ("k", "k1", "k2"):
                value = getattr(self.config, f.name)
                if value is not None and value >= num_layers:
                    raise ValueError(
                        f"{self.name}: {f.name}={value} is out of range for this model: it has {num_layers} "
                        f"decoder layers, so {f.name} must be in [1, {num_layers - 1}]"
                    )

    # ------------------------------------------------------------------ planning helpers
    def image_tokens_schedule(self, num_image_tokens: int, num_layers: int) -> list[int] | None:
        """Image tokens present in each decoder layer for an input with ``num_image_tokens``.

        Returns ``None`` for methods whose counts depend on the input. Used by
        :mod:`himap_vlm.apps.flops`; the engine reports measured counts in ``run.image_tokens_per_layer``.
        """
        if self.dynamic:
            return None
        counts = []
        present = num_image_tokens
        steps = {s.layer: i for i, s in enumerate(self.steps())}
        for layer in range(num_layers):
            if layer in steps:
                present = self._planned_keep(steps[layer], present)
            counts.append(present)
        return counts

    def _planned_keep(self, step: int, num_image: int) -> int:
        """Kept count at ``step`` (static methods); default: what :meth:`select` returns."""
        scores = torch.zeros(num_image)
        return int(self.select(step, scores, num_image, layer=self.steps()[step].layer).numel())

    def __call__(self, model: torch.nn.Module) -> PruningRun:
        """Bind the method to ``model``; use the result as a context manager."""
        from himap_vlm.core.engine import PruningRun

        return PruningRun(model, self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
