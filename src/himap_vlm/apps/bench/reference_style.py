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
  positions and masks), which cost little next to the attention itself. The vendored code
  slices tensors in its decoder loop; we reuse the engine's hooks, so the row isolates the
  three choices above, not the authors' exact Python;
* batch size 1 only, like the reference code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from himap_vlm.core import contract
from himap_vlm.core.engine import PruningRun
from himap_vlm.core.engine.scoring import SlotInfo, scores_from_map
from himap_vlm.core.interface import PruneStep, ScoreRequest, StepInput
from himap_vlm.core.methods.base import PruningMethod

__all__ = ["ReferenceStyle", "ReferenceStyleRun", "map_scores", "reference_generate"]


@dataclass
class _RefState:
    """Per-prefill bookkeeping of the wrapper (batch size 1)."""

    is_image: torch.Tensor  # (S,) bool, over the input
    real: torch.Tensor  # (S,) bool: not padding
    positions: torch.Tensor  # (L,) original indices of the tokens the current layers process
    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # step -> (H, L, L) float32


@dataclass(frozen=True)
class ReferenceStyle(PruningMethod):
    """Run ``method`` the way the authors' code did (see the module docstring).

    The wrapped method decides which tokens to keep from scores computed on the *materialised*
    attention map of layer K-1 (eager kernel), instead of the rows our engine recomputes.
    ``with ReferenceStyle(method)(model) as run`` switches the whole model to eager attention
    for the duration of the block and restores the previous implementation afterwards.

    Parameters
    ----------
    method : PruningMethod
        A static method (HiMAP, FastV, RandomPrune, VTW, Dense): not dynamic, without attention
        edits.

    Raises
    ------
    ValueError
        For a dynamic method or one with attention edits (the reference-style runner has no
        counterpart for them).
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
        object.__setattr__(self, "_requests", [s.score for s in method.steps()])
        object.__setattr__(self, "_run", None)

    @property
    def config(self) -> dict[str, Any]:
        return self.inner.config

    def steps(self) -> list[PruneStep]:
        """The wrapped method's steps, with no score request: the engine computes no scores."""
        return [PruneStep(s.layer, None) for s in self.inner.steps()]

    def score_layers(self) -> dict[int, int]:
        """Layer whose attention map each scoring step reads -> step index."""
        return {s.layer - 1: i for i, s in enumerate(self.inner.steps()) if s.score is not None}

    def validate_for_model(self, num_layers: int) -> None:
        self.inner.validate_for_model(num_layers)

    def image_tokens_schedule(self, num_image_tokens: int, num_layers: int) -> list[int] | None:
        return self.inner.image_tokens_schedule(num_image_tokens, num_layers)

    def kept_after(self, step: int, num_image: int, num_image_input: int) -> int | None:
        return self.inner.kept_after(step, num_image, num_image_input)

    def select(self, x: StepInput) -> torch.Tensor:
        run = self._run
        if run is None or run.state is None:
            raise RuntimeError("ReferenceStyle.select called outside a reference-style prefill")
        st = run.state
        pos = st.positions
        slot_img = st.is_image[pos]
        request = self._requests[x.step]
        ref_scores = None
        if request is not None:
            ref_scores = map_scores(st.maps.pop(x.step), request, pos, st.is_image, st.real)
            if ref_scores.numel() != x.num_image:
                raise RuntimeError(  # pragma: no cover - the engine and the wrapper disagree
                    f"reference-style: {ref_scores.numel()} scored image tokens, the engine has {x.num_image}"
                )
        keep = torch.as_tensor(self.inner.select(dataclasses.replace(x, scores=ref_scores))).long().flatten()
        img_slots = torch.nonzero(slot_img).flatten()
        other = torch.nonzero(~slot_img).flatten()
        slots = torch.sort(torch.cat([other, img_slots[torch.unique(keep)]])).values
        st.positions = pos[slots]
        return keep

    def __call__(self, model: nn.Module, *, selection: str = "every_forward") -> ReferenceStyleRun:
        return ReferenceStyleRun(model, self)

    def __repr__(self) -> str:
        return f"ReferenceStyle({self.inner!r})"


def map_scores(
    attn: torch.Tensor,
    request: ScoreRequest,
    positions: torch.Tensor,
    is_image: torch.Tensor,
    real: torch.Tensor,
) -> torch.Tensor:
    """Scores of the image tokens present, read from a materialised attention map.

    Parameters
    ----------
    attn : Tensor, shape (H, L, L)
        Post-softmax attention of the scoring layer (current layout).
    request : ScoreRequest
        Which query rows, and how they are reduced (as in the engine).
    positions : LongTensor, shape (L,)
        Original input index of every slot of the current layout.
    is_image, real : BoolTensor, shape (S,)
        Over the input: image tokens; non-padding tokens.

    Returns
    -------
    Tensor, shape (image tokens present,)
        float32, in sequence order.
    """
    slot_real = real[positions]
    img_orig = torch.nonzero(is_image).flatten()
    last = int(img_orig.max()) if img_orig.numel() else -1
    slots = SlotInfo(
        keys_ok=slot_real[None],
        is_image=is_image[positions][None],
        after_image=((positions > last) & slot_real)[None],
        positions=positions[None],
    )
    return scores_from_map(attn[None], request, slots)[0]


class ReferenceStyleRun(PruningRun):
    """:class:`~himap_vlm.core.engine.PruningRun` of a :class:`ReferenceStyle` method.

    On top of the engine's hooks it switches the model to eager attention, captures the
    attention maps of the scoring layers (forward hooks on their attention modules) and tracks
    which input tokens each layer processes, so that the wrapper can score from the maps.
    """

    method: ReferenceStyle

    def __init__(self, model: nn.Module, method: ReferenceStyle):
        # the authors generated without a cache and chose the kept tokens again at every step
        super().__init__(model, method, selection="every_forward")
        self.state: _RefState | None = None
        self._ids: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._prefill_now = False
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
        h.append(self.model.register_forward_pre_hook(self._ref_model_hook, with_kwargs=True))
        h.append(self.decoder.register_forward_pre_hook(self._ref_decoder_hook, with_kwargs=True))
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
        self.state = None
        super().detach()

    def _ref_model_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        self._ids = ids
        self._mask = kwargs.get("attention_mask")

    def _ref_decoder_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = self.contract.find_cache(kwargs, "the language model")
        past = contract.cache_length(cache)
        self._prefill_now = past == 0 and self._ids is not None
        if not self._prefill_now:
            return
        ids = self._ids
        if ids.shape[0] != 1:
            raise ValueError("reference-style runs take batch size 1 (as the authors' code)")
        row = ids[0]
        real = torch.ones_like(row, dtype=torch.bool)
        if isinstance(self._mask, torch.Tensor) and self._mask.dim() == 2:
            real = self._mask[0].bool().to(row.device)
        self.state = _RefState(
            is_image=(row == self.image_token_id) & real,
            real=real,
            positions=torch.arange(row.numel(), device=row.device),
        )

    def _make_capture(self, step: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._prefill_now or self.state is None:
                return
            weights = contract.attention_weights(output)
            if weights is None:
                raise RuntimeError(
                    "reference-style: the attention module returned no attention weights; "
                    "it needs the eager kernel"
                )
            self.state.maps[step] = weights[0].detach()

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
