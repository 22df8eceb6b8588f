"""What a pruned prefill returns, scattered back to the input's positions.

The language model of a pruned prefill ends on a shortened sequence; the caller (``generate``,
the user) expects tensors that line up with ``input_ids``. See :class:`~himap_vlm.core.engine.PruningRun`
(Notes) for the documented layout of every returned tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from himap_vlm.core import contract
from himap_vlm.core.engine.layout import Layout, scatter_to_input
from himap_vlm.core.engine.state import PrefillState

__all__ = ["align_outputs"]


def align_outputs(st: PrefillState, output: Any, norm: nn.Module | None, num_layers: int) -> Any:
    """The language model's ``output`` with every per-position tensor at input positions.

    ``last_hidden_state``: kept tokens from the last layer, dropped tokens with the state they left
    with (through ``norm``), 0 at padding. ``hidden_states`` (when requested): the model's own
    tensors for the embeddings and the layers before the first drop; for a layer that ran on a
    shortened sequence, its outputs at the positions it processed and 0 elsewhere (padding
    included); the last entry is ``last_hidden_state``. ``attentions`` (eager): the model's own
    maps before the first drop, then (B, H, S, S) with 0 at rows and columns a layer did not process.
    """
    hidden = contract.decoder_output_hidden(output)
    b, s = st.input_ids.shape
    full = hidden.new_zeros(b, s, hidden.shape[-1])
    for rows, cols, states in st.dropped:
        full[rows, cols] = norm(states) if norm is not None else states
    last = st.layout
    real = last.valid & last.mask2d
    rows = torch.arange(b, device=hidden.device)[:, None].expand_as(last.idx)
    full[rows[real], last.idx[real]] = hidden[real]
    full = full * st.attn2d[..., None].to(full.dtype)  # padding positions: 0
    output = contract.with_decoder_output_hidden(output, full)
    # Layers before the first drop processed the full input: their own tensors are returned as they
    # are (what the unpruned model returns, and still part of the autograd graph).
    per_layer = getattr(output, "hidden_states", None)
    if isinstance(per_layer, tuple) and len(per_layer) == num_layers + 1:
        aligned = [per_layer[0]]
        for i, h in enumerate(per_layer[1:-1]):
            lay = st.layer_layouts[i]
            aligned.append(_scatter_layer(h, lay, s) if h is not None and lay.segment > 0 else h)
        aligned.append(full)
        output.hidden_states = tuple(aligned)
    attentions = getattr(output, "attentions", None)
    if isinstance(attentions, tuple) and len(attentions) == num_layers:
        output.attentions = tuple(
            _scatter_attention(a, st.layer_layouts[i], s)
            if isinstance(a, torch.Tensor) and st.layer_layouts[i].segment > 0
            else a
            for i, a in enumerate(attentions)
        )
    return output


def _scatter_layer(h: torch.Tensor, lay: Layout, s: int) -> torch.Tensor:
    """(B, L, D) per-slot states -> (B, S, D) at input positions; padding and absent tokens 0."""
    return scatter_to_input(h, Layout(idx=lay.idx, valid=lay.valid & lay.mask2d), s)


def _scatter_attention(a: torch.Tensor, lay: Layout, s: int) -> torch.Tensor:
    """(B, H, L, L) -> (B, H, S, S) at input positions; 0 where the layer did not process a token."""
    b, heads, q, k = a.shape
    if q != lay.idx.shape[1] or k != lay.idx.shape[1]:
        raise contract.ContractError(
            "attention weights returned in a prefill cover the layer's own tokens",
            f"Got a ({q}, {k}) map for a layer that processed {lay.idx.shape[1]} slots.",
        )
    out = a.new_zeros(b, heads, s, s)
    real = lay.valid & lay.mask2d
    for i in range(b):
        pos = lay.idx[i][real[i]]
        out[i, :, pos[:, None], pos[None, :]] = a[i][:, real[i]][:, :, real[i]]
    return out
