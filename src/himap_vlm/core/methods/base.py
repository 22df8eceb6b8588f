"""What every pruning method shares: the base class and the helpers methods use.

A method is a small frozen dataclass: its fields are its parameters, declared once with
:mod:`himap_vlm.core.methods.params`; it registers itself with
:func:`~himap_vlm.core.methods.registry.register`; it says *which image tokens to keep* and
nothing else. The engine (:mod:`himap_vlm.core.engine`) owns every mechanic: hooks, attention
scores, keep indices, masks, RoPE, KV caches and batches. A static method declares its
:class:`~himap_vlm.core.interface.PruneStep` s and turns each step's
:class:`~himap_vlm.core.interface.StepInput` into the indices to keep; a dynamic one decides in
:meth:`PruningMethod.on_layer`. Besides the mechanics, a method declares the facts every
application reads from it: its defaults for a model's depth (:meth:`PruningMethod.defaults_for`),
its sweep budgets (:meth:`PruningMethod.budgets`) and its image-token schedule
(:meth:`PruningMethod.image_tokens_schedule`).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from himap_vlm.core.interface import AttentionEdit, LayerView, PositionPolicy, PruneStep, StepInput
from himap_vlm.core.methods.params import Param, coerce, param_of

if TYPE_CHECKING:
    from himap_vlm.core.engine import PruningRun

__all__ = ["PruningMethod", "kept_count", "top_k_indices"]


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


@dataclass(frozen=True)
class PruningMethod(ABC):
    """Base class of every method (a frozen dataclass of its parameters).

    Calling a method on a model returns a :class:`~himap_vlm.core.engine.PruningRun`, a context
    manager that installs the engine's hooks and always removes them::

        with HiMAP(k1=2, r1=0.5, k2=8, r2=0.75)(model) as run:
            model.generate(**inputs)

    Subclasses declare their parameters as dataclass fields (see
    :mod:`himap_vlm.core.methods.params`), register with ``@register(name)``, and implement
    :meth:`steps` plus :meth:`kept_after` / :meth:`select` (static methods) or :meth:`on_layer`
    (``dynamic = True``). Cross-field constraints go in :meth:`check`.
    """

    name: ClassVar[str] = "method"
    aliases: ClassVar[tuple[str, ...]] = ()
    dynamic: ClassVar[bool] = False
    """Decisions depend on the input at layers the method cannot name in advance (VisiPruner)."""
    rank: ClassVar[int] = 100
    """Where the method appears in listings (tables, default method lists): lower first."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            p = param_of(f)
            if p is not None:
                object.__setattr__(self, f.name, coerce(f.name, p, getattr(self, f.name)))
        self.check()

    # ------------------------------------------------------------------ declarations
    def check(self) -> None:  # noqa: B027 - optional hook, most methods have no cross-field constraint
        """Constraints between parameters (raise ``ValueError``); called after each field is validated."""

    @classmethod
    def params(cls) -> dict[str, Param]:
        """The declared parameters, in field order."""
        out = {}
        for f in dataclasses.fields(cls):
            p = param_of(f)
            if p is not None:
                out[f.name] = p
        return out

    @classmethod
    def defaults_for(cls, num_layers: int) -> dict[str, Any]:
        """The paper's setting with its layer indices scaled to a model of ``num_layers`` layers.

        Default: the constructor defaults (an empty dict). Methods tuned on LLaVA-1.5-7B (32
        layers) override this; ``bench``, ``eval``, ``demo`` and the CLI use it.
        """
        return {}

    @classmethod
    def budgets(cls, num_layers: int) -> list[dict[str, Any]]:
        """Harsher settings for sweeps (``demo``), each a full set of parameters; default none."""
        return []

    @classmethod
    def for_depth(cls, num_layers: int, **overrides: Any) -> PruningMethod:
        """The method with :meth:`defaults_for` ``num_layers``, updated by ``overrides``."""
        return cls(**{**cls.defaults_for(num_layers), **overrides})

    @property
    def config(self) -> dict[str, Any]:
        """Every parameter and its value (a plain dict, in field order)."""
        return {name: getattr(self, name) for name in self.params()}

    @property
    def position_policy(self) -> PositionPolicy:
        """``"keep"``, ``"renumber"`` or ``"compact"`` (see :data:`himap_vlm.core.interface.PositionPolicy`)."""
        return "keep"

    # ------------------------------------------------------------------ engine contract
    @abstractmethod
    def steps(self) -> list[PruneStep]:
        """The pruning steps, in increasing layer order (empty for dynamic methods)."""

    def kept_after(self, step: int, num_image: int, num_image_input: int) -> int | None:
        """How many image tokens a sample keeps at ``step`` (``None``: it depends on the input).

        Parameters
        ----------
        step : int
            Index into :meth:`steps`.
        num_image : int
            Image tokens present before the step.
        num_image_input : int
            Image tokens the sample had in the input.
        """
        return None

    def select(self, x: StepInput) -> torch.Tensor:
        """Indices (into the image tokens still present in one sample) to keep at a step.

        Returns
        -------
        LongTensor, shape (k,)
            Sorted indices in ``[0, x.num_image)``.
        """
        raise NotImplementedError(f"{type(self).__name__} declares steps but no select()")

    def attention_edits(self) -> dict[int, AttentionEdit]:
        """Post-softmax attention edits per decoder layer (default: none)."""
        return {}

    def on_layer(self, layer: int, view: LayerView) -> list[torch.Tensor | None] | None:
        """Input-dependent decisions of a *dynamic* method (``dynamic = True``), once per prefill layer.

        The engine calls this in every prefill, in layer order, from the attention pre-hook of
        each layer that may still decide (layers ``first - 1 ... L - 2``, where ``first`` is the
        first layer tokens may be dropped from). ``view.state`` lives for one prefill and
        ``view.record`` is ``run.record``.

        Returns
        -------
        list of (LongTensor or None), one per sample, or None
            For a sample, the indices (into its image tokens present in this layer, sequence
            order) to keep from layer ``layer + 1`` on; ``None`` keeps them all.
        """
        return None

    # ------------------------------------------------------------------ validation and planning
    def validate_for_model(self, num_layers: int) -> None:
        """Check the configuration against a model with ``num_layers`` decoder layers.

        Every ``layer`` parameter must name a layer of the model; methods add their own checks
        by overriding and calling ``super()``.

        Raises
        ------
        ValueError
            Naming the parameter and the valid range.
        """
        for name, p in self.params().items():
            value = getattr(self, name)
            if p.kind == "layer" and value is not None and value >= num_layers:
                lo = int(p.minimum or 0)
                raise ValueError(
                    f"{self.name}: {name}={value} is out of range for this model: it has {num_layers} decoder "
                    f"layers, so {name} must be in [{lo}, {num_layers - 1}]"
                )

    def image_tokens_schedule(self, num_image_tokens: int, num_layers: int) -> list[int] | None:
        """Image tokens present in each decoder layer for an input with ``num_image_tokens``.

        ``None`` when the counts depend on the input (dynamic methods). Validates the method
        against the depth first. Used by :mod:`himap_vlm.apps.flops` (FLOPs) and the apps; the
        engine reports measured counts in ``run.image_tokens_per_layer``.
        """
        self.validate_for_model(num_layers)
        if self.dynamic:
            return None
        steps = {s.layer: i for i, s in enumerate(self.steps())}
        counts, present = [], int(num_image_tokens)
        for layer in range(num_layers):
            if layer in steps:
                kept = self.kept_after(steps[layer], present, num_image_tokens)
                if kept is None:
                    return None
                present = min(present, int(kept))
            counts.append(present)
        return counts

    def __call__(self, model: torch.nn.Module, *, selection: str = "once") -> PruningRun:
        """Bind the method to ``model``; use the result as a context manager.

        Parameters
        ----------
        model : nn.Module
            A supported model.
        selection : {"once", "every_forward"}
            See :class:`~himap_vlm.core.engine.PruningRun`.
        """
        from himap_vlm.core.engine import PruningRun

        return PruningRun(model, self, selection=selection)
