"""Keep decisions, applied: the state changes of one drop in a prefill.

Every pruning decision — a static step's ``select``, a dynamic method's ``on_layer``, or a
re-applied selection — ends in :func:`apply_keep`: the new layout, the dropped tokens' states
(for the aligned output), the decision recorded for re-use, and the positions of the kept tokens.
"""

from __future__ import annotations

import torch

from himap_vlm.core.engine.layout import dropped_slots, gather_seq, keep_slots, shrink
from himap_vlm.core.engine.scoring import SlotInfo
from himap_vlm.core.engine.state import PrefillState

__all__ = ["apply_keep", "replayed_choice", "step_features"]


def apply_keep(
    st: PrefillState,
    layer_idx: int,
    hidden: torch.Tensor,
    chosen: list[torch.Tensor | None],
    source: str,
    *,
    renumber: bool,
    renumber_decode: bool,
    flash: bool,
) -> torch.Tensor:
    """Drop image tokens from layer ``layer_idx`` on: the mechanics of every pruning decision.

    Parameters
    ----------
    st : PrefillState
        The prefill (its layout is replaced).
    hidden : Tensor, shape (B, L, D)
        The input of layer ``layer_idx`` in the current layout.
    chosen : list of (LongTensor or None)
        Per sample, indices into its image tokens still present (sequence order) to keep;
        ``None`` keeps them all.
    source : str
        Who decided (for errors).
    renumber, renumber_decode : bool
        The method's position policy (see :data:`himap_vlm.core.interface.PositionPolicy`).
    flash : bool
        Whether the model runs flash attention (it takes per-slot positions).

    Returns
    -------
    Tensor, shape (B, L', D)
        The hidden states of the new layout (left fillers where samples keep fewer tokens).
    """
    lay = st.layout
    slot_is_img = st.is_image.gather(1, lay.idx) & lay.valid
    kept = []
    for i in range(lay.idx.shape[0]):
        try:
            kept.append(keep_slots(lay.valid[i], slot_is_img[i], chosen[i], source))
        except ValueError as exc:
            raise ValueError(f"{exc} for sample {i} at layer {layer_idx}") from None
    for i, gone in enumerate(dropped_slots(lay, kept)):
        if gone.numel():
            st.dropped.append((torch.full_like(gone, i), lay.idx[i, gone], hidden[i, gone].detach().clone()))
    st.decided.drops[layer_idx] = [
        None if chosen[i] is None else lay.idx[i][k][slot_is_img[i][k]].cpu() for i, k in enumerate(kept)
    ]
    new, rel = shrink(lay, kept, st.attn2d)
    if renumber:
        new.position_ids = (torch.cumsum(new.mask2d.long(), dim=1) - 1).clamp(min=0)
        if st.replay is not None and not renumber_decode:
            # generated tokens re-run without a cache keep the positions a cached decode gives
            # them (the full-length numbering), so the answer equals the cached one
            full = (torch.cumsum(st.attn2d.long(), dim=1) - 1).clamp(min=0).gather(1, new.idx)
            new.position_ids = torch.where(new.idx < st.replay.input_ids.shape[1], new.position_ids, full)
        st.segment_rope_positions[new.segment] = new.position_ids
    else:
        new.position_embeddings = gather_seq(st.full_pos_emb, new.idx, -2)
        new.position_ids = gather_seq(st.full_pos_ids, new.idx, -1)
    if flash:
        new.flash_position_ids = torch.arange(new.idx.shape[1], device=new.idx.device)[None].expand(
            new.idx.shape[0], -1
        )
    st.layout = new
    return hidden.gather(1, rel[..., None].expand(-1, -1, hidden.shape[-1]))


def replayed_choice(st: PrefillState, layer_idx: int) -> list[torch.Tensor | None]:
    """Indices into the current image tokens that keep the recorded original positions."""
    slots = st.slots()
    chosen: list[torch.Tensor | None] = []
    for i, kept in enumerate(st.replay.drops[layer_idx]):
        if kept is None:
            chosen.append(None)
            continue
        present = st.layout.idx[i][slots.is_image[i]]
        chosen.append(torch.nonzero(torch.isin(present, kept.to(present.device))).flatten())
    return chosen


def step_features(
    st: PrefillState,
    step_index: int,
    names: tuple[str, ...],
    hidden: torch.Tensor,
    slots: SlotInfo,
    norm: torch.nn.Module,
) -> list[dict[str, torch.Tensor]]:
    """Per sample, the requested features over its real tokens (see :class:`~himap_vlm.core.interface.StepInput`)."""
    batched = st.features.pop(step_index, {})
    if "hidden_normed" in names:
        with torch.no_grad():
            batched["hidden_normed"] = norm(hidden).float()
    real = slots.keys_ok
    out = []
    for i in range(hidden.shape[0]):
        sample = {name: batched[name][i][real[i]] for name in names}
        sample["is_image"] = slots.is_image[i][real[i]]
        sample["after_image"] = slots.after_image[i][real[i]]
        out.append(sample)
    return out
