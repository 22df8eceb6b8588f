"""VisiPruner: three-stage, input-adaptive image-token pruning.

Reference: "VisiPruner: Decoding Discontinuous Cross-Modal Dynamics for Efficient Multimodal
LLMs" (EIT-NLP), §3.6 (shallow layers: attention merging and cross-attention skipping), §4.3–4.4
(middle layers: value-aware influence of each image token on the last input token, filtering
layer), §5.3 (deep layers: vision exit); reference configuration as summarised in
``shared/reference/methods.md``.

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
from himap_vlm.core.methods.params import integer, real
from himap_vlm.core.methods.registry import register


@dataclass
class _Sample:
    """Per-sample progress through the stages during one prefill."""

    image_tokens: int
    phase: str = "search"  # search -> filtered -> exited
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


@register("visipruner")
@dataclass(frozen=True)
class VisiPruner(PruningMethod):
    """VisiPruner image-token pruning (shallow edits, middle filtering, deep vision exit).

    * **Shallow** (layers ``< S``): post-softmax edits without renormalisation. Layer 0: for each
      text query, ``Σ_img a_ij`` moves onto the sink image token, image→image weights become 0;
      layers ``1 ... S-1``: text→image weights become 0. Image tokens stay in the sequence and
      the caches (decode steps see the same edits).
    * **Middle** (from layer S): with ``c_j = concat_h a[h, last, j] · v[h, j]`` (before
      ``o_proj``) and ``o = Σ_j c_j`` over all keys, the first layer in which some image token
      has ``cos(o - c_j, o) < cosine_threshold`` is the filtering layer; only tokens with
      ``||c_j||_2 > l2_threshold`` stay from the next layer on.
    * **Deep**: the kept tokens are measured in every later layer; after ``exit_patience``
      consecutive layers in which none has ``cos(o - c_j, o) < exit_threshold``, that layer is the
      *exit layer* and every image token leaves from the next layer on.

    Decisions are per sample (and may fall on different layers within a batch). After a prefill,
    ``run.record["visipruner"]`` lists, per sample, ``image_tokens``, ``filtering_layer``,
    ``kept_tokens`` and ``exit_layer`` (``None`` where a stage never fired; with zero kept tokens
    the exit layer is the filtering layer).

    Parameters
    ----------
    shallow_layers : int
        S, the number of shallow layers (``shallow_mid_layer`` of the reference config, 6):
        layer 0 merges each text query's attention to the image tokens onto one image token and
        drops image→image attention; layers ``1 ... S-1`` drop text→image attention. ``0``
        disables the shallow stage. Must be below the model's number of layers.
    cosine_threshold : float in [-1, 1]
        The first layer ``>= S`` in which removing some image token j from the last input token's
        attention gives ``cos(o - c_j, o) < cosine_threshold`` is the *filtering layer* (0.995).
        ``-1`` never triggers (no filtering, hence no exit).
    l2_threshold : float >= 0
        At the filtering layer, image tokens with ``||c_j||_2 > l2_threshold`` are kept (0.2); the
        others leave from the next layer on.
    exit_threshold : float in [-1, 1]
        After the filtering layer, a layer in which every kept token has
        ``cos(o - c_j, o) >= exit_threshold`` shows "no measurable impact" (0.999).
    exit_patience : int >= 1 or None
        After this many consecutive layers without impact, every remaining image token leaves
        (the *vision exit*) from the next layer on (2). ``None`` disables the vision exit.
    sink_index : int >= 0
        The attention sink of layer 0: index into the image tokens of the sample's first image
        (the paper picks it at random and finds the choice irrelevant, App. G; 0 = the first
        image token, which precedes every query that can see an image).
    """

    rank = 50

    shallow_layers: int = integer(6, minimum=0, doc="number of shallow layers with attention edits")
    cosine_threshold: float = real(0.995, minimum=-1.0, maximum=1.0, doc="cosine similarity of the filtering test")
    l2_threshold: float = real(0.2, minimum=0.0, doc="L2 norm of a token's contribution kept at filtering")
    exit_threshold: float = real(0.999, minimum=-1.0, maximum=1.0, doc="cosine similarity of the exit test")
    exit_patience: int | None = integer(
        2, minimum=1, optional=True, doc="layers without impact before the vision exit; None disables it"
    )
    sink_index: int = integer(0, minimum=0, doc="index into the first image's tokens")

    dynamic = True

    @classmethod
    def defaults_for(cls, num_layers: int) -> dict[str, Any]:
        """``shallow_layers = max(1, round(6 L / 32))`` (paper: 6 of 32), the paper's thresholds."""
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
        edits: dict[int, AttentionEdit] = {}
        if s >= 1:
            edits[0] = AttentionEdit(text_to_image="merge", image_to_image="drop", sink=self.sink_index)
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
        cfg = self
        state = view.state
        if "samples" not in state:
            state["samples"] = [_Sample(image_tokens=n) for n in view.image_counts]
            view.record["visipruner"] = [s.as_record() for s in state["samples"]]
        samples: list[_Sample] = state["samples"]
        if layer < cfg.shallow_layers:
            return None
        counts = view.image_counts
        active = [i for i, s in enumerate(samples) if s.phase != "exited" and counts[i] > 0]
        if cfg.exit_patience is None:
            active = [i for i in active if samples[i].phase == "search"]
        if not active:
            return None
        contributions = view.last_token_contributions()
        decision: list[torch.Tensor | None] = [None] * view.batch_size
        for i in active:
            s = samples[i]
            cos, l2 = contributions.influence(i)
            if s.phase == "search":
                if bool((cos < cfg.cosine_threshold).any()):
                    keep = torch.nonzero(l2 > cfg.l2_threshold).flatten()
                    s.filtering_layer, s.kept_tokens, s.phase = layer, int(keep.numel()), "filtered"
                    if keep.numel() == 0:
                        s.exit_layer, s.phase = layer, "exited"
                    decision[i] = keep
            else:  # filtered: watch the kept tokens for the vision exit
                s.quiet = 0 if bool((cos < cfg.exit_threshold).any()) else s.quiet + 1
                if s.quiet >= cfg.exit_patience:
                    s.exit_layer, s.phase = layer, "exited"
                    decision[i] = torch.zeros(0, dtype=torch.long)
        view.record["visipruner"] = [s.as_record() for s in samples]
        return decision
