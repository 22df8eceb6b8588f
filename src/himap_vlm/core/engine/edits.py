"""Attention edits: post-softmax changes between text queries and image keys, kernel untouched.

An :class:`~himap_vlm.core.interface.AttentionEdit` only changes which *value* a query reads at an
image key (``o_i = Σ_j a_ij v'_j`` with ``v'_j`` = ``v_j``, 0 or ``v_sink``), so a layer keeps its
own kernel (SDPA, flash, eager):

* image queries: with ``image_to_image="drop"`` a ``v_proj`` hook hands the module zero values at
  image slots (:func:`zero_image_values`), so the module computes the image rows exactly;
* text queries (few: the instruction): their image-key weights ``a_ij`` are recomputed from the
  layer's q/k (like the scores) and the difference ``Σ_img a_ij (v'_j - v_module_j)`` is added to
  the module output through ``o_proj`` (:func:`add_correction`);
* decode steps: the edits are a prefill-only change, as in VisiPruner's authors' code (they edit
  only when the query length exceeds the prompt's); generated tokens attend normally. The cache
  therefore keeps the true values: where the ``v_proj`` hook zeroed them for the module's own
  call, :func:`write_cache` puts them back after it.

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
        The true values, restored in the cache at image slots after the module zeroed them.
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
    query_limit: int | None = None,
) -> EditContext:
    """Plan an edit of one layer in a prefill (see the module docstring).

    Parameters
    ----------
    hidden : Tensor, shape (B, L, D)
        The attention module's input (current layout).
    pos : tuple of Tensor
        Rotary tables of the current layout.
    slots : SlotInfo
    query_limit : int, optional
        Only text queries at input positions below this are edited (the prompt, when a no-cache
        forward re-runs a ``generate`` call's prompt plus generated tokens).
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
        dropped = slot_is_img
        if edit.text_image_fraction < 1.0:  # only the first int(n * fraction) image tokens
            rank = torch.cumsum(slot_is_img.long(), dim=1) - 1
            limit = (slot_is_img.sum(1).float() * edit.text_image_fraction).long()
            dropped = slot_is_img & (rank < limit[:, None])
        target = v.masked_fill(dropped[:, None, :, None], 0.0)
    else:
        index = sink_slot[:, None, None, None].expand(-1, v.shape[1], 1, v.shape[-1])
        target = v.gather(2, index).expand_as(v)  # (B, H_kv, L, hd): v_sink everywhere
    # text rows need a correction unless what they should read is what the module reads
    reads_module = (edit.text_to_image == "keep" and not module_zero) or (
        edit.text_to_image == "drop" and edit.text_image_fraction == 1.0 and module_zero
    )
    needs_fix = not reads_module
    ctx = EditContext(
        zero_slots=slot_is_img if module_zero else None,
        rows=None,
        row_valid=None,
        delta=None,
        cache_fill=v if module_zero else None,
        image_slots=slot_is_img,
    )
    ctx.armed = ctx.zero_slots is not None
    first_img = torch.where(slot_is_img, arange, torch.full_like(arange, length)).min(dim=1).values
    text_rows = slots.keys_ok & ~slot_is_img & (arange[None, :] > first_img[:, None])
    module_v = torch.zeros_like(v) if module_zero else v
    groups = []  # (rows, per-key value the rows should read minus what the module gives them)
    edited = text_rows if query_limit is None else text_rows & (slots.positions < query_limit)
    if needs_fix:
        groups.append((edited, target - module_v))
    if module_zero and query_limit is not None:  # generated tokens past the prompt read the true values
        groups.append((text_rows & ~edited, v - module_v))
    parts = [_correction(family, text_config, attn, hidden, pos, slots, rows_ok, diff) for rows_ok, diff in groups]
    parts = [p for p in parts if p is not None]
    if parts:
        ctx.rows = torch.cat([p[0] for p in parts], dim=1)
        ctx.row_valid = torch.cat([p[1] for p in parts], dim=1)
        ctx.delta = torch.cat([p[2] for p in parts], dim=1)
    return ctx


def _correction(
    family: ModelFamily,
    text_config: Any,
    attn: nn.Module,
    hidden: torch.Tensor,
    pos: Any,
    slots: SlotInfo,
    rows_ok: torch.Tensor,
    diff: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(rows, row_valid, delta)``: the output correction ``o_proj(Σ_img a_ij diff_j)`` of ``rows_ok``."""
    b = rows_ok.shape[0]
    device = hidden.device
    n_rows = rows_ok.sum(1)
    max_rows = int(n_rows.max()) if b else 0
    if max_rows == 0:
        return None
    order = torch.sort((~rows_ok).to(torch.int8), dim=1, stable=True).indices[:, :max_rows]
    row_valid = torch.arange(max_rows, device=device)[None, :] < n_rows[:, None]
    diff = diff.float() * slots.is_image[:, None, :, None]
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
    return order, row_valid, projected


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
    """Put the true values back in the cache at the image slots the ``v_proj`` hook zeroed."""
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
