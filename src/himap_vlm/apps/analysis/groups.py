"""Token groups of one prompt: system, image, instruction (and text between images).

The information-flow analysis of the HiMAP paper (§2–3) splits the input sequence into three
groups (``/work/shared/reference/methods.md``, "Information-flow analysis"):

``sys``
    every token before the first image token (BOS, system prompt, chat-template header);
``img``
    every image token (``input_ids == image_token_id``), of every image;
``ins``
    every token after the last image token (instruction, question, chat-template footer; the last
    input token is always here when the prompt ends in text).

With several images, the text between two images belongs to none of the three; it is kept as the
fourth group ``other`` so that shares still add up to one. Padding (``attention_mask == 0``) is in
no group. Indices always refer to positions in the given (possibly padded) sequence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

GROUPS: tuple[str, str, str] = ("sys", "img", "ins")
"""The three groups of the paper, in display order."""

ALL_GROUPS: tuple[str, str, str, str] = ("sys", "img", "ins", "other")
"""The three groups plus ``other`` (text between images)."""


@dataclass(frozen=True)
class TokenGroups:
    """Index sets of one sequence.

    Attributes
    ----------
    sys, img, ins, other : ndarray of int64, shape (n_group,)
        Sorted positions of each group in the sequence (see the module docstring).
    length : int
        Length of the sequence the indices refer to (padding included).
    """

    sys: np.ndarray
    img: np.ndarray
    ins: np.ndarray
    other: np.ndarray
    length: int

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in ALL_GROUPS:
            raise KeyError(f"unknown token group {name!r}; groups are {ALL_GROUPS}")
        return getattr(self, name)

    @property
    def sizes(self) -> dict[str, int]:
        """Number of tokens in every group (``other`` included)."""
        return {g: int(len(self[g])) for g in ALL_GROUPS}

    @property
    def valid(self) -> np.ndarray:
        """Sorted positions of every non-padding token, shape (n_valid,)."""
        return np.sort(np.concatenate([self.sys, self.img, self.ins, self.other]))

    @property
    def outside_sys(self) -> np.ndarray:
        """Non-padding positions from the first image on (``img``, ``other`` and ``ins``)."""
        return np.sort(np.concatenate([self.img, self.other, self.ins]))

    def as_dict(self) -> dict[str, list[int]]:
        """Plain lists of every group (for JSON)."""
        return {g: [int(i) for i in self[g]] for g in ALL_GROUPS}


def token_groups(
    input_ids: torch.Tensor | np.ndarray,
    image_token_id: int,
    attention_mask: torch.Tensor | np.ndarray | None = None,
) -> TokenGroups:
    """Split one sequence into ``sys`` / ``img`` / ``ins`` / ``other`` index sets.

    Parameters
    ----------
    input_ids : Tensor or ndarray, shape (S,)
        Token ids of one sample (a row of a batch).
    image_token_id : int
        The image placeholder id (``ModelFamily.image_token_id(config)``).
    attention_mask : Tensor or ndarray, shape (S,), optional
        ``0`` marks padding, which is in no group (left or right padding alike).

    Returns
    -------
    TokenGroups

    Raises
    ------
    ValueError
        If the sequence holds no image token or is not one-dimensional.
    """
    ids = np.asarray(input_ids.detach().cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_groups expects one sequence of shape (S,), got shape {ids.shape}")
    valid = np.ones(ids.shape, dtype=bool)
    if attention_mask is not None:
        am = np.asarray(attention_mask.detach().cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask)
        valid = am.astype(bool)
    pos = np.arange(len(ids))
    is_img = (ids == image_token_id) & valid
    if not is_img.any():
        raise ValueError("the sequence holds no image token; the analysis needs at least one image")
    first, last = pos[is_img][0], pos[is_img][-1]
    sys = pos[valid & (pos < first)]
    ins = pos[valid & (pos > last)]
    other = pos[valid & ~is_img & (pos > first) & (pos < last)]
    return TokenGroups(sys=sys, img=pos[is_img], ins=ins, other=other, length=len(ids))


def group_sums(matrix: torch.Tensor, groups: TokenGroups, names: tuple[str, ...] = GROUPS) -> torch.Tensor:
    """Sum of a (query × key) matrix over every pair of groups.

    Parameters
    ----------
    matrix : Tensor, shape (S, S)
        E.g. the saliency map ``I_l`` (rows = queries / receivers, columns = keys / sources).
    groups : TokenGroups
    names : tuple of str
        Groups to use, in order.

    Returns
    -------
    Tensor, shape (len(names), len(names))
        ``out[a, b] = Σ_{i ∈ names[a], j ∈ names[b]} matrix[i, j]``.
    """
    device = matrix.device
    idx = [torch.as_tensor(groups[n], dtype=torch.long, device=device) for n in names]
    out = torch.zeros(len(names), len(names), dtype=matrix.dtype, device=device)
    for a, rows in enumerate(idx):
        if rows.numel() == 0:
            continue
        sub = matrix.index_select(0, rows)
        for b, cols in enumerate(idx):
            if cols.numel():
                out[a, b] = sub.index_select(1, cols).sum()
    return out


def vector_group_sums(vector: torch.Tensor, groups: TokenGroups, names: tuple[str, ...] = ALL_GROUPS) -> dict[str, float]:
    """Sum of a per-token vector (shape (S,)) over every group."""
    out: dict[str, float] = {}
    for n in names:
        idx = torch.as_tensor(groups[n], dtype=torch.long, device=vector.device)
        out[n] = float(vector.index_select(0, idx).sum()) if idx.numel() else 0.0
    return out


def groups_from_mapping(data: Mapping[str, list[int]], length: int) -> TokenGroups:
    """Rebuild :class:`TokenGroups` from :meth:`TokenGroups.as_dict` output."""
    arr = {g: np.asarray(data.get(g, []), dtype=np.int64) for g in ALL_GROUPS}
    return TokenGroups(length=length, **arr)
