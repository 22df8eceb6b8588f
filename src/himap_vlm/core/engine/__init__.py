"""The pruning engine: the one place that drops image tokens inside a language model.

A :class:`PruningRun` (what ``method(model)`` returns) installs forward hooks — never patched
forward methods — on a stock transformers v5 model:

* a pre-hook on the top-level model remembers ``input_ids`` (image tokens are found where
  ``input_ids == config.image_token_id``; no hard-coded offsets, any number of images);
* a pre-hook on the language model decides whether this forward is a *prefill* (empty cache:
  pruning happens here), a *continuation* (decode steps on the shortened per-layer caches), or a
  pass-through (no ``input_ids`` to locate images);
* a pre-hook on every decoder layer swaps in the gathered hidden states, RoPE ``(cos, sin)``,
  ``position_ids`` and a rebuilt attention mask once tokens have been dropped;
* a pre-hook on the attention module of each scoring layer recomputes *only the attention rows a
  method asked for* from that layer's own queries and keys (so SDPA / flash stay in use);
* a hook on the language model's output scatters the final hidden states back to the original
  sequence length (dropped tokens get their normed hidden state from the layer they left), so
  logits keep the input's shape;
* for *dynamic* methods (``method.dynamic``), a pre-hook on each attention module hands the
  method a :class:`LayerView` of that layer (``method.on_layer``), whose per-sample keep sets
  take effect from the next layer on (decisions that depend on the input and differ per sample);
* for methods with :class:`~himap_vlm.core.methods.base.AttentionEdit` s, hooks on the attention module
  of those layers apply post-softmax edits between text queries and image keys while the module
  keeps its own kernel (see :meth:`PruningRun._edit_prepare`).

Batches: every sample keeps its own index set. When samples keep different numbers of tokens,
rows are left-filled with masked filler slots so tensors stay rectangular; fillers are masked
out as keys everywhere and never reach the output.

Several images in one sample (LLaVA-NeXT tiles, Idefics3 splits, multi-image prompts): the image
tokens are *all* placeholder positions of the sample, whatever span they sit in; the instruction
tokens are those after the sample's last image placeholder; a method's budget (ratio, count)
applies to all image tokens of the sample together. Masks and positions of pruned layers follow
the family record (:mod:`himap_vlm.core.families`): original rotary tables (3-D M-RoPE included), sliding
windows measured on original positions, bidirectional image blocks where the model has them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from himap_vlm.core import contract
from himap_vlm.core.families import (
    LayerMaskContext,
    ModelFamily,
    image_block_ids,
    layer_type,
    layer_window,
    resolve_family,
)
from himap_vlm.core.methods.base import AttentionEdit, PruningMethod, ScoreRequest

_SCORE_CHUNK = 256  # query rows per chunk when scoring (bounds the (B, H, rows, L) buffer)


@dataclass
class _Layout:
    """Which original tokens a group of layers processes.

    Attributes
    ----------
    idx : LongTensor, shape (B, L)
        Index into the original (padded) input sequence of every slot.
    valid : BoolTensor, shape (B, L)
        False for filler slots (rectangularity padding).
    """

    idx: torch.Tensor
    valid: torch.Tensor
    segment: int = 0
    mask2d: torch.Tensor | None = None  # (B, L) keys allowed (valid & not original padding)
    position_embeddings: Any = None
    position_ids: Any = None
    flash_position_ids: Any = None


@dataclass
class _PrefillState:
    input_ids: torch.Tensor  # (B, S)
    attn2d: torch.Tensor  # (B, S) bool
    is_image: torch.Tensor  # (B, S) bool
    after_last_image: torch.Tensor  # (B, S) bool: instruction tokens
    layout: _Layout
    cache: Any = None
    scores: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    dropped: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    mask_cache: dict[Any, Any] = field(default_factory=dict)  # (segment, layer type) -> mask
    full_pos_emb: Any = None
    full_pos_ids: Any = None
    block_ids: torch.Tensor | None = None  # (B, S) image block per token (bidirectional families)
    pos_cache: dict[Any, Any] = field(default_factory=dict)  # (segment, id) -> gathered per-type RoPE
    pending_keep: tuple[int, list[torch.Tensor | None]] | None = None  # (decided at layer, per sample)
    method_state: dict[str, Any] = field(default_factory=dict)  # LayerView.state (one prefill)
    edit_ctx: dict[int, _EditContext] = field(default_factory=dict)


@dataclass
class _EditContext:
    """Per-layer work of an :class:`AttentionEdit` in one prefill (pre-hook -> v_proj hook -> post-hook)."""

    zero_slots: torch.Tensor | None  # (B, L) image slots whose values the module must see as 0
    rows: torch.Tensor | None  # (B, R) text query slots that get a correction
    row_valid: torch.Tensor | None  # (B, R)
    delta: torch.Tensor | None  # (B, R, D) correction of the module output at ``rows``
    cache_fill: torch.Tensor | None  # (B, H_kv, L, hd) values decode steps must read at image slots
    image_slots: torch.Tensor | None  # (B, L)
    armed: bool = False


@dataclass
class LastTokenContributions:
    """Per-key contributions to the last input token's attention output in one layer.

    ``c_j = concat_h a[h, last, j] · v[h, j]`` (before ``o_proj``; grouped-query value heads
    repeated), and ``output = Σ_j c_j`` over every key the last token attends to (its attention
    output before ``o_proj``). Removing key ``j`` from the last token's attention (its weight set
    to 0 in every head, no renormalisation) turns the output into ``output - c_j``.

    Attributes
    ----------
    image : list of Tensor
        Per sample, shape (image tokens present, H * head_dim), float32, in sequence order.
    output : Tensor, shape (B, H * head_dim)
        float32.
    """

    image: list[torch.Tensor]
    output: torch.Tensor

    def influence(self, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos(o - c_j, o), ||c_j||_2)`` of every image token of ``sample``, each shape (n,)."""
        c = self.image[sample]
        o = self.output[sample]
        cos = torch.nn.functional.cosine_similarity(o[None, :] - c, o[None, :].expand_as(c), dim=-1, eps=1e-12)
        return cos, c.norm(dim=-1)


@dataclass
class _DecodeState:
    """What layers >= the first pruning layer need for continuation steps."""

    cache: Any
    layer_segment: dict[int, int]  # layer -> segment id (pruned layers only)
    segment_mask2d: dict[int, torch.Tensor]  # segment -> (B, cache_len) allowed keys
    segment_positions: dict[int, torch.Tensor] = field(default_factory=dict)  # segment -> (B, cache_len)
    mask_cache: dict[Any, Any] = field(default_factory=dict)  # (segment, layer type) -> mask
    step_len: int = 0  # tokens of the current continuation step


def _gather_seq(x: Any, idx: torch.Tensor, seq_dim: int) -> Any:
    """Gather ``idx`` (B, L) along ``seq_dim`` of ``x`` whose batch dim precedes it (size B or 1)."""
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(_gather_seq(t, idx, seq_dim) for t in x)
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


class PruningRun:
    """A method bound to a model: a context manager that installs and removes the engine's hooks.

    Parameters
    ----------
    model : nn.Module
        A supported transformers model (see :func:`himap_vlm.core.families.supported_classes`).
    method : PruningMethod
        The method deciding which image tokens to keep.

    Attributes
    ----------
    image_tokens_per_layer : list[list[int]]
        Over decoder layers, over samples: image tokens present in that layer (last prefill).
    layer_positions : list[list[LongTensor]]
        Over decoder layers, over samples: indices into the input sequence of the tokens that
        layer processed (last prefill); padding positions excluded.
    num_prefills : int
        Number of prefills seen since the hooks were installed.
    record : dict
        Method-specific results of the last prefill (e.g. ``record["visipruner"]``); emptied at
        the start of every prefill.

    Raises
    ------
    ValueError
        For an unsupported model or a configuration that does not fit the model.
    """

    def __init__(self, model: nn.Module, method: PruningMethod):
        self.model = model
        self.method = method
        self.family: ModelFamily = resolve_family(model)
        self.decoder = self.family.decoder(model)
        self.text_config = self.family.text_config(model)
        self.layers: nn.ModuleList = getattr(self.decoder, self.family.layers_attr)
        self.num_layers = len(self.layers)
        self.image_token_id = self.family.image_token_id(model.config)
        method.validate_for_model(self.num_layers)
        self.steps = method.steps()
        needs_projections = (
            any(s.score is not None for s in self.steps) or method.dynamic or bool(method.attention_edits())
        )
        self.contract = contract.check_model(
            model,
            self.decoder,
            self.layers[0],
            getattr(self.layers[0], self.family.attn_attr),
            needs_projections=needs_projections,
        )
        first = self.family.min_prune_layer(model.config)
        for step in self.steps:
            if step.layer < first:
                raise ValueError(
                    f"{method.name}: pruning at layer {step.layer} is not allowed for {self.family.name}: "
                    f"tokens may be dropped from layer {first} on ({self.family.notes or 'model constraint'})"
                )
        self._step_at_layer = {s.layer: i for i, s in enumerate(self.steps)}
        self._score_at_layer = {s.layer - 1: i for i, s in enumerate(self.steps) if s.score is not None}
        self._dynamic_layers = list(range(max(0, first - 1), self.num_layers - 1)) if method.dynamic else []
        self._edits: dict[int, AttentionEdit] = {}
        for layer, edit in method.attention_edits().items():
            if not 0 <= int(layer) < self.num_layers:
                raise ValueError(
                    f"{method.name}: attention edit at layer {layer} is out of range: the model has "
                    f"{self.num_layers} decoder layers"
                )
            if not edit.is_identity:
                self._edits[int(layer)] = edit
        self.record: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._pending_ids: torch.Tensor | None = None
        self._pending_inputs: dict[str, Any] = {}  # top-level attention_mask / token_type_ids
        self._prefill: _PrefillState | None = None
        self._decode: _DecodeState | None = None
        self._mode = "idle"
        self.image_tokens_per_layer: list[list[int]] = []
        self.layer_positions: list[list[torch.Tensor]] = []
        self.num_prefills = 0
        self._warned: set[str] = set()
        self._layer_segments: dict[int, int] = {}
        self._segment_masks: dict[int, torch.Tensor] = {}
        self._segment_positions: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ install / remove
    @property
    def active(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def attach(self) -> PruningRun:
        """Install the hooks (what ``__enter__`` does)."""
        if self._handles:
            raise RuntimeError("this PruningRun is already attached; use a new `method(model)` per context")
        for other in getattr(self.model, "_himap_runs", []):
            if other is not self and other.active:
                raise RuntimeError(
                    "another himap method is already active on this model; leave its `with` block first"
                )
        h = self._handles
        h.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        h.append(self.decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True))
        h.append(self.decoder.register_forward_hook(self._decoder_post_hook, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            h.append(layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))
        for i in self._score_at_layer:
            attn = getattr(self.layers[i], self.family.attn_attr)
            h.append(attn.register_forward_pre_hook(self._make_score_hook(i), with_kwargs=True))
        for i in self._dynamic_layers:
            attn = getattr(self.layers[i], self.family.attn_attr)
            h.append(attn.register_forward_pre_hook(self._make_dynamic_hook(i), with_kwargs=True))
        for i, edit in self._edits.items():
            # registered last: the edit pre-hook arms the v_proj hook for the module's own call
            attn = getattr(self.layers[i], self.family.attn_attr)
            h.append(attn.register_forward_pre_hook(self._make_edit_pre_hook(i), with_kwargs=True))
            h.append(attn.register_forward_hook(self._make_edit_post_hook(i), with_kwargs=True))
            if edit.image_to_image == "drop":
                h.append(attn.v_proj.register_forward_hook(self._make_value_hook(i)))
        runs = getattr(self.model, "_himap_runs", [])
        runs.append(self)
        object.__setattr__(self.model, "_himap_runs", runs)
        return self

    def detach(self) -> None:
        """Remove every hook and forget per-forward state (what ``__exit__`` does)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._prefill = None
        self._decode = None
        self._pending_ids = None
        self._pending_inputs = {}
        self._mode = "idle"
        runs = getattr(self.model, "_himap_runs", [])
        if self in runs:
            runs.remove(self)

    def __enter__(self) -> PruningRun:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------ hooks: model / decoder
    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and args[0].dtype in (torch.long, torch.int):
            ids = args[0]
        self._pending_ids = ids
        # Some families hand the language model prepared masks (Gemma3: a dict per layer type) and
        # keep token types at the top level: remember the caller's own 2-D mask and token types.
        self._pending_inputs = {k: kwargs.get(k) for k in ("attention_mask", "token_type_ids")}

    def _decoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if embeds is None and ids is None:
            self._mode = "pass"
            return
        b, s = (embeds.shape[:2] if embeds is not None else ids.shape[:2])
        if ids is None:
            ids = self._pending_ids
        self._pending_ids = None
        top, self._pending_inputs = self._pending_inputs, {}
        cache = self.contract.find_cache(kwargs, "the language model")
        past = contract.cache_length(cache)
        if cache is not None and past == 0 and (self.steps or self._dynamic_layers):
            contract.check_cache_supported(cache)
        device = (embeds if embeds is not None else ids).device
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict):
            # masks prepared per layer type by the top-level model: use the caller's 2-D mask
            mask = top.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            self._warn_once("mask4d", "himap: a 4-D attention mask was passed; pruning is disabled for this call")
            self._mode = "pass"
            return
        if past == 0 and isinstance(mask, torch.Tensor) and mask.shape[1] != s:
            raise contract.ContractError(
                "every continuation step hands the language model its KV cache",
                f"The attention mask covers {mask.shape[1]} tokens, the input {s}, and no cache arrived under "
                f"`{self.contract.cache_kwarg}`.",
            )

        if past > 0:
            # Continuation (decode steps or a chunk after the prefill): no pruning, but layers that
            # dropped tokens need masks sized to their own (shorter) caches.
            if self._decode is not None and self._decode.cache is cache:
                new = mask[:, -s:].bool() if mask is not None else torch.ones(b, s, dtype=torch.bool, device=device)
                for seg, m2d in self._decode.segment_mask2d.items():
                    self._decode.segment_mask2d[seg] = torch.cat([m2d, new.to(m2d.device)], dim=1)
                # original indices of the new tokens continue the full-length (layer 0) sequence
                added = (past + torch.arange(s, device=device))[None].expand(b, s)
                for seg, pos in self._decode.segment_positions.items():
                    self._decode.segment_positions[seg] = torch.cat([pos, added.to(pos.device)], dim=1)
                self._decode.mask_cache = {}
                self._decode.step_len = s
                self._mode = "decode"
            else:
                self._mode = "pass"
            return

        self._decode = None
        if ids is None or tuple(ids.shape[:2]) != (b, s):
            self._warn_once(
                "noids",
                "himap: the language model got no input_ids matching its inputs, so image tokens cannot be "
                "located; this call runs unpruned. Pass input_ids (not inputs_embeds) to the model.",
            )
            self._mode = "pass"
            return
        ids = ids.to(device)
        attn2d = mask.bool().to(device) if mask is not None else torch.ones(b, s, dtype=torch.bool, device=device)
        is_image = (ids == self.image_token_id) & attn2d
        arange = torch.arange(s, device=device)
        last_img = torch.where(is_image, arange, torch.full_like(ids, -1)).max(dim=1).values  # (B,)
        after = (arange[None, :] > last_img[:, None]) & attn2d
        layout = _Layout(
            idx=arange.expand(b, s).clone(),
            valid=torch.ones(b, s, dtype=torch.bool, device=device),
            segment=0,
            mask2d=attn2d,
        )
        self._prefill = _PrefillState(
            input_ids=ids, attn2d=attn2d, is_image=is_image, after_last_image=after, layout=layout, cache=cache
        )
        token_types = top.get("token_type_ids")
        if (
            self.family.bidirectional_image_blocks
            and isinstance(token_types, torch.Tensor)
            and tuple(token_types.shape[:2]) == (b, s)
        ):
            self._prefill.block_ids = image_block_ids((token_types.to(device) == 1) & attn2d)
        self.num_prefills += 1
        self.image_tokens_per_layer = []
        self.layer_positions = []
        self.record = {}
        self._mode = "prefill"

    def _decoder_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        mode, self._mode = self._mode, "idle"
        if mode != "prefill" or self._prefill is None:
            return None
        st = self._prefill
        self._prefill = None
        self._finish_prefill_for_decode(st)
        if st.layout.segment == 0:
            return None
        hidden = contract.decoder_output_hidden(output)
        b, s = st.input_ids.shape
        full = hidden.new_zeros(b, s, hidden.shape[-1])
        norm = getattr(self.decoder, self.family.norm_attr, None)
        for rows, cols, states in st.dropped:
            full[rows, cols] = norm(states) if norm is not None else states
        lay = st.layout
        rows = torch.arange(b, device=hidden.device)[:, None].expand_as(lay.idx)
        full[rows[lay.valid], lay.idx[lay.valid]] = hidden[lay.valid]
        return contract.with_decoder_output_hidden(output, full)

    def _finish_prefill_for_decode(self, st: _PrefillState) -> None:
        cache = st.cache
        if cache is None or not self._layer_segments:
            self._decode = None
            return
        self._decode = _DecodeState(
            cache=cache,
            layer_segment=dict(self._layer_segments),
            segment_mask2d=dict(self._segment_masks),
            segment_positions=dict(self._segment_positions),
        )

    # ------------------------------------------------------------------ hooks: layers
    def _make_layer_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if self._mode == "prefill":
                return self._layer_prefill(layer_idx, args, kwargs)
            if self._mode == "decode":
                return self._layer_decode(layer_idx, args, kwargs)
            return None

        return hook

    def _layer_prefill(self, layer_idx: int, args: tuple, kwargs: dict):
        st = self._prefill
        where = f"decoder layer {layer_idx}"
        hidden = contract.layer_hidden(args, kwargs, where)
        cache = self.contract.find_cache(kwargs, where)
        if tuple(hidden.shape[:2]) != tuple(st.layout.idx.shape):
            raise contract.ContractError(
                f"{where} receives the hidden states of the tokens the previous layer processed",
                f"It got {tuple(hidden.shape[:2])} (batch, tokens); the engine's layout holds "
                f"{tuple(st.layout.idx.shape)}.",
            )
        if layer_idx == 0:
            st.full_pos_emb = kwargs.get("position_embeddings")
            st.full_pos_ids = kwargs.get("position_ids")
            if st.cache is None:
                st.cache = cache
            self._layer_segments = {}
            self._segment_masks = {}
            self._segment_positions = {}
        if st.pending_keep is not None and st.pending_keep[0] == layer_idx - 1:
            hidden = self._apply_keep(layer_idx, hidden, st.pending_keep[1])
            st.pending_keep = None
        if layer_idx in self._step_at_layer:
            hidden = self._prune(self._step_at_layer[layer_idx], layer_idx, hidden)
        lay = st.layout
        self._record(layer_idx, lay)
        if lay.segment == 0:
            return contract.with_layer_hidden(args, kwargs, hidden)
        # Pruned layers: everything positional must follow the shortened layout.
        key = (lay.segment, layer_type(self.text_config, layer_idx))
        if key not in st.mask_cache:
            blocks = st.block_ids.gather(1, lay.idx) if st.block_ids is not None else None
            st.mask_cache[key] = self.family.layer_mask(
                self.text_config,
                layer_idx,
                hidden,
                lay.mask2d,
                cache,
                context=LayerMaskContext(key_positions=lay.idx, block_ids=blocks),
            )
        kwargs["attention_mask"] = st.mask_cache[key]
        incoming = kwargs.get("position_embeddings")
        if incoming is None or incoming is st.full_pos_emb:
            kwargs["position_embeddings"] = lay.position_embeddings
        else:  # per-layer-type rotary tables (Gemma3: local and global RoPE): gather this layer's own
            key = (lay.segment, id(incoming[0]))
            if key not in st.pos_cache:
                st.pos_cache[key] = _gather_seq(incoming, lay.idx, -2)
            kwargs["position_embeddings"] = st.pos_cache[key]
        if "position_ids" in kwargs:
            kwargs["position_ids"] = lay.flash_position_ids if self._is_flash() else lay.position_ids
        self._layer_segments[layer_idx] = lay.segment
        self._segment_masks[lay.segment] = lay.mask2d
        self._segment_positions[lay.segment] = lay.idx
        return contract.with_layer_hidden(args, kwargs, hidden)

    def _layer_decode(self, layer_idx: int, args: tuple, kwargs: dict):
        dec = self._decode
        seg = dec.layer_segment.get(layer_idx)
        if seg is None:
            return None
        where = f"decoder layer {layer_idx}"
        hidden = contract.layer_hidden(args, kwargs, where)
        cache = self.contract.find_cache(kwargs, where)
        if hidden.shape[1] != dec.step_len:
            raise contract.ContractError(
                f"{where} receives the hidden states of the new tokens only in a decode step",
                f"It got {hidden.shape[1]} tokens; the step has {dec.step_len}.",
            )
        key = (seg, layer_type(self.text_config, layer_idx))
        if key not in dec.mask_cache:
            dec.mask_cache[key] = self.family.layer_mask(
                self.text_config,
                layer_idx,
                hidden,
                dec.segment_mask2d[seg],
                cache,
                context=LayerMaskContext(key_positions=dec.segment_positions[seg]),
            )
        kwargs["attention_mask"] = dec.mask_cache[key]
        return args, kwargs

    def _is_flash(self) -> bool:
        return "flash" in contract.attn_implementation(self.text_config)

    def _record(self, layer_idx: int, lay: _Layout) -> None:
        st = self._prefill
        is_img = st.is_image.gather(1, lay.idx) & lay.valid
        real = st.attn2d.gather(1, lay.idx) & lay.valid
        self.image_tokens_per_layer.append([int(v) for v in is_img.sum(1).tolist()])
        self.layer_positions.append([lay.idx[b][real[b]].cpu() for b in range(lay.idx.shape[0])])

    # ------------------------------------------------------------------ pruning
    def _prune(self, step_index: int, layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        st = self._prefill
        lay = st.layout
        step = self.steps[step_index]
        b = lay.idx.shape[0]
        slot_is_img = st.is_image.gather(1, lay.idx) & lay.valid
        scores = st.scores.pop(step_index, None)
        if step.score is not None and scores is None:
            raise RuntimeError(
                f"himap internal error: no attention scores for the step at layer {layer_idx}"
            )  # pragma: no cover
        chosen: list[torch.Tensor | None] = []
        for i in range(b):
            n = int(slot_is_img[i].sum())
            sc = scores[i] if scores is not None else None
            chosen.append(self.method.select(step_index, sc, n, layer=layer_idx) if n else None)
        return self._apply_keep(layer_idx, hidden, chosen, source=f"{self.method.name}.select")

    def _apply_keep(
        self, layer_idx: int, hidden: torch.Tensor, chosen: list[torch.Tensor | None], source: str = ""
    ) -> torch.Tensor:
        """Drop image tokens from layer ``layer_idx`` on: the mechanics of every pruning decision.

        Parameters
        ----------
        hidden : Tensor, shape (B, L, D)
            The input of layer ``layer_idx`` in the current layout.
        chosen : list of (LongTensor or None)
            Per sample, indices into its image tokens still present (sequence order) to keep;
            ``None`` keeps them all.

        Returns
        -------
        Tensor, shape (B, L', D)
            The hidden states of the new layout (left fillers where samples keep fewer tokens).
        """
        st = self._prefill
        lay = st.layout
        b = lay.idx.shape[0]
        source = source or f"{self.method.name}.on_layer"
        slot_is_img = st.is_image.gather(1, lay.idx) & lay.valid
        keep_slots: list[torch.Tensor] = []
        for i in range(b):
            img_slots = torch.nonzero(slot_is_img[i]).flatten()
            n = int(img_slots.numel())
            if n == 0 or chosen[i] is None:
                keep_slots.append(torch.nonzero(lay.valid[i]).flatten())
                continue
            other = torch.nonzero(lay.valid[i] & ~slot_is_img[i]).flatten()
            pick = torch.as_tensor(chosen[i]).to(img_slots.device).long().flatten()
            if pick.numel() and (int(pick.min()) < 0 or int(pick.max()) >= n):
                raise ValueError(f"{source} returned indices outside [0, {n}) for sample {i} at layer {layer_idx}")
            keep_slots.append(torch.sort(torch.cat([other, img_slots[torch.unique(pick)]])).values)
        width = max(int(k.numel()) for k in keep_slots)
        rel = torch.zeros(b, width, dtype=torch.long, device=lay.idx.device)
        valid = torch.zeros(b, width, dtype=torch.bool, device=lay.idx.device)
        for i, k in enumerate(keep_slots):
            rel[i, width - k.numel():] = k  # fillers on the left, like left padding
            valid[i, width - k.numel():] = True
        # Remember the dropped tokens' states (for the full-length output).
        for i in range(b):
            dropped = torch.ones(lay.idx.shape[1], dtype=torch.bool, device=lay.idx.device)
            dropped[keep_slots[i]] = False
            dropped &= lay.valid[i]
            if dropped.any():
                sl = torch.nonzero(dropped).flatten()
                st.dropped.append(
                    (torch.full_like(sl, i), lay.idx[i, sl], hidden[i, sl].detach().clone())
                )
        new_idx = lay.idx.gather(1, rel)
        new = _Layout(idx=new_idx, valid=valid, segment=lay.segment + 1)
        new.mask2d = st.attn2d.gather(1, new_idx) & valid
        new.position_embeddings = _gather_seq(st.full_pos_emb, new_idx, -2)
        new.position_ids = _gather_seq(st.full_pos_ids, new_idx, -1)
        if self._is_flash():
            new.flash_position_ids = torch.arange(width, device=new_idx.device)[None].expand(b, -1)
        st.layout = new
        return hidden.gather(1, rel[..., None].expand(-1, -1, hidden.shape[-1]))

    # ------------------------------------------------------------------ scoring
    def _make_score_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._mode != "prefill":
                return None
            step_index = self._score_at_layer[layer_idx]
            hidden = contract.attn_hidden(args, kwargs, f"the attention module of layer {layer_idx}")
            pos = kwargs.get("position_embeddings")
            with torch.no_grad():
                self._prefill.scores[step_index] = self._score(
                    module, hidden, pos, self.steps[step_index].score
                )
            return None

        return hook

    def _score(self, attn: nn.Module, hidden: torch.Tensor, pos: Any, req: ScoreRequest) -> list[torch.Tensor]:
        """Per sample, the reduced attention of the requested query rows to each image token.

        Returns
        -------
        list of Tensor
            One float32 tensor per sample, shape (image tokens present,), in sequence order.
        """
        st = self._prefill
        lay = st.layout
        b, length = lay.idx.shape
        device = hidden.device
        keys_ok = lay.mask2d  # (B, L)
        slot_is_img = st.is_image.gather(1, lay.idx) & lay.valid
        if req.queries == "instruction":
            rows_ok = st.after_last_image.gather(1, lay.idx) & keys_ok
        elif req.queries == "image":
            rows_ok = slot_is_img
        elif req.queries == "all":
            rows_ok = keys_ok.clone()
        else:  # last
            arange = torch.arange(length, device=device)
            last = torch.where(keys_ok, arange, torch.full_like(arange, -1)).max(dim=1).values
            rows_ok = torch.zeros_like(keys_ok)
            rows_ok[torch.arange(b, device=device), last.clamp(min=0)] = last >= 0
        total = torch.zeros(b, length, dtype=torch.float32, device=device)
        count = torch.zeros(b, length, dtype=torch.float32, device=device)
        n_rows = rows_ok.sum(1)
        max_rows = int(n_rows.max()) if b else 0
        if max_rows > 0:
            # rows per sample, padded with row 0 (masked out below)
            order = torch.sort((~rows_ok).to(torch.int8), dim=1, stable=True).indices[:, :max_rows]
            row_valid = torch.arange(max_rows, device=device)[None, :] < n_rows[:, None]
            for start in range(0, max_rows, _SCORE_CHUNK):
                rows = order[:, start : start + _SCORE_CHUNK]
                rvalid = row_valid[:, start : start + _SCORE_CHUNK]
                probs, allowed = self._attention_rows(attn, hidden, pos, rows, keys_ok)
                probs = probs.mean(dim=1) * rvalid[..., None]  # (B, R, L)
                total += probs.sum(dim=1)
                count += (allowed & rvalid[..., None]).sum(dim=1).float()
        if req.reduce == "mean":
            total = total / count.clamp(min=1.0)
        return [total[i][slot_is_img[i]] for i in range(b)]

    def _attention_rows(
        self, attn: nn.Module, hidden: torch.Tensor, pos: Any, rows: torch.Tensor, keys_ok: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-softmax attention of some query rows of one layer, recomputed from its q/k (float32).

        Parameters
        ----------
        attn : nn.Module
            The layer's attention module.
        hidden : Tensor, shape (B, L, D)
            Its input (current layout).
        pos : tuple of Tensor
            ``(cos, sin)`` of the current layout, each (B or 1, L, head_dim).
        rows : LongTensor, shape (B, R)
            Query slots.
        keys_ok : BoolTensor, shape (B, L)
            Keys that may be attended (valid, not padding).

        Returns
        -------
        probs : Tensor, shape (B, H, R, L)
            Per head; 0 on keys a row may not attend (causal, padding, sliding window).
        allowed : BoolTensor, shape (B, R, L)
        """
        b, length = keys_ok.shape
        cos, sin = contract.rotary_tables(pos, attn)
        cos = cos.expand(b, -1, -1)
        sin = sin.expand(b, -1, -1)
        scaling = float(getattr(attn, "scaling", attn.head_dim**-0.5))
        softcap = getattr(getattr(attn, "config", None), "attn_logit_softcapping", None)
        window = getattr(attn, "sliding_window", None)
        if window is None and getattr(attn, "layer_idx", None) is not None:  # e.g. Mistral: window in config
            window = layer_window(self.text_config, attn.layer_idx)
        key_pos = torch.arange(length, device=keys_ok.device)
        q, k = self.family.query_key(attn, hidden, cos, sin, rows)
        q = q.float()
        k = k.float()
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, H, R, L)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        allowed = key_pos[None, None, :] <= rows[:, :, None]
        st = self._prefill
        same_block = None
        if st is not None and st.block_ids is not None:  # image tokens see their whole image
            blocks = st.block_ids.gather(1, st.layout.idx)
            q_blocks = blocks.gather(1, rows)
            same_block = (q_blocks[:, :, None] == blocks[:, None, :]) & (q_blocks[:, :, None] >= 0)
            allowed |= same_block
        if window:  # measured on original indices, like the unpruned model
            orig = st.layout.idx if st is not None else key_pos[None].expand(b, -1)
            in_window = orig.gather(1, rows)[:, :, None] - orig[:, None, :] < int(window)
            if same_block is not None and contract.image_blocks_override_window():
                in_window |= same_block
            allowed &= in_window
        allowed &= keys_ok[:, None, :]
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0), allowed

    # ------------------------------------------------------------------ dynamic methods
    def _make_dynamic_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._mode != "prefill" or self._prefill is None:
                return None
            hidden = contract.attn_hidden(args, kwargs, f"the attention module of layer {layer_idx}")
            view = LayerView(self, layer_idx, module, hidden, kwargs.get("position_embeddings"))
            with torch.no_grad():
                decision = self.method.on_layer(layer_idx, view)
            if decision is None:
                return None
            decision = list(decision)
            if len(decision) != view.batch_size:
                raise ValueError(
                    f"{self.method.name}.on_layer returned {len(decision)} entries for a batch of {view.batch_size}"
                )
            if any(d is not None for d in decision):
                self._prefill.pending_keep = (layer_idx, decision)
            return None

        return hook

    def _last_token_contributions(self, attn: nn.Module, hidden: torch.Tensor, pos: Any) -> LastTokenContributions:
        """Contributions of every key to the last input token's attention output (see the class)."""
        st = self._prefill
        lay = st.layout
        b, length = lay.idx.shape
        keys_ok = lay.mask2d
        arange = torch.arange(length, device=keys_ok.device)
        last = torch.where(keys_ok, arange, torch.full_like(arange, -1)).max(dim=1).values  # (B,)
        probs, _ = self._attention_rows(attn, hidden, pos, last.clamp(min=0)[:, None], keys_ok)  # (B, H, 1, L)
        probs = probs * (last >= 0)[:, None, None, None]
        v = self.family.value(attn, hidden).float()  # (B, H_kv, L, hd)
        if v.shape[1] != probs.shape[1]:
            v = v.repeat_interleave(probs.shape[1] // v.shape[1], dim=1)
        contrib = (probs[:, :, 0, :, None] * v).permute(0, 2, 1, 3).reshape(b, length, -1)  # (B, L, H*hd)
        slot_is_img = st.is_image.gather(1, lay.idx) & lay.valid
        return LastTokenContributions(
            image=[contrib[i][slot_is_img[i]] for i in range(b)], output=contrib.sum(dim=1)
        )

    # ------------------------------------------------------------------ attention edits
    def _make_edit_pre_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._mode != "prefill" or self._prefill is None:
                return None
            hidden = contract.attn_hidden(args, kwargs, f"the attention module of layer {layer_idx}")
            with torch.no_grad():
                ctx = self._edit_prepare(layer_idx, module, hidden, kwargs.get("position_embeddings"))
            ctx.armed = ctx.zero_slots is not None
            self._prefill.edit_ctx[layer_idx] = ctx
            return None

        return hook

    def _make_value_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> Any:
            st = self._prefill
            if self._mode != "prefill" or st is None:
                return None
            ctx = st.edit_ctx.get(layer_idx)
            if ctx is None or not ctx.armed:
                return None
            ctx.armed = False  # one shot: the module's own v_proj call
            if tuple(output.shape[:2]) != tuple(ctx.zero_slots.shape):
                raise RuntimeError(  # pragma: no cover - a family whose v_proj is not per token
                    f"himap: attention edit at layer {layer_idx}: unexpected v_proj output shape {tuple(output.shape)}"
                )
            return output.masked_fill(ctx.zero_slots[..., None], 0)

        return hook

    def _make_edit_post_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            st = self._prefill
            if self._mode != "prefill" or st is None:
                return None
            ctx = st.edit_ctx.pop(layer_idx, None)
            if ctx is None:
                return None
            ctx.armed = False
            out = output[0] if isinstance(output, tuple) else output
            if ctx.delta is not None:
                add = (ctx.delta * ctx.row_valid[..., None]).to(out.dtype)
                out = out.scatter_add(1, ctx.rows[..., None].expand(-1, -1, out.shape[-1]), add)
            cache = self.contract.find_cache(kwargs, f"the attention module of layer {layer_idx}")
            if cache is not None and ctx.cache_fill is not None:
                self._edit_cache(layer_idx, cache, ctx)
            if isinstance(output, tuple):
                return (out, *output[1:])
            return out

        return hook

    def _edit_cache(self, layer_idx: int, cache: Any, ctx: _EditContext) -> None:
        """Store, at image slots, the values that decode-step (text) queries must read."""
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

    def _edit_prepare(self, layer_idx: int, attn: nn.Module, hidden: torch.Tensor, pos: Any) -> _EditContext:
        """Plan an :class:`AttentionEdit` of one layer in a prefill, without switching its kernel.

        The edits only change which *value* a query reads at an image key (``o_i = Σ_j a_ij v'_j``
        with ``v'_j`` = ``v_j``, 0 or ``v_sink``), so:

        * image queries: with ``image_to_image="drop"`` a ``v_proj`` hook hands the module zero
          values at image slots, so the module's own kernel (SDPA, flash, eager) computes the image
          rows exactly;
        * text queries (few: the instruction): their image-key weights ``a_ij`` are recomputed
          here from the layer's q/k (like the scores) and the difference
          ``Σ_img a_ij (v'_j - v_module_j)`` is added to the module output through ``o_proj``;
        * decode steps (text queries only): after the prefill, the cache holds ``v'_j`` at the
          image slots, so later steps need no hook at all.

        Cost: the layer's k (and v) projections once more plus (text rows × L) attention; no
        (L × L) matrix is materialised.
        """
        edit = self._edits[layer_idx]
        st = self._prefill
        lay = st.layout
        b, length = lay.idx.shape
        device = hidden.device
        keys_ok = lay.mask2d
        slot_is_img = st.is_image.gather(1, lay.idx) & lay.valid
        arange = torch.arange(length, device=device)
        v = self.family.value(attn, hidden)  # (B, H_kv, L, hd)
        # the sink: ``edit.sink``-th token of each sample's first image span
        sink_slot = torch.zeros(b, dtype=torch.long, device=device)
        if edit.text_to_image == "merge":
            for i in range(b):
                img = torch.nonzero(slot_is_img[i]).flatten()
                if img.numel() == 0:
                    continue
                gaps = torch.nonzero(img[1:] - img[:-1] != 1).flatten()
                span = int(gaps[0]) + 1 if gaps.numel() else int(img.numel())
                if edit.sink >= span:
                    raise ValueError(
                        f"{self.method.name}: the attention sink index {edit.sink} is out of range for sample {i}: "
                        f"its first image has {span} tokens"
                    )
                sink_slot[i] = img[edit.sink]
        v_sink = v.gather(2, sink_slot[:, None, None, None].expand(-1, v.shape[1], 1, v.shape[-1]))  # (B,Hkv,1,hd)
        module_zero = edit.image_to_image == "drop"
        # what text queries read at image keys (also what decode steps read from the cache)
        if edit.text_to_image == "keep":
            target = v
        elif edit.text_to_image == "drop":
            target = torch.zeros_like(v)
        else:
            target = v_sink.expand_as(v)
        needs_fix = (edit.text_to_image != "keep") != module_zero or edit.text_to_image == "merge"
        ctx = _EditContext(
            zero_slots=slot_is_img if module_zero else None,
            rows=None,
            row_valid=None,
            delta=None,
            cache_fill=target if needs_fix else None,
            image_slots=slot_is_img,
        )
        if not needs_fix:
            return ctx
        first_img = torch.where(slot_is_img, arange, torch.full_like(arange, length)).min(dim=1).values
        rows_ok = keys_ok & ~slot_is_img & (arange[None, :] > first_img[:, None])
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
        for start in range(0, max_rows, _SCORE_CHUNK):
            rows = order[:, start : start + _SCORE_CHUNK]
            probs, _ = self._attention_rows(attn, hidden, pos, rows, keys_ok)  # (B, H, R, L)
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



class LayerView:
    """One decoder layer of a prefill, as a dynamic method sees it (see ``PruningMethod.on_layer``).

    Everything is per sample and in the current layout (tokens dropped earlier are absent);
    quantities are computed lazily, once, the first time a method asks for them.
    """

    def __init__(self, run: PruningRun, layer: int, attn: nn.Module, hidden: torch.Tensor, pos: Any):
        self._run = run
        self.layer = layer
        self._attn = attn
        self._hidden = hidden
        self._pos = pos
        st = run._prefill
        self._slot_is_img = st.is_image.gather(1, st.layout.idx) & st.layout.valid
        self._contributions: LastTokenContributions | None = None

    @property
    def batch_size(self) -> int:
        """Samples in the batch."""
        return int(self._slot_is_img.shape[0])

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model."""
        return self._run.num_layers

    @property
    def image_counts(self) -> list[int]:
        """Image tokens present in this layer, per sample."""
        return [int(v) for v in self._slot_is_img.sum(1).tolist()]

    def image_positions(self, sample: int) -> torch.Tensor:
        """Input positions (indices into the padded input) of ``sample``'s image tokens present here."""
        lay = self._run._prefill.layout
        return lay.idx[sample][self._slot_is_img[sample]]

    @property
    def state(self) -> dict[str, Any]:
        """A scratch dict for the method that lives for one prefill (shared by all its layers)."""
        return self._run._prefill.method_state

    @property
    def record(self) -> dict[str, Any]:
        """``run.record``: method-specific results of this prefill."""
        return self._run.record

    def last_token_contributions(self) -> LastTokenContributions:
        """This layer's per-key contributions to the last input token's attention output.

        Recomputed from the layer's own q/k (RoPE, GQA) and ``v`` for the last query row only
        (cost: one row of attention plus the k and v projections).
        """
        if self._contributions is None:
            with torch.no_grad():
                self._contributions = self._run._last_token_contributions(self._attn, self._hidden, self._pos)
        return self._contributions
