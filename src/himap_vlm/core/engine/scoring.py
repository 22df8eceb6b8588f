"""Scoring: the attention rows a method asks for, recomputed at one layer from its own queries and keys.

The model keeps its attention kernel (SDPA, flash) everywhere; a step that needs attention
weights gets only the query rows it asked for, recomputed here in float32 from the scoring
layer's ``q_proj``/``k_proj`` (RoPE, q/k norms, grouped-query heads expanded, logit soft-capping,
sliding windows on original positions, bidirectional image blocks), in chunks of
:data:`SCORE_CHUNK` rows. The same row selection and reduction serve a materialised map
(:func:`scores_from_map`, the reference-style benchmark), so both rank tokens by one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from himap_vlm.core import contract
from himap_vlm.core.families import ModelFamily, layer_window
from himap_vlm.core.interface import LastTokenContributions, ScoreRequest

__all__ = ["SCORE_CHUNK", "SlotInfo", "attention_rows", "last_token_contributions", "query_rows", "score", "scores_from_map"]

SCORE_CHUNK = 256
"""Query rows per chunk when scoring (bounds the (B, H, rows, L) buffer)."""


@dataclass
class SlotInfo:
    """What the scoring functions need to know about the slots of the current layout.

    Attributes
    ----------
    keys_ok : BoolTensor, shape (B, L)
        Keys that may be attended (valid, not padding).
    is_image : BoolTensor, shape (B, L)
        Image slots.
    after_image : BoolTensor, shape (B, L)
        Slots after the sample's last image token (instruction tokens).
    positions : LongTensor, shape (B, L)
        Original input index of every slot (sliding windows are measured on it).
    block_ids : LongTensor, shape (B, L), optional
        Image block of every slot (``-1`` for text) for bidirectional families.
    """

    keys_ok: torch.Tensor
    is_image: torch.Tensor
    after_image: torch.Tensor
    positions: torch.Tensor
    block_ids: torch.Tensor | None = None


def attention_rows(
    family: ModelFamily,
    text_config: Any,
    attn: nn.Module,
    hidden: torch.Tensor,
    pos: Any,
    rows: torch.Tensor,
    slots: SlotInfo,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-softmax attention of some query rows of one layer, recomputed from its q/k (float32).

    Parameters
    ----------
    family : ModelFamily
    text_config : PretrainedConfig
    attn : nn.Module
        The layer's attention module.
    hidden : Tensor, shape (B, L, D)
        Its input (after the input norm; current layout).
    pos : tuple of Tensor
        Rotary ``(cos, sin)`` of the current layout (see :func:`himap_vlm.core.contract.rotary_tables`).
    rows : LongTensor, shape (B, R)
        Query slots.
    slots : SlotInfo

    Returns
    -------
    probs : Tensor, shape (B, H, R, L)
        Per head; 0 on keys a row may not attend (causal, padding, sliding window).
    allowed : BoolTensor, shape (B, R, L)
    """
    b, length = slots.keys_ok.shape
    cos, sin = contract.rotary_tables(pos, attn)
    cos = cos.expand(b, -1, -1)
    sin = sin.expand(b, -1, -1)
    scaling = float(getattr(attn, "scaling", attn.head_dim**-0.5))
    softcap = getattr(getattr(attn, "config", None), "attn_logit_softcapping", None)
    window = getattr(attn, "sliding_window", None)
    if window is None and getattr(attn, "layer_idx", None) is not None:  # e.g. Mistral: window in config
        window = layer_window(text_config, attn.layer_idx)
    key_pos = torch.arange(length, device=slots.keys_ok.device)
    q, k = family.query_key(attn, hidden, cos, sin, rows)
    q = q.float()
    k = k.float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, H, R, L)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    allowed = key_pos[None, None, :] <= rows[:, :, None]
    same_block = None
    if slots.block_ids is not None:  # image tokens see their whole image
        q_blocks = slots.block_ids.gather(1, rows)
        same_block = (q_blocks[:, :, None] == slots.block_ids[:, None, :]) & (q_blocks[:, :, None] >= 0)
        allowed |= same_block
    if window:  # measured on original indices, like the unpruned model
        in_window = slots.positions.gather(1, rows)[:, :, None] - slots.positions[:, None, :] < int(window)
        if same_block is not None and contract.image_blocks_override_window():
            in_window |= same_block
        allowed &= in_window
    allowed &= slots.keys_ok[:, None, :]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0), allowed


def query_rows(request: ScoreRequest, slots: SlotInfo) -> torch.Tensor:
    """BoolTensor (B, L): the query slots of ``request`` (padding never counts)."""
    keys_ok = slots.keys_ok
    if request.queries == "instruction":
        return slots.after_image & keys_ok
    if request.queries == "image":
        return slots.is_image & keys_ok
    if request.queries == "all":
        return keys_ok.clone()
    b, length = keys_ok.shape
    arange = torch.arange(length, device=keys_ok.device)
    last = torch.where(keys_ok, arange, torch.full_like(arange, -1)).max(dim=1).values
    rows = torch.zeros_like(keys_ok)
    rows[torch.arange(b, device=keys_ok.device), last.clamp(min=0)] = last >= 0
    return rows


def _finish(total: torch.Tensor, count: torch.Tensor, request: ScoreRequest, slots: SlotInfo) -> list[torch.Tensor]:
    if request.reduce == "mean":
        total = total / count.clamp(min=1.0)
    return [total[i][slots.is_image[i]] for i in range(total.shape[0])]


def score(
    family: ModelFamily,
    text_config: Any,
    attn: nn.Module,
    hidden: torch.Tensor,
    pos: Any,
    request: ScoreRequest,
    slots: SlotInfo,
) -> list[torch.Tensor]:
    """Per sample, the reduced attention of the requested query rows to each image token.

    Returns
    -------
    list of Tensor
        One float32 tensor per sample, shape (image tokens present,), in sequence order.
    """
    b, length = slots.keys_ok.shape
    device = hidden.device
    rows_ok = query_rows(request, slots)
    total = torch.zeros(b, length, dtype=torch.float32, device=device)
    count = torch.zeros(b, length, dtype=torch.float32, device=device)
    n_rows = rows_ok.sum(1)
    max_rows = int(n_rows.max()) if b else 0
    if max_rows > 0:
        # rows per sample, padded with row 0 (masked out below)
        order = torch.sort((~rows_ok).to(torch.int8), dim=1, stable=True).indices[:, :max_rows]
        row_valid = torch.arange(max_rows, device=device)[None, :] < n_rows[:, None]
        for start in range(0, max_rows, SCORE_CHUNK):
            rows = order[:, start : start + SCORE_CHUNK]
            rvalid = row_valid[:, start : start + SCORE_CHUNK]
            probs, allowed = attention_rows(family, text_config, attn, hidden, pos, rows, slots)
            probs = probs.mean(dim=1) * rvalid[..., None]  # (B, R, L)
            total += probs.sum(dim=1)
            count += (allowed & rvalid[..., None]).sum(dim=1).float()
    return _finish(total, count, request, slots)


def scores_from_map(attn_map: torch.Tensor, request: ScoreRequest, slots: SlotInfo) -> list[torch.Tensor]:
    """:func:`score` read from a materialised attention map instead of recomputed rows.

    Parameters
    ----------
    attn_map : Tensor, shape (B, H, L, L)
        Post-softmax attention of the scoring layer (current layout), e.g. an eager kernel's output.
    request : ScoreRequest
    slots : SlotInfo
        ``allowed`` keys per row are causal & ``keys_ok`` (what a "mean" divides by).
    """
    probs = attn_map.float().mean(dim=1)  # (B, L, L)
    rows_ok = query_rows(request, slots)
    length = probs.shape[-1]
    arange = torch.arange(length, device=probs.device)
    causal = arange[None, :] <= arange[:, None]
    allowed = causal[None] & slots.keys_ok[:, None, :] & rows_ok[:, :, None]
    total = (probs * rows_ok[:, :, None]).sum(dim=1)
    count = allowed.sum(dim=1).float()
    return _finish(total, count, request, slots)


def last_token_contributions(
    family: ModelFamily, text_config: Any, attn: nn.Module, hidden: torch.Tensor, pos: Any, slots: SlotInfo
) -> LastTokenContributions:
    """Contributions of every key to the last input token's attention output (see the class)."""
    b, length = slots.keys_ok.shape
    arange = torch.arange(length, device=slots.keys_ok.device)
    last = torch.where(slots.keys_ok, arange, torch.full_like(arange, -1)).max(dim=1).values  # (B,)
    probs, _ = attention_rows(family, text_config, attn, hidden, pos, last.clamp(min=0)[:, None], slots)
    probs = probs * (last >= 0)[:, None, None, None]  # (B, H, 1, L)
    v = family.value(attn, hidden).float()  # (B, H_kv, L, hd)
    if v.shape[1] != probs.shape[1]:
        v = v.repeat_interleave(probs.shape[1] // v.shape[1], dim=1)
    contrib = (probs[:, :, 0, :, None] * v).permute(0, 2, 1, 3).reshape(b, length, -1)  # (B, L, H*hd)
    return LastTokenContributions(
        image=[contrib[i][slots.is_image[i]] for i in range(b)], output=contrib.sum(dim=1)
    )


def key_l1(family: ModelFamily, attn: nn.Module, hidden: torch.Tensor, pos: Any, slots: SlotInfo) -> torch.Tensor:
    """L1 norm of every slot's key (post-RoPE, kv heads concatenated), shape (B, L), float32."""
    cos, sin = contract.rotary_tables(pos, attn)
    b, length = slots.keys_ok.shape
    rows = torch.zeros(b, 1, dtype=torch.long, device=hidden.device)
    _, k = family.query_key(attn, hidden, cos.expand(b, -1, -1), sin.expand(b, -1, -1), rows)
    return k.float().abs().sum(dim=(1, 3))  # (B, H_kv, L, hd) -> (B, L)
