"""Blocking one information flow inside the attention: which pairs, and the hooks that mask them.

At a blocked layer the attention *logits* of the chosen (query, key) pairs are set to ``-inf``
before the softmax (the authors' procedure, ``src/HiMAP/validate/disruption_forward.py``; the
softmax renormalises over the keys left). A forward pre-hook hands the attention module of that
layer a modified additive (eager) or boolean (SDPA) mask; other layers are untouched. Flows:

``img2txt``
    queries in ``ins`` (tokens after the last image) and every generated token, keys in ``img``.
``img2img``
    queries and keys in ``img``.
``img2rnd``
    control, keys in ``img``; query rows drawn at random outside ``sys``:

    * ``paper`` convention: ``|ins|`` rows of the prompt, drawn once (per sample and layer);
    * ``authors`` convention: ``T − |sys| − |img|`` rows among the ``T − |sys|`` positions after
      ``sys`` (generated tokens included) with ``T`` the current sequence length, drawn again at
      every forward pass and shared by all blocked layers of that pass — ``torch.randperm(seq_length
      - SYS_LEN)[:TXT_LEN] + SYS_LEN`` in the authors' code, which generates with
      ``use_cache=False`` so every step is a full forward pass. Draws here are seeded.
``none``
    control: the hooks run, nothing is masked.

:func:`block_flow` is the low-level context manager; :mod:`himap_vlm.apps.analysis.blocking`
builds the measurement on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from himap_vlm.apps.analysis._common import AnalysisSession, resolve_layers
from himap_vlm.apps.analysis.conventions import DEFAULT_CONVENTION, get_convention
from himap_vlm.apps.analysis.groups import TokenGroups
from himap_vlm.core import contract

FLOWS: tuple[str, ...] = ("img2txt", "img2img", "img2rnd", "none")
"""Every flow :func:`block_flow` knows."""

DEFAULT_FLOWS: tuple[str, ...] = ("img2txt", "img2img", "img2rnd")


class RandomRows:
    """The authors' ``img2rnd`` rows: a fresh seeded draw for every sequence length (forward pass).

    Parameters
    ----------
    groups : TokenGroups
        Groups of the prompt (batch of one, no padding).
    rng : numpy Generator

    Notes
    -----
    Draws are memoised by sequence length ``T``: every blocked layer of one forward pass sees the
    same rows (the authors' mask tensor is shared by those layers), the next generated token (a
    longer sequence) gets a new draw.
    """

    def __init__(self, groups: TokenGroups, rng: np.random.Generator):
        self.prompt_length = groups.length
        self.n_sys, self.n_img = len(groups.sys), len(groups.img)
        self.outside_sys = groups.outside_sys
        self.rng = rng
        self._draws: dict[int, np.ndarray] = {}

    def __call__(self, length: int) -> np.ndarray:
        """Sorted query rows (int64) for a forward pass over ``length`` tokens."""
        if length not in self._draws:
            pool = np.concatenate([self.outside_sys, np.arange(self.prompt_length, length, dtype=np.int64)])
            count = max(0, min(length - self.n_sys - self.n_img, len(pool)))
            self._draws[length] = np.sort(self.rng.permutation(pool)[:count]).astype(np.int64)
        return self._draws[length]


@dataclass(frozen=True)
class BlockSpec:
    """Which (query, key) pairs are blocked, in sequence positions.

    Attributes
    ----------
    rows : ndarray of int64
        Blocked query positions of the prompt (ignored when ``redraw`` is set).
    cols : ndarray of int64
        Blocked key positions.
    generated_rows : bool
        Whether queries at positions ``>= prompt_length`` (generated tokens) are blocked too.
    prompt_length : int
    redraw : RandomRows or None
        Rows drawn again for every forward pass (the authors' ``img2rnd``).
    """

    rows: np.ndarray
    cols: np.ndarray
    generated_rows: bool
    prompt_length: int
    redraw: RandomRows | None = field(default=None, compare=False)

    def rows_at(self, length: int) -> np.ndarray:
        """Blocked prompt-or-generated query rows of a forward pass over ``length`` tokens."""
        return self.redraw(length) if self.redraw is not None else self.rows

    @property
    def needs_full_recompute(self) -> bool:
        """Whether generation must recompute every position at every step (``use_cache=False``)."""
        return self.redraw is not None


def block_spec(
    groups: TokenGroups,
    flow: str,
    rng: np.random.Generator | None = None,
    *,
    convention: str = DEFAULT_CONVENTION,
) -> BlockSpec:
    """The (query, key) sets of ``flow`` for a prompt with token groups ``groups``.

    Parameters
    ----------
    groups : TokenGroups
    flow : {"img2txt", "img2img", "img2rnd", "none"}
    rng : numpy Generator, optional
        Draws the random rows of ``img2rnd`` (default: seed 0).
    convention : {"authors", "paper"}
        Only changes ``img2rnd`` (see the module docstring).

    Raises
    ------
    ValueError
        For an unknown flow, or when an image query would be left with no key (no token before the
        first image).
    """
    conv = get_convention(convention)
    empty = np.zeros(0, dtype=np.int64)
    if flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}; choose from {FLOWS}")
    if flow == "none":
        return BlockSpec(empty, empty, False, groups.length)
    if flow in ("img2img", "img2rnd") and len(groups.sys) == 0:
        raise ValueError(
            f"flow {flow!r} blocks image queries from every image key, but the prompt has no token before the "
            "first image: those queries would have no key left; put text (e.g. a system prompt) before the image"
        )
    if flow == "img2txt":
        return BlockSpec(groups.ins, groups.img, True, groups.length)
    if flow == "img2img":
        return BlockSpec(groups.img, groups.img, False, groups.length)
    rng = rng if rng is not None else np.random.default_rng(0)
    if conv.random_rows == "per_forward_pass":
        return BlockSpec(empty, groups.img, False, groups.length, redraw=RandomRows(groups, rng))
    pool = groups.outside_sys
    rows = np.sort(rng.choice(pool, size=min(len(groups.ins), len(pool)), replace=False)).astype(np.int64)
    return BlockSpec(rows, groups.img, False, groups.length)


def blocked_pairs(spec: BlockSpec | None, offset: int, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Bool (q_len, k_len): True where query ``offset + a`` may not see key ``j`` (all False for ``None``)."""
    if spec is None:
        return torch.zeros(q_len, k_len, dtype=torch.bool, device=device)
    q_pos = torch.arange(offset, offset + q_len, device=device)
    row_blocked = torch.zeros(q_len, dtype=torch.bool, device=device)
    rows = spec.rows_at(offset + q_len)
    if len(rows):
        row_blocked |= torch.isin(q_pos, torch.as_tensor(rows, device=device))
    if spec.generated_rows:
        row_blocked |= q_pos >= spec.prompt_length
    col_blocked = torch.zeros(k_len, dtype=torch.bool, device=device)
    cols = torch.as_tensor(spec.cols[spec.cols < k_len], dtype=torch.long, device=device)
    col_blocked[cols] = True
    return row_blocked[:, None] & col_blocked[None, :]


def block_mask(
    mask: Any,
    specs: Sequence[BlockSpec | None],
    offset: int,
    q_len: int,
    eager: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The layer's mask with each batch row's blocked pairs removed.

    Parameters
    ----------
    mask : Tensor of shape (B or 1, 1, q_len, K) (float additive or bool "allowed"), or None
        The mask the layer was given (``None``: plain causal, SDPA without padding).
    specs : sequence of BlockSpec or None, length B
        What each batch row blocks at this layer (``None``: nothing).
    offset : int
        Tokens already in the layer's cache (position of the first query).

    Returns
    -------
    Tensor, shape (B, 1, q_len, K)
        Float masks get ``-inf`` at the blocked pairs, bool masks ``False``. The input mask is not
        modified (a new tensor is returned).
    """
    b = len(specs)
    if mask is None:
        k_len = offset + q_len
        q_pos = torch.arange(offset, offset + q_len, device=device)
        causal = torch.arange(k_len, device=device)[None, :] <= q_pos[:, None]
        mask = causal[None, None].expand(b, 1, q_len, k_len)
        if eager:
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, float("-inf"))
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise TypeError(f"flow blocking needs a 4-D tensor attention mask (eager or SDPA); got {type(mask).__name__}")
    if mask.shape[0] not in (1, b):
        raise ValueError(f"flow blocking: mask batch {mask.shape[0]} does not match {b} blocking rows")
    blocked = torch.stack(
        [blocked_pairs(spec, offset, mask.shape[-2], mask.shape[-1], mask.device) for spec in specs]
    )[:, None]  # (B, 1, q, K)
    mask = mask.expand(b, *mask.shape[1:])
    if mask.dtype == torch.bool:
        return mask & ~blocked
    return mask.masked_fill(blocked, float("-inf"))


def install_block_hooks(session: AnalysisSession, layer_specs: Mapping[int, Sequence[BlockSpec | None]]) -> None:
    """Pre-hooks on the attention modules of ``layer_specs``' layers (one spec per batch row)."""
    eager = session.attn_implementation == "eager"

    def make(layer_idx: int, specs: Sequence[BlockSpec | None]) -> Any:
        def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                hidden = args[0]
            elif "hidden_states" in kwargs:
                hidden = kwargs["hidden_states"]
            else:
                raise RuntimeError("flow blocking: the attention module was called without hidden_states")
            if "attention_mask" not in kwargs and len(args) > 1:
                raise RuntimeError("flow blocking expects the attention mask as the 'attention_mask' keyword")
            rows = list(specs)
            if len(rows) == 1 and hidden.shape[0] > 1:
                rows = rows * hidden.shape[0]  # one spec for every (identical) row
            if hidden.shape[0] != len(rows):
                raise ValueError(f"flow blocking: batch of {hidden.shape[0]} rows, {len(rows)} blocking specs")
            cache = session.contract.find_cache(kwargs, f"the attention module of layer {layer_idx}")
            offset = contract.cache_length(cache, layer_idx)
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = block_mask(
                kwargs.get("attention_mask"), rows, offset, hidden.shape[1], eager, hidden.dtype, hidden.device
            )
            return args, kwargs

        return pre_hook

    for layer, specs in layer_specs.items():
        session.hook(session.attn_modules[layer].register_forward_pre_hook(make(layer, list(specs)), with_kwargs=True))


@contextlib.contextmanager
def blocking_session(model: torch.nn.Module, layer_specs: Mapping[int, Sequence[BlockSpec | None]]) -> Iterator[None]:
    """Install :func:`install_block_hooks` for the context (flash/flex attention switched to SDPA)."""
    current = AnalysisSession(model).attn_implementation
    with AnalysisSession(model, attn_implementation=None if current in ("eager", "sdpa") else "sdpa") as session:
        install_block_hooks(session, layer_specs)
        yield


@contextlib.contextmanager
def block_flow(
    model: torch.nn.Module,
    groups: TokenGroups,
    flow: str,
    layers: int | Sequence[int],
    *,
    seed: int = 0,
    rng: np.random.Generator | None = None,
    convention: str = DEFAULT_CONVENTION,
) -> Iterator[BlockSpec]:
    """Block ``flow`` at exactly ``layers`` while the context is open (forward calls of one sample).

    Installs a forward pre-hook on the attention module of each blocked layer that replaces its
    ``attention_mask`` keyword with one where the blocked (query, key) logits are ``-inf``.
    Works for prefill and for decode steps (the query positions are read from the layer's cache
    length). The attention implementation stays as it is when it is ``eager`` or ``sdpa``; any
    other (flash, flex) is switched to ``sdpa`` for the context. Everything is restored on exit.

    Parameters
    ----------
    model : nn.Module
    groups : TokenGroups
        Groups of the prompt that will be run (batch of one, or identical rows).
    flow : {"img2txt", "img2img", "img2rnd", "none"}
    layers : int or sequence of int
        Blocked layer(s), as given: the authors' window is ``range(l, num_layers)``.
    seed : int
        Seed of ``img2rnd``'s rows (when ``rng`` is not given).
    rng : numpy Generator, optional
    convention : {"authors", "paper"}
        How ``img2rnd`` draws its rows (see the module docstring). The authors' per-pass redraw
        reproduces their runs only under full-recompute generation (``use_cache=False``); with a
        KV cache, earlier positions keep the rows of the pass that computed them.

    Yields
    ------
    BlockSpec
        The blocked pairs.
    """
    with AnalysisSession(model) as session:
        blocked = resolve_layers(layers, session.num_layers)
    spec = block_spec(groups, flow, rng if rng is not None else np.random.default_rng(seed), convention=convention)
    with blocking_session(model, {layer: [spec] for layer in blocked}):
        yield spec
