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
  logits keep the input's shape.

Batches: every sample keeps its own index set. When samples keep different numbers of tokens,
rows are left-filled with masked filler slots so tensors stay rectangular; fillers are masked
out as keys everywhere and never reach the output.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from himap.families import ModelFamily, resolve_family
from himap.methods.base import PruningMethod, ScoreRequest

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
    mask_cache: dict[int, Any] = field(default_factory=dict)
    full_pos_emb: Any = None
    full_pos_ids: Any = None


@dataclass
class _DecodeState:
    """What layers >= the first pruning layer need for continuation steps."""

    cache: Any
    layer_segment: dict[int, int]  # layer -> segment id (pruned layers only)
    segment_mask2d: dict[int, torch.Tensor]  # segment -> (B, cache_len) allowed keys
    mask_cache: dict[int, Any] = field(default_factory=dict)


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
        A supported transformers model (see :func:`himap.families.supported_classes`).
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
        first = self.family.min_prune_layer(model.config)
        for step in self.steps:
            if step.layer < first:
                raise ValueError(
                    f"{method.name}: pruning at layer {step.layer} is not allowed for {self.family.name}: "
                    f"tokens may be dropped from layer {first} on ({self.family.notes or 'model constraint'})"
                )
        self._step_at_layer = {s.layer: i for i, s in enumerate(self.steps)}
        self._score_at_layer = {s.layer - 1: i for i, s in enumerate(self.steps) if s.score is not None}
        self._handles: list[Any] = []
        self._pending_ids: torch.Tensor | None = None
        self._prefill: _PrefillState | None = None
        self._decode: _DecodeState | None = None
        self._mode = "idle"
        self.image_tokens_per_layer: list[list[int]] = []
        self.layer_positions: list[list[torch.Tensor]] = []
        self.num_prefills = 0
        self._warned: set[str] = set()
        self._layer_segments: dict[int, int] = {}
        self._segment_masks: dict[int, torch.Tensor] = {}

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
        cache = kwargs.get("past_key_values")
        past = int(cache.get_seq_length()) if cache is not None else 0
        device = (embeds if embeds is not None else ids).device
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() != 2:
            self._warn_once("mask4d", "himap: a 4-D attention mask was passed; pruning is disabled for this call")
            self._mode = "pass"
            return

        if past > 0:
            # Continuation (decode steps or a chunk after the prefill): no pruning, but layers that
            # dropped tokens need masks sized to their own (shorter) caches.
            if self._decode is not None and self._decode.cache is cache:
                new = mask[:, -s:].bool() if mask is not None else torch.ones(b, s, dtype=torch.bool, device=device)
                for seg, m2d in self._decode.segment_mask2d.items():
                    self._decode.segment_mask2d[seg] = torch.cat([m2d, new.to(m2d.device)], dim=1)
                self._decode.mask_cache = {}
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
        self.num_prefills += 1
        self.image_tokens_per_layer = []
        self.layer_positions = []
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
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        b, s = st.input_ids.shape
        full = hidden.new_zeros(b, s, hidden.shape[-1])
        norm = getattr(self.decoder, self.family.norm_attr, None)
        for rows, cols, states in st.dropped:
            full[rows, cols] = norm(states) if norm is not None else states
        lay = st.layout
        rows = torch.arange(b, device=hidden.device)[:, None].expand_as(lay.idx)
        full[rows[lay.valid], lay.idx[lay.valid]] = hidden[lay.valid]
        if isinstance(output, tuple):
            return (full, *output[1:])
        output.last_hidden_state = full
        return output

    def _finish_prefill_for_decode(self, st: _PrefillState) -> None:
        cache = st.cache
        if cache is None or not self._layer_segments:
            self._decode = None
            return
        self._decode = _DecodeState(
            cache=cache,
            layer_segment=dict(self._layer_segments),
            segment_mask2d=dict(self._segment_masks),
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
        hidden = args[0] if args else kwargs["hidden_states"]
        if layer_idx == 0:
            st.full_pos_emb = kwargs.get("position_embeddings")
            st.full_pos_ids = kwargs.get("position_ids")
            if st.cache is None:
                st.cache = kwargs.get("past_key_values")
            self._layer_segments = {}
            self._segment_masks = {}
        if layer_idx in self._step_at_layer:
            hidden = self._prune(self._step_at_layer[layer_idx], layer_idx, hidden)
        lay = st.layout
        self._record(layer_idx, lay)
        if lay.segment == 0:
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs
        # Pruned layers: everything positional must follow the shortened layout.
        if lay.segment not in st.mask_cache:
            st.mask_cache[lay.segment] = self.family.layer_mask(
                self.text_config, layer_idx, hidden, lay.mask2d, kwargs.get("past_key_values")
            )
        kwargs["attention_mask"] = st.mask_cache[lay.segment]
        kwargs["position_embeddings"] = lay.position_embeddings
        if "position_ids" in kwargs:
            kwargs["position_ids"] = lay.flash_position_ids if self._is_flash() else lay.position_ids
        self._layer_segments[layer_idx] = lay.segment
        self._segment_masks[lay.segment] = lay.mask2d
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def _layer_decode(self, layer_idx: int, args: tuple, kwargs: dict):
        dec = self._decode
        seg = dec.layer_segment.get(layer_idx)
        if seg is None:
            return None
        if seg not in dec.mask_cache:
            hidden = args[0] if args else kwargs["hidden_states"]
            dec.mask_cache[seg] = self.family.layer_mask(
                self.text_config, layer_idx, hidden, dec.segment_mask2d[seg], kwargs.get("past_key_values")
            )
        kwargs["attention_mask"] = dec.mask_cache[seg]
        return args, kwargs

    def _is_flash(self) -> bool:
        return "flash" in str(getattr(self.text_config, "_attn_implementation", "") or "")

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
        keep_slots: list[torch.Tensor] = []
        for i in range(b):
            img_slots = torch.nonzero(slot_is_img[i]).flatten()
            n = int(img_slots.numel())
            other = torch.nonzero(lay.valid[i] & ~slot_is_img[i]).flatten()
            if n == 0:
                keep_slots.append(other)
                continue
            sc = scores[i] if scores is not None else None
            chosen = self.method.select(step_index, sc, n, layer=layer_idx).to(img_slots.device)
            if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= n):
                raise ValueError(f"{self.method.name}.select returned indices outside [0, {n})")
            keep_slots.append(torch.sort(torch.cat([other, img_slots[chosen.long()]])).values)
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
            hidden = kwargs.get("hidden_states", args[0] if args else None)
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
        cos, sin = pos
        cos = cos.expand(b, -1, -1)
        sin = sin.expand(b, -1, -1)
        scaling = float(getattr(attn, "scaling", attn.head_dim**-0.5))
        softcap = getattr(getattr(attn, "config", None), "attn_logit_softcapping", None)
        window = getattr(attn, "sliding_window", None)
        total = torch.zeros(b, length, dtype=torch.float32, device=device)
        count = torch.zeros(b, length, dtype=torch.float32, device=device)
        n_rows = rows_ok.sum(1)
        max_rows = int(n_rows.max()) if b else 0
        if max_rows > 0:
            # rows per sample, padded with row 0 (masked out below)
            order = torch.sort((~rows_ok).to(torch.int8), dim=1, stable=True).indices[:, :max_rows]
            row_valid = torch.arange(max_rows, device=device)[None, :] < n_rows[:, None]
            key_pos = torch.arange(length, device=device)
            for start in range(0, max_rows, _SCORE_CHUNK):
                rows = order[:, start : start + _SCORE_CHUNK]
                rvalid = row_valid[:, start : start + _SCORE_CHUNK]
                q, k = self.family.query_key(attn, hidden, cos, sin, rows)
                q = q.float()
                k = k.float()
                if k.shape[1] != q.shape[1]:
                    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, H, R, L)
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                allowed = (key_pos[None, None, :] <= rows[:, :, None]) & keys_ok[:, None, :]
                if window:
                    allowed &= rows[:, :, None] - key_pos[None, None, :] < int(window)
                logits = logits.masked_fill(~allowed[:, None], float("-inf"))
                probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).mean(dim=1)  # (B, R, L)
                probs = probs * rvalid[..., None]
                total += probs.sum(dim=1)
                count += (allowed & rvalid[..., None]).sum(dim=1).float()
        if req.reduce == "mean":
            total = total / count.clamp(min=1.0)
        return [total[i][slot_is_img[i]] for i in range(b)]
