"""Attention edits: post-softmax changes between text queries and image keys, kernel untouched.

An :class:`~himap_vlm.core.interface.AttentionEdit` only changes which *value* a query reads at an
image key (``o_i = Σ_j a_ij v'_j`` with ``v'_j`` = ``v_j``, 0 or ``v_sink``), so a layer keeps its
own kernel (SDPA, flash, eager):

* image queries: with ``image_to_image="drop"`` a ``v_proj`` hook hands the module zero values at
  image slots (:func:`zero_image_values`), so the module computes the image rows exactly;
* text queries (few: the instruction): their image-key weights ``a_ij`` are recomputed from the
  layer's q/k (like the scores) and the difference ``Σ_img a_ij (v'_j - v_module_j)`` is added to
  the module output through ``o_proj`` (:func:`add_correction`);
* decode steps (text queries only): after the prefill, the cache holds ``v'_j`` at the image slots
  (:func:`write_cache`), so later steps need no hook at all.

Cost: the layer's k (and v) projections once more plus (text rows x L) attention; no (L x L)
matrix is materialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from himap_vlm.core import contract
from himap_vlm.core.engine.scoring import SCORE_CHUNK, SlotInfo, attention_rows
from himap_vlm.core.families import ModelFamily
from himap_vlm.core.interface import AttentionEdit

__all__ = ["EditContext", "add_correction", "prepare", "write_cache", "zero_image_values"]


@dataclass
class EditContext:
    """Per-layer work of an edit in one prefill (pre-hook -> v_proj hook -> post-hook).

    Attributes
    ----------
    zero_slots : BoolTensor (B, L) or None
        Image slots whose values the module must see as 0.
    rows, row_valid : LongTensor / BoolTensor (B, R) or None
        Text query slots that get a correction.
    delta : Tensor (B, R, D) or None
        Correction of the module output at ``rows``.
    cache_fill : Tensor (B, H_kv, L, hd) or None
        Values decode steps must read at image slots.
    image_slots : BoolTensor (B, L)
    armed : bool
        The ``v_proj`` hook fires once, for the module's own call.
    """

    zero_slots: torch.Tensor | None
    rows: torch.Tensor | None
    row_valid: torch.Tensor | None
    delta: torch.Tensor | None
    cache_fill: torch.Tensor | None
    image_slots: torch.Tensor | None
    armed: bool = False


def _sink_slots(edit: AttentionEdit, slot_is_img: torch.Tensor, method_name: str) -> torch.Tensor:
    """Per sample, the slot of the sink: the ``edit.sink``-th token of its first image span."""
    b = slot_is_img.shape[0]
    sink_slot = torch.zeros(b, dtype=torch.long, device=slot_is_img.device)
    for i in range(b):
        img = torch.nonzero(slot_is_img[i]).flatten()
        if img.numel() == 0:
            continue
        gaps = torch.nonzero(img[1:] - img[:-1] != 1).flatten()
        span = int(gaps[0]) + 1 if gaps.numel() else int(img.numel())
        if edit.sink >= span:
            raise ValueError(
                f"{method_name}: the attention sink index {edit.sink} is out of range for sample {i}: "
                f"its first image has {span} tokens"
            )
        sink_slot[i] = img[edit.sink]
    return sink_slot


def prepare(
    edit: AttentionEdit,
    family: ModelFamily,
    text_config: Any,
    attn: nn.Module,
    hidden: torch.Tensor,
    pos: Any,
    slots: SlotInfo,
    method_name: str,
) -> EditContext:
    """Plan an edit of one layer in a prefill (see the module docstring).

    Parameters
    ----------
    hidden : Tensor, shape (B, L, D)
        The attention module's input (current layout).
    pos : tuple of Tensor
        Rotary tables of the current layout.
    slots : SlotInfo
    """
    b, length = slots.keys_ok.shape
    device = hidden.device
    slot_is_img = slots.is_image
    arange = torch.arange(length, device=device)
    v = family.value(attn, hidden)  # (B, H_kv, L, hd)
    sink_slot = _sink_slots(edit, slot_is_img, method_name) if edit.text_to_image == "merge" else None
    module_zero = edit.image_to_image == "drop"
    # what text queries read at image keys (also what decode steps read from the cache)
    if edit.text_to_image == "keep":
        target = v
    elif edit.text_to_image == "drop":
        target = torch.zeros_like(v)
    else:
        index = sink_slot[:, None, None, None].expand(-1, v.shape[1], 1, v.shape[-1])
        target = v.gather(2, index).expand_as(v)  # (B, H_kv, L, hd): v_sink everywhere
    needs_fix = (edit.text_to_image != "keep") != module_zero or edit.text_to_image == "merge"
    ctx = EditContext(
        zero_slots=slot_is_img if module_zero else None,
        rows=None,
        row_valid=None,
        delta=None,
        cache_fill=target if needs_fix else None,
        image_slots=slot_is_img,
    )
    ctx.armed = ctx.zero_slots is not None
    if not needs_fix:
        return ctx
    first_img = torch.where(slot_is_img, arange, torch.full_like(arange, length)).min(dim=1).values
    rows_ok = slots.keys_ok & ~slot_is_img & (arange[None, :] > first_img[:, None])
    n_rows = rows_ok.sum(1)
    max_rows = int(n_rows.max()) if b else 0
    if max_rows == 0:
        return ctx
    order = torch.sort((~rows_ok).to(torch.int8), dim=1, stable=True).indices[:, :max_rows]
    row_valid = torch.arange(max_rows, device=device)[None, :] < n_rows[:, None]
    # per image key: value the text rows should read minus what the module reads
    diff = (target - (0 if module_zero else v)).float()
    diff = diff * slot_is_img[:, None, :, None]
    deltas = []
    for start in range(0, max_rows, SCORE_CHUNK):
        rows = order[:, start : start + SCORE_CHUNK]
        probs, _ = attention_rows(family, text_config, attn, hidden, pos, rows, slots)  # (B, H, R, L)
        d = diff
        if d.shape[1] != probs.shape[1]:
            d = d.repeat_interleave(probs.shape[1] // d.shape[1], dim=1)
        delta = torch.matmul(probs, d)  # (B, H, R, hd)
        deltas.append(delta.permute(0, 2, 1, 3).reshape(b, rows.shape[1], -1))
    delta = torch.cat(deltas, dim=1).to(hidden.dtype)  # (B, R, H*hd)
    o_proj = attn.o_proj
    projected = o_proj(delta)
    if getattr(o_proj, "bias", None) is not None:
        projected = projected - o_proj.bias
    ctx.rows, ctx.row_valid, ctx.delta = order, row_valid, projected
    return ctx


def zero_image_values(output: torch.Tensor, ctx: EditContext, layer_idx: int) -> torch.Tensor:
    """The ``v_proj`` output with zeros at the image slots (``image_to_image="drop"``)."""
    if tuple(output.shape[:2]) != tuple(ctx.zero_slots.shape):
        raise contract.ContractError(
            "v_proj is applied once per token to the attention input (batch, tokens, ...)",
            f"Layer {layer_idx}: its output has shape {tuple(output.shape)}, the layout {tuple(ctx.zero_slots.shape)}.",
        )
    return output.masked_fill(ctx.zero_slots[..., None], 0)


def add_correction(out: torch.Tensor, ctx: EditContext) -> torch.Tensor:
    """The attention module's output with the text rows' corrections added."""
    if ctx.delta is None:
        return out
    add = (ctx.delta * ctx.row_valid[..., None]).to(out.dtype)
    return out.scatter_add(1, ctx.rows[..., None].expand(-1, -1, out.shape[-1]), add)


def write_cache(cache: Any, layer_idx: int, ctx: EditContext) -> None:
    """Store, at image slots, the values that decode-step (text) queries must read."""
    if ctx.cache_fill is None:
        return
    values = contract.cache_layer_values(cache, layer_idx)
    length = ctx.image_slots.shape[1]
    if values.shape[0] != ctx.image_slots.shape[0]:
        raise contract.ContractError(
            f"the KV cache of layer {layer_idx} holds one row per sample",
            f"It holds {values.shape[0]} rows for a batch of {ctx.image_slots.shape[0]}.",
        )
    n = min(int(values.shape[-2]), length)
    # a full cache holds slots 0..length-1 first; a sliding-window layer keeps the last n slots
    view = values[:, :, :length] if values.shape[-2] >= length else values
    where = ctx.image_slots[:, None, length - n :, None] if n < length else ctx.image_slots[:, None, :, None]
    fill = ctx.cache_fill[:, :, length - n :] if n < length else ctx.cache_fill
    view.copy_(torch.where(where, fill.to(values.dtype), view))
