"""The authors' way of running a pruning method, rebuilt on stock transformers for timing.

The reference implementations (``ustc-hyin/HiMAP``, ``pkunlp-icler/FastV``; see
``shared/reference/methods.md``) vendor an old ``modeling_llama`` and

1. run **eager attention in every layer** (the vision tower included: CLIP had no other kernel
   then), so every layer materialises its ``(H, S, S)`` attention probabilities;
2. ask for the attention maps (``output_attentions=True``) and rank image tokens **from the
   materialised map of layer K-1**;
3. generate **without a KV cache** (``use_cache=False``): every new token re-runs the whole
   prompt — vision tower, projector, every decoder layer — and prunes again.

:class:`ReferenceStyle` wraps one of our methods so that it keeps *the same tokens* but is run
that way, which lets ``himap bench`` measure the gain of our engine (scores recomputed for the
few rows a method needs, SDPA kept, pruned KV caches) instead of claiming it. What is and is not
reproduced:

* reproduced: eager kernels everywhere; attention maps of every layer returned by the model
  (``output_attentions=True``, so they are alive until the forward returns); scores read from
  the full map of layer K-1 captured by a forward hook on that layer's attention module
  (its ``attn_weights`` output); no cache, re-pruning at every generated token
  (:func:`reference_generate`);
* shared with our engine: the mechanics of dropping tokens (gathering hidden states, RoPE
  positions and masks), which cost little next to the attention itself, and the definition of
  the scores: which query rows a step reads and how they are reduced are the engine's
  (:func:`~himap_vlm.core.engine.scoring.scores_from_map` on the engine's own
  :class:`~himap_vlm.core.engine.scoring.SlotInfo` of the layout being processed), only the
  attention probabilities come from the materialised map. The vendored code
  slices tensors in its decoder loop; we reuse the engine's hooks, so the row isolates the
  three choices above, not the authors' exact Python;
* batch size 1 only, like the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from himap_vlm.core import contract
from himap_vlm.core.engine import PruningRun
from himap_vlm.core.engine.scoring import SlotInfo, scores_from_map
from himap_vlm.core.interface import PruneStep, StepInput
from himap_vlm.core.methods.base import PruningMethod

__all__ = ["ReferenceStyle", "ReferenceStyleRun", "reference_generate"]


@dataclass(frozen=True)
class ReferenceStyle(PruningMethod):
    """Run ``method`` the way the authors' code did (see the module docstring).

    The wrapped method decides which tokens to keep from scores read off the *materialised*
    attention map of layer K-1 (eager kernel) instead of the rows our engine recomputes; the
    query rows and their reduction are the engine's own
    (:func:`~himap_vlm.core.engine.scoring.scores_from_map` on the engine's
    :class:`~himap_vlm.core.engine.scoring.SlotInfo`), so both rank tokens by one definition.
    ``with ReferenceStyle(method)(model) as run`` switches the whole model to eager attention
    for the duration of the block and restores the previous implementation afterwards.

    Parameters
    ----------
    inner : PruningMethod
        A static method (HiMAP, FastV, RandomPrune, VTW, PyramidDrop, DART, Dense, ...): not
        dynamic, without attention edits. Steps scored with the layer before read its materialised
        map; other requests (the pruning layer's own rows, features) are computed as the engine
        does, which is how their authors computed them too (explicit rows, eager everywhere).

    Raises
    ------
    ValueError
        For a method the reference-style runner has no counterpart for.
    """

    inner: PruningMethod

    name = "reference-style"

    def check(self) -> None:
        method = self.inner
        if not isinstance(method, PruningMethod):
            raise ValueError(f"ReferenceStyle wraps a PruningMethod; got {type(method).__name__}")
        if method.dynamic or method.attention_edits():
            raise ValueError(
                f"ReferenceStyle supports static methods without attention edits; {method.name} is not one"
            )
        object.__setattr__(self, "_run", None)

    @property
    def config(self) -> dict[str, Any]:
        return self.inner.config

    def _from_map(self, step: PruneStep) -> bool:
        """Whether a step's scores are read off a materialised map (attention of the layer before)."""
        return step.score is not None and step.score.layer == "previous"

    def steps(self) -> list[PruneStep]:
        """The wrapped method's steps; those scored from the layer before get their scores from maps.

        Steps that score with the pruning layer's own attention (PyramidDrop) or ask for features
        (DART) keep their requests: their authors computed those explicitly for the rows needed too.
        """
        return [replace(s, score=None) if self._from_map(s) else s for s in self.inner.steps()]

    def score_layers(self) -> dict[int, int]:
        """Layer whose attention map each map-scored step reads -> step index."""
        return {s.layer - 1: i for i, s in enumerate(self.inner.steps()) if self._from_map(s)}

    def validate_for_model(self, num_layers: int) -> None:
        self.inner.validate_for_model(num_layers)

    def image_tokens_schedule(self, num_image_tokens: int, num_layers: int) -> list[int] | None:
        return self.inner.image_tokens_schedule(num_image_tokens, num_layers)

    def kept_after(self, step: int, num_image: int, num_image_input: int) -> int | None:
        return self.inner.kept_after(step, num_image, num_image_input)

    def select(self, x: StepInput) -> torch.Tensor:
        run = self._run
        if run is None:
            raise RuntimeError("ReferenceStyle.select called outside a reference-style prefill")
        step = self.inner.steps()[x.step]
        if not self._from_map(step):
            return self.inner.select(x)
        request = step.score
        scores = None
        if request is not None:
            scores = scores_from_map(run.pop_map(x.step), request, run.current_slots())[0]
            if scores.numel() != x.num_image:
                raise RuntimeError(  # pragma: no cover - the map and the engine's layout disagree
                    f"reference-style: {scores.numel()} scored image tokens, the engine has {x.num_image}"
                )
        return self.inner.select(replace(x, scores=scores))

    def __call__(self, model: nn.Module, *, selection: str = "every_forward") -> ReferenceStyleRun:
        return ReferenceStyleRun(model, self)

    def __repr__(self) -> str:
        return f"ReferenceStyle({self.inner!r})"


class ReferenceStyleRun(PruningRun):
    """:class:`~himap_vlm.core.engine.PruningRun` of a :class:`ReferenceStyle` method.

    On top of the engine's hooks it switches the model to eager attention and captures the
    attention maps of the scoring layers (forward hooks on their attention modules). Which
    tokens each layer processes, and which of them are image or instruction tokens, is the
    engine's own layout (:meth:`current_slots`).
    """

    method: ReferenceStyle

    def __init__(self, model: nn.Module, method: ReferenceStyle):
        # the authors generated without a cache and chose the kept tokens again at every step
        super().__init__(model, method, selection="every_forward")
        self._maps: dict[int, torch.Tensor] = {}
        self._ref_handles: list[Any] = []
        self._previous_attn: Any = None

    def attach(self) -> ReferenceStyleRun:
        super().attach()
        self._previous_attn = contract.attn_implementations(self.model)
        try:
            contract.set_attn_implementation(self.model, "eager")
        except Exception:
            super().detach()
            raise
        h = self._ref_handles
        # registered after the engine's own decoder pre-hook: the prefill state exists when it runs
        h.append(self.decoder.register_forward_pre_hook(self._ref_decoder_hook))
        for layer, step in self.method.score_layers().items():
            attn = getattr(self.layers[layer], self.family.attn_attr)
            h.append(attn.register_forward_hook(self._make_capture(step)))
        object.__setattr__(self.method, "_run", self)
        return self

    def detach(self) -> None:
        for handle in self._ref_handles:
            handle.remove()
        self._ref_handles.clear()
        if self._previous_attn is not None:
            contract.restore_attn_implementations(self.model, self._previous_attn)
            self._previous_attn = None
        if self.method._run is self:
            object.__setattr__(self.method, "_run", None)
        self._maps.clear()
        super().detach()

    def _in_prefill(self) -> bool:
        return self._mode == "prefill" and self._prefill is not None

    def current_slots(self) -> SlotInfo:
        """The engine's :class:`~himap_vlm.core.engine.scoring.SlotInfo` of the layout being processed."""
        if not self._in_prefill():
            raise RuntimeError("reference-style: no prefill in progress")
        return self._prefill.slots()

    def pop_map(self, step: int) -> torch.Tensor:
        """The captured map of the layer before ``step``, shape (1, H, L, L), removed from the run."""
        if step not in self._maps:
            raise RuntimeError(f"reference-style: no attention map was captured for step {step}")
        return self._maps.pop(step)

    def _ref_decoder_hook(self, module: nn.Module, args: tuple) -> None:
        self._maps.clear()
        if self._in_prefill() and self._prefill.input_ids.shape[0] != 1:
            raise ValueError("reference-style runs take batch size 1 (as the authors' code)")

    def _make_capture(self, step: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._in_prefill():
                return
            weights = contract.attention_weights(output)
            if weights is None:
                raise RuntimeError(
                    "reference-style: the attention module returned no attention weights; "
                    "it needs the eager kernel"
                )
            self._maps[step] = weights.detach()

        return hook


def reference_generate(
    model: nn.Module,
    inputs: dict[str, Any],
    max_new_tokens: int,
    *,
    on_step: Any = None,
) -> torch.Tensor:
    """Greedy generation the way the reference code ran it: no KV cache, maps returned.

    Every step runs the model on the whole sequence so far (``use_cache=False``,
    ``output_attentions=True``), with the image inputs again, so the vision tower, the pruning
    and every decoder layer run once per generated token. Use it inside
    ``with ReferenceStyle(method)(model):``.

    Parameters
    ----------
    model : nn.Module
    inputs : dict
        The processor's output for one sample.
    max_new_tokens : int
    on_step : callable, optional
        Called after each generated token with the step index (0 = the first token); the
        benchmark uses it to take timestamps.

    Returns
    -------
    LongTensor, shape (1, max_new_tokens)
        The generated tokens.
    """
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    other = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    out_tokens = []
    for step in range(max_new_tokens):
        out = model(
            input_ids=ids,
            attention_mask=mask,
            use_cache=False,
            output_attentions=True,
            logits_to_keep=1,
            **other,
        )
        nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        del out
        out_tokens.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if on_step is not None:
            on_step(step)
    return torch.cat(out_tokens, dim=1)
