"""Layouts: which original tokens a group of layers processes, and the pure gather/scatter of slots.

Nothing here touches a model: a layout maps the *slots* of a shortened sequence to indices of the
original (padded) input, and the functions below compute new layouts from keep decisions and move
tensors between layouts. Every mechanic of the engine that changes a sequence's length goes
through these functions, so they are tested on plain tensors.

Conventions: samples of a batch may keep different numbers of tokens; rows are then left-filled
with *filler* slots (``valid = False``) so tensors stay rectangular, like left padding. Fillers
point at index 0 of the input, are masked out as keys everywhere and never reach the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Layout", "gather_seq", "keep_slots", "scatter_to_input", "shrink"]


@dataclass
class Layout:
    """Which original tokens a group of layers processes.

    Attributes
    ----------
    idx : LongTensor, shape (B, L)
        Index into the original (padded) input sequence of every slot.
    valid : BoolTensor, shape (B, L)
        False for filler slots (rectangularity padding).
    segment : int
        0 for the full input; +1 with every drop.
    mask2d : BoolTensor, shape (B, L), optional
        Keys allowed: valid slots that are not original padding.
    position_embeddings, position_ids, flash_position_ids
        The rotary tables and position ids of the slots (set by the engine).
    """

    idx: torch.Tensor
    valid: torch.Tensor
    segment: int = 0
    mask2d: torch.Tensor | None = None
    position_embeddings: Any = None
    position_ids: Any = None
    flash_position_ids: Any = None

    @classmethod
    def full(cls, attn2d: torch.Tensor) -> Layout:
        """The layout of the whole input (segment 0). ``attn2d``: (B, S) bool, False on padding."""
        b, s = attn2d.shape
        return cls(
            idx=torch.arange(s, device=attn2d.device).expand(b, s).clone(),
            valid=torch.ones(b, s, dtype=torch.bool, device=attn2d.device),
            segment=0,
            mask2d=attn2d,
        )

    @property
    def shape(self) -> tuple[int, int]:
        """``(B, L)``."""
        return int(self.idx.shape[0]), int(self.idx.shape[1])


def gather_seq(x: Any, idx: torch.Tensor, seq_dim: int) -> Any:
    """Gather ``idx`` (B, L) along ``seq_dim`` of ``x`` whose batch dim precedes it (size B or 1).

    Tuples and lists are gathered element-wise (rotary ``(cos, sin)``); ``None`` stays ``None``.
    """
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(gather_seq(t, idx, seq_dim) for t in x)
    seq_dim = seq_dim % x.dim()
    batch_dim = seq_dim - 1
    b, length = idx.shape
    shape = list(x.shape)
    shape[batch_dim] = b
    x = x.expand(*shape)
    view = [1] * x.dim()
    view[batch_dim], view[seq_dim] = b, length
    lead = list(x.shape)
    lead[seq_dim] = length
    index = idx.reshape(view).expand(*lead)
    return x.gather(seq_dim, index)


def keep_slots(valid: torch.Tensor, is_image: torch.Tensor, chosen: torch.Tensor | None, source: str) -> torch.Tensor:
    """Slots one sample keeps: every valid non-image slot plus the chosen image slots, in order.

    Parameters
    ----------
    valid, is_image : BoolTensor, shape (L,)
        The sample's valid slots and which of them hold image tokens.
    chosen : LongTensor or None
        Indices into the sample's image slots (sequence order) to keep; ``None`` keeps them all.
    source : str
        Who chose (for the error message).

    Returns
    -------
    LongTensor, shape (L',)
        Sorted slot indices.

    Raises
    ------
    ValueError
        If ``chosen`` holds indices outside the image tokens present.
    """
    img_slots = torch.nonzero(is_image & valid).flatten()
    n = int(img_slots.numel())
    if n == 0 or chosen is None:
        return torch.nonzero(valid).flatten()
    other = torch.nonzero(valid & ~is_image).flatten()
    pick = torch.as_tensor(chosen).to(img_slots.device).long().flatten()
    if pick.numel() and (int(pick.min()) < 0 or int(pick.max()) >= n):
        raise ValueError(f"{source} returned indices outside [0, {n}) (the image tokens present)")
    return torch.sort(torch.cat([other, img_slots[torch.unique(pick)]])).values


def shrink(layout: Layout, kept: list[torch.Tensor], attn2d: torch.Tensor) -> tuple[Layout, torch.Tensor]:
    """The layout after a drop, and the gather index that maps the old slots to the new ones.

    Parameters
    ----------
    layout : Layout
        The current layout, (B, L).
    kept : list of LongTensor
        Per sample, the slots (of ``layout``) it keeps, sorted (see :func:`keep_slots`).
    attn2d : BoolTensor, shape (B, S)
        The input's attention mask (False on padding).

    Returns
    -------
    new : Layout
        Segment ``layout.segment + 1``, width ``max(len(k))``, fillers on the left; ``mask2d``
        set; rotary tables and positions not yet (the engine sets them).
    rel : LongTensor, shape (B, L')
        ``new`` slot -> old slot (fillers -> 0).
    """
    b = layout.idx.shape[0]
    device = layout.idx.device
    width = max((int(k.numel()) for k in kept), default=0)
    rel = torch.zeros(b, width, dtype=torch.long, device=device)
    valid = torch.zeros(b, width, dtype=torch.bool, device=device)
    for i, k in enumerate(kept):
        rel[i, width - k.numel() :] = k
        valid[i, width - k.numel() :] = True
    new_idx = layout.idx.gather(1, rel)
    new = Layout(idx=new_idx, valid=valid, segment=layout.segment + 1)
    new.mask2d = attn2d.gather(1, new_idx) & valid
    return new, rel


def dropped_slots(layout: Layout, kept: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per sample, the valid slots of ``layout`` not in ``kept``."""
    out = []
    for i, k in enumerate(kept):
        gone = layout.valid[i].clone()
        gone[k] = False
        out.append(torch.nonzero(gone).flatten())
    return out


def scatter_to_input(x: torch.Tensor, layout: Layout, length: int, fill: float = 0.0) -> torch.Tensor:
    """Place per-slot rows ``x`` (B, L, ...) at their input positions: (B, length, ...), ``fill`` elsewhere."""
    b = x.shape[0]
    out = x.new_full((b, length, *x.shape[2:]), fill)
    rows = torch.arange(b, device=x.device)[:, None].expand_as(layout.idx)
    out[rows[layout.valid], layout.idx[layout.valid]] = x[layout.valid]
    return out
