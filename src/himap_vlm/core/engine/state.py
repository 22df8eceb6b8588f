"""Per-forward state of a :class:`~himap_vlm.core.engine.run.PruningRun`: one prefill, its decode steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from himap_vlm.core.engine.edits import EditContext
from himap_vlm.core.engine.layout import Layout
from himap_vlm.core.engine.scoring import SlotInfo

__all__ = ["DecodeState", "PrefillState", "Replay"]


@dataclass
class Replay:
    """Keep decisions of a prefill, re-applied to later no-cache forwards of the same ``generate``.

    Attributes
    ----------
    input_ids : LongTensor, shape (B, S)
        The input the decisions were made on (later forwards extend it by one token each).
    drops : dict
        Decoder layer -> per sample, the original input indices of the image tokens that layer
        (and the later ones) keeps; ``None`` where the sample kept every image token.
    record : dict
        ``run.record`` of the prefill that decided.
    """

    input_ids: torch.Tensor
    drops: dict[int, list[torch.Tensor | None]] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class PrefillState:
    """One prefill (a forward over the whole input, no cached tokens)."""

    input_ids: torch.Tensor  # (B, S)
    attn2d: torch.Tensor  # (B, S) bool
    is_image: torch.Tensor  # (B, S) bool
    after_last_image: torch.Tensor  # (B, S) bool: instruction tokens
    layout: Layout
    num_image_input: list[int]
    cache: Any = None
    replay: Replay | None = None  # decisions to re-apply instead of deciding (selection="once", no cache)
    decided: Replay | None = None  # decisions made in this prefill
    scores: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # step -> per sample
    features: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # step -> name -> (B, L, ...)
    dropped: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    mask_cache: dict[Any, Any] = field(default_factory=dict)  # (segment, layer type) -> mask
    full_pos_emb: Any = None
    full_pos_ids: Any = None
    block_ids: torch.Tensor | None = None  # (B, S) image block per token (bidirectional families)
    pos_cache: dict[Any, Any] = field(default_factory=dict)  # (segment, id) -> gathered per-type RoPE
    pending_keep: tuple[int, list[torch.Tensor | None]] | None = None  # (decided at layer, per sample)
    method_state: dict[str, Any] = field(default_factory=dict)  # LayerView.state (one prefill)
    edit_ctx: dict[int, EditContext] = field(default_factory=dict)
    layer_layouts: list[Layout] = field(default_factory=list)  # the layout each layer processed
    layer_segments: dict[int, int] = field(default_factory=dict)  # pruned layer -> segment
    segment_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # segment -> (B, L) keys allowed
    segment_positions: dict[int, torch.Tensor] = field(default_factory=dict)  # segment -> (B, L) input index
    segment_rope_positions: dict[int, torch.Tensor] = field(default_factory=dict)  # renumbered positions

    def slots(self, layout: Layout | None = None) -> SlotInfo:
        """:class:`~himap_vlm.core.engine.scoring.SlotInfo` of ``layout`` (default: the current one)."""
        lay = self.layout if layout is None else layout
        return SlotInfo(
            keys_ok=lay.mask2d,
            is_image=self.is_image.gather(1, lay.idx) & lay.valid,
            after_image=self.after_last_image.gather(1, lay.idx) & lay.valid,
            positions=lay.idx,
            block_ids=self.block_ids.gather(1, lay.idx) if self.block_ids is not None else None,
        )


@dataclass
class DecodeState:
    """What layers that dropped tokens need for continuation steps on their shortened caches."""

    cache: Any
    layer_segment: dict[int, int]  # layer -> segment id (pruned layers only)
    segment_mask2d: dict[int, torch.Tensor]  # segment -> (B, cache_len) allowed keys
    segment_positions: dict[int, torch.Tensor] = field(default_factory=dict)  # segment -> (B, cache_len)
    segment_next_rope: dict[int, torch.Tensor] = field(default_factory=dict)  # renumber: segment -> (B,)
    mask_cache: dict[Any, Any] = field(default_factory=dict)  # (segment, layer type) -> mask
    rope_cache: dict[Any, Any] = field(default_factory=dict)  # (segment, layer type) -> rotary tables
    step_len: int = 0  # tokens of the current continuation step
    step_rope: dict[int, torch.Tensor] = field(default_factory=dict)  # renumber: segment -> (B, s) positions
