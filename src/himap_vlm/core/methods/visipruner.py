"""VisiPruner: three-stage, input-adaptive image-token pruning.

Reference: "VisiPruner: Decoding Discontinuous Cross-Modal Dynamics for Efficient Multimodal
LLMs" (EIT-NLP), §3.6 (shallow layers: attention merging and cross-attention skipping), §4.3–4.4
(middle layers: value-aware influence of each image token on the last input token, filtering
layer), §5.3 (deep layers: vision exit); reference configuration as summarised in
``shared/reference/methods.md``.

Rules follow the authors' code (``EIT-NLP/VisiPruner``,
``llava/model/language_model/custom_modeling_llama.py``: ``LlamaAttention.forward``,
``value_aware_token_selection`` and the decoder loop of ``LlamaModel.forward``; launch scripts
``scripts/v1_5/visiPruner_eval/*.sh``) where it is more specific than the paper; each deviation
we keep is listed in the class docstring and ``docs/methods.md``.

Decisions only live here; the engine (:mod:`himap_vlm.core.engine`) applies the shallow attention edits
(:class:`~himap_vlm.core.interface.AttentionEdit`), computes the per-token contributions
(:meth:`~himap_vlm.core.interface.LayerView.last_token_contributions`) and drops tokens per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from himap_vlm.core.interface import AttentionEdit, LayerView, PruneStep
from himap_vlm.core.methods.base import PruningMethod
from himap_vlm.core.methods.params import choice, integer, real
from himap_vlm.core.methods.registry import register


@dataclass
class _Sample:
    """Per-sample progress through the stages during one prefill."""

    image_tokens: int
    phase: str = "search"  # search -> filtered | kept_all -> exited
    filtering_layer: int | None = None
    kept_tokens: int | None = None
    exit_layer: int | None = None
    quiet: int = 0

    def as_record(self) -> dict[str, Any]:
        return {
            "image_tokens": self.image_tokens,
            "filtering_layer": self.filtering_layer,
            "kept_tokens": self.kept_tokens,
            "exit_layer": self.exit_layer,
        }


SHALLOW_VARIANTS = ("merge", "drop_half", "off")
EXIT_COUNTS = ("total", "consecutive")


@register("visipruner")
@dataclass(frozen=True)
class VisiPruner(PruningMethod):
    """VisiPruner image-token pruning (shallow edits, middle filtering, deep vision exit).

    * **Shallow** (layers ``0 ... S-1``, prefill only): post-softmax edits without renormalisation.
      ``shallow="merge"`` (the authors' 7B setting): in layer 0, each text query's total weight on
      the image tokens moves onto the sink image token and image→image weights become 0; in
      layers ``1 ... S-1`` text→image weights become 0. ``shallow="drop_half"`` (the authors' 13B
      variant): in layer 0 image→image weights become 0 and text→image weights become 0 for the
      first half of the image tokens (no merge); layers ``1 ... S-1`` as above.
      ``shallow="off"``: no edits (the authors' ``mode=["middle", "deep"]``, their CLI default).
      Generated tokens attend normally (the authors edit only when the query length exceeds the
      prompt's).
    * **Middle** (from layer ``S + 1``: layer ``S`` is neither edited nor searched, the authors'
      ``layer_idx > shallow_mid_layer``): with ``c_j = concat_h a[h, last, j] · v[h, j]`` (before
      ``o_proj``) and ``o = Σ_j c_j`` over all keys, the first layer in which some image token
      has ``cos(o - c_j, o) < cosine_threshold`` is the filtering layer; only tokens with
      ``||c_j||_2 > l2_threshold`` stay from the next layer on.
    * **Deep**: in every later layer the kept tokens are measured again; a layer in which none has
      ``cos(o - c_j, o) < exit_threshold`` counts as "no impact". ``exit_count="total"`` (the
      authors' ``exit_indicator``): the vision exit fires once ``exit_patience`` such layers have
      been counted, never reset; ``"consecutive"`` (the paper's wording): after ``exit_patience``
      consecutive ones. At the exit every remaining image token leaves from the next layer on.

    As in the authors' code: when every image token passes the L2 test at the filtering layer,
    nothing is dropped and no vision exit ever fires; when none passes, every image token leaves
    at once and the record has no separate exit (``exit_layer`` is ``None``); the last layer can
    be a filtering or exit layer (recorded, with no effect on the computation).

    Decisions are per sample (and may fall on different layers within a batch). After a prefill,
    ``run.record["visipruner"]`` lists, per sample, ``image_tokens``, ``filtering_layer``,
    ``kept_tokens`` and ``exit_layer`` (``None`` where a stage never fired).

    Deviations kept (better than the authors' code at no cost in fidelity): image tokens found by
    id (theirs: positions 35 ... 35 + 576·images), any number of images and padded batches (equal
    to single runs), SDPA/flash outside the edited rows, the sink chosen by ``sink_index``.

    Parameters
    ----------
    shallow_layers : int
        S (``shallow_mid_layer``, 6 in the authors' scripts): layers ``0 ... S-1`` carry the
        shallow edits; the search for the filtering layer starts at ``S + 1``. Must be below the
        model's number of layers.
    shallow : {"merge", "drop_half", "off"}
        The shallow stage (see above).
    cosine_threshold : float in [-1, 1]
        Filtering test (``layer_threshold``, 0.995). ``-1`` never triggers.
    l2_threshold : float >= 0
        Tokens kept at the filtering layer (``tokens_threshold``, 0.2).
    exit_threshold : float in [-1, 1]
        "No impact" test of the deep stage (0.999 in the authors' code).
    exit_patience : int >= 1 or None
        Layers without impact before the vision exit (2, the authors' ``exit_indicator == 2``).
        ``None`` disables the deep stage.
    exit_count : {"total", "consecutive"}
        How layers without impact are counted (see above).
    sink_index : int >= 0
        The attention sink of ``shallow="merge"``: index into the image tokens of the sample's
        first image (0, the authors' position 35 = the first image token).
    """

    shallow_layers: int = integer(6, minimum=0, doc="S: edited layers 0..S-1; the search starts at S+1")
    shallow: str = choice("merge", SHALLOW_VARIANTS, doc="shallow-stage variant")
    cosine_threshold: float = real(0.995, minimum=-1.0, maximum=1.0, doc="cosine similarity of the filtering test")
    l2_threshold: float = real(0.2, minimum=0.0, doc="L2 norm of a token's contribution kept at filtering")
    exit_threshold: float = real(0.999, minimum=-1.0, maximum=1.0, doc="cosine similarity of the exit test")
    exit_patience: int | None = integer(
        2, minimum=1, optional=True, doc="layers without impact before the vision exit; None disables it"
    )
    exit_count: str = choice("total", EXIT_COUNTS, doc="count layers without impact in total or consecutively")
    sink_index: int = integer(0, minimum=0, doc="index into the first image's tokens")

    dynamic = True
    rank = 50

    @classmethod
    def defaults_for(cls, num_layers: int) -> dict[str, Any]:
        """``shallow_layers = max(1, round(6 L / 32))`` (authors: 6 of 32), their thresholds."""
        return {"shallow_layers": max(1, round(6 * num_layers / 32))}

    @classmethod
    def budgets(cls, num_layers: int) -> list[dict[str, Any]]:
        """``l2_threshold`` in ``{0.1, 0.4}``."""
        base = cls.defaults_for(num_layers)
        return [{**base, "l2_threshold": 0.1}, {**base, "l2_threshold": 0.4}]

    # ------------------------------------------------------------------ engine contract
    def steps(self) -> list[PruneStep]:
        return []

    def attention_edits(self) -> dict[int, AttentionEdit]:
        s = self.shallow_layers
        if self.shallow == "off" or s < 1:
            return {}
        if self.shallow == "merge":
            edits = {0: AttentionEdit(text_to_image="merge", image_to_image="drop", sink=self.sink_index)}
        else:
            edits = {0: AttentionEdit(text_to_image="drop", image_to_image="drop", text_image_fraction=0.5)}
        for layer in range(1, s):
            edits[layer] = AttentionEdit(text_to_image="drop", image_to_image="keep")
        return edits

    def validate_for_model(self, num_layers: int) -> None:
        super().validate_for_model(num_layers)
        if self.shallow_layers >= num_layers:
            raise ValueError(
                f"{self.name}: shallow_layers={self.shallow_layers} is out of range for this model: it has "
                f"{num_layers} decoder layers, so shallow_layers must be in [0, {num_layers - 1}]"
            )

    def on_layer(self, layer: int, view: LayerView) -> list[torch.Tensor | None] | None:
        state = view.state
        if "samples" not in state:
            state["samples"] = [_Sample(image_tokens=n) for n in view.image_counts]
            view.record["visipruner"] = [s.as_record() for s in state["samples"]]
        samples: list[_Sample] = state["samples"]
        if layer <= self.shallow_layers:
            return None
        counts = view.image_counts
        watching = ("filtered", "kept_all") if self.exit_patience is not None else ()
        active = [i for i, s in enumerate(samples) if counts[i] > 0 and (s.phase == "search" or s.phase in watching)]
        if not active:
            return None
        contributions = view.last_token_contributions()
        decision: list[torch.Tensor | None] = [None] * view.batch_size
        for i in active:
            s = samples[i]
            cos, l2 = contributions.influence(i)
            if s.phase == "search":
                if bool((cos < self.cosine_threshold).any()):
                    keep = torch.nonzero(l2 > self.l2_threshold).flatten()
                    s.filtering_layer, s.kept_tokens = layer, int(keep.numel())
                    if keep.numel() == 0:
                        s.phase = "exited"  # every image token leaves now: no separate exit
                    elif keep.numel() == counts[i]:
                        s.phase = "kept_all"  # the authors never exit in this case
                    else:
                        s.phase = "filtered"
                    decision[i] = keep
                continue
            impact = bool((cos < self.exit_threshold).any())
            if self.exit_count == "total":
                s.quiet += 0 if impact else 1
            else:
                s.quiet = 0 if impact else s.quiet + 1
            if s.phase == "filtered" and s.quiet >= self.exit_patience:
                s.exit_layer, s.phase = layer, "exited"
                decision[i] = torch.zeros(0, dtype=torch.long)
        view.record["visipruner"] = [s.as_record() for s in samples]
        return decision
