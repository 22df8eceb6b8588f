"""PruningRun: a method bound to a model — hook lifetime, modes, and the per-layer mechanics.

Why this module is over 500 lines: it is the one state machine of the engine (idle / prefill /
decode / pass), and every hook reads and writes the same per-forward state; splitting the hooks
across modules would scatter that state. Everything that is not a hook lives beside it: slots
and layouts in :mod:`~himap_vlm.core.engine.layout`, applying a drop in
:mod:`~himap_vlm.core.engine.keep`, attention rows in :mod:`~himap_vlm.core.engine.scoring`,
attention edits in :mod:`~himap_vlm.core.engine.edits`, the aligned outputs in
:mod:`~himap_vlm.core.engine.outputs`, the state in :mod:`~himap_vlm.core.engine.state`.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from himap_vlm.core import contract
from himap_vlm.core.engine import edits, scoring
from himap_vlm.core.engine.keep import apply_keep, replayed_choice, step_features
from himap_vlm.core.engine.layout import Layout, gather_seq
from himap_vlm.core.engine.outputs import align_outputs
from himap_vlm.core.engine.state import DecodeState, PrefillState, Replay
from himap_vlm.core.families import LayerMaskContext, ModelFamily, image_block_ids, layer_type, resolve_family
from himap_vlm.core.interface import AttentionEdit, LayerView, StepInput

__all__ = ["SELECTIONS", "PruningRun"]

SELECTIONS = ("once", "every_forward")


class PruningRun:
    """A method bound to a model: a context manager that installs and removes the engine's hooks.

    Parameters
    ----------
    model : nn.Module
        A supported transformers model (see :func:`himap_vlm.core.families.supported_classes`).
    method : PruningMethod
        The method deciding which image tokens to keep.
    selection : {"once", "every_forward"}
        When the kept tokens are chosen. ``"once"`` (default): once per ``generate`` call, in its
        prefill, whatever the cache setting — with ``use_cache=False`` every later step re-runs
        the whole sequence with the *same* kept image tokens, so the answer equals the cached
        one. ``"every_forward"``: every forward without a cache chooses again (the authors' code,
        which generated with ``use_cache=False``; the generated tokens then count as instruction
        tokens). With a cache both are the same.

    Attributes
    ----------
    image_tokens_per_layer : list[list[int]]
        Over decoder layers, over samples: image tokens present in that layer (last prefill).
    layer_positions : list[list[LongTensor]]
        Over decoder layers, over samples: indices into the input sequence of the tokens that
        layer processed (last prefill); padding positions excluded.
    num_prefills : int
        Number of prefills seen since the hooks were installed (re-applied selections included).
    record : dict
        Results of the last prefill: ``record["selection"]`` (``{"mode", "reused"}``: whether the
        kept tokens were chosen in this forward or re-applied from the ``generate`` call's first
        one) and method-specific entries (e.g. ``record["visipruner"]``).

    Notes
    -----
    Outputs. ``last_hidden_state`` (and the logits) keep the input length: tokens dropped at a
    layer get their state from that layer, through the final norm; positions that carry no real
    token (padding) hold 0. When a prefill dropped tokens, ``output_hidden_states`` /
    ``output_attentions`` line up with ``input_ids`` too: the embeddings and the layers before the
    first drop are the model's own tensors (as the unpruned model returns them); a layer that ran
    on a shortened sequence returns (B, S, D) hidden states and (B, H, S, S) attentions at input
    positions, 0 at the positions it did not process (``layer_positions[l]``) and at padding; the
    last hidden state is ``last_hidden_state``, as in transformers. A prefill that dropped no token
    returns the model's own outputs untouched (equal to the unpruned model). A cache filled under
    a method can be continued only inside the same ``with`` block (its pruned layers are shorter).

    Copies. ``copy.deepcopy(model)`` inside the ``with`` block gives a copy with its own,
    independent run of the same method; it leaves with this run's block.

    Raises
    ------
    ValueError
        For an unsupported model, a configuration that does not fit the model, or a model whose
        config has no usable image token id.
    """

    def __init__(self, model: nn.Module, method: Any, *, selection: str = "once"):
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(map(repr, SELECTIONS))}; got {selection!r}")
        self.model = model
        self.method = method
        self.selection = selection
        self.family: ModelFamily = resolve_family(model)
        self.decoder = self.family.decoder(model)
        self.text_config = self.family.text_config(model)
        self.layers: nn.ModuleList = getattr(self.decoder, self.family.layers_attr)
        self.num_layers = len(self.layers)
        self.image_token_id = self._checked_image_token_id()
        method.validate_for_model(self.num_layers)
        self.steps = method.steps()
        needs_projections = any(s.score is not None or s.features is not None for s in self.steps)
        needs_projections = needs_projections or method.dynamic or bool(method.attention_edits())
        self.contract = contract.check_model(
            model, self.decoder, self.layers[0], self._attn(0), needs_projections=needs_projections
        )
        first = self.family.min_prune_layer(model.config)
        for step in self.steps:
            if step.layer < first:
                raise ValueError(
                    f"{method.name}: pruning at layer {step.layer} is not allowed for {self.family.name}: "
                    f"tokens may be dropped from layer {first} on ({self.family.notes or 'model constraint'})"
                )
        policy = method.position_policy
        if policy not in ("keep", "renumber", "compact"):
            raise ValueError(f"{method.name}: unknown position policy {policy!r} (keep, renumber or compact)")
        self.renumber = policy in ("renumber", "compact")
        self.renumber_decode = policy == "compact"
        if self.renumber and not self.family.renumber_positions:
            raise ValueError(
                f"{method.name}: renumbering positions after a drop is not defined for {self.family.name} "
                f"({self.family.notes}); use positions='keep'"
            )
        self._step_at_layer = {s.layer: i for i, s in enumerate(self.steps)}
        self._attn_layers: dict[int, list[int]] = {}  # attention pre-hook at layer -> steps it serves
        for i, s in enumerate(self.steps):
            if (s.score is not None and s.score.layer == "previous") or (
                s.features is not None and "key_l1" in s.features.names
            ):
                self._attn_layers.setdefault(s.layer - 1, []).append(i)
        # the last layer may decide too (recorded, no effect on the computation), as the authors' code
        self._dynamic_layers = list(range(max(0, first - 1), self.num_layers)) if method.dynamic else []
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
        self.image_tokens_per_layer: list[list[int]] = []
        self.layer_positions: list[list[torch.Tensor]] = []
        self.num_prefills = 0
        self._handles: list[Any] = []
        self._copies: list[weakref.ReferenceType[PruningRun]] = []
        self._reset_forward_state()

    def _reset_forward_state(self) -> None:
        self._pending_ids: torch.Tensor | None = None
        self._pending_inputs: dict[str, Any] = {}  # top-level attention_mask / token_type_ids
        self._prefill: PrefillState | None = None
        self._decode: DecodeState | None = None
        self._replay: Replay | None = None
        self._last_forward: tuple[torch.Tensor, bool] | None = None  # (input_ids, had a cache)
        self._mode = "idle"

    def _attn(self, layer_idx: int) -> nn.Module:
        return getattr(self.layers[layer_idx], self.family.attn_attr)

    def _checked_image_token_id(self) -> int:
        vocab = getattr(self.text_config, "vocab_size", None)
        try:
            token = int(self.family.image_token_id(self.model.config))
        except (AttributeError, TypeError, ValueError):
            token = None
        if token is None or token < 0 or (vocab is not None and token >= int(vocab)):
            raise ValueError(
                f"{type(self.model).__name__}: config.image_token_id={token!r} is not a token of the language model "
                f"(vocabulary size {vocab}), so image tokens cannot be found in input_ids. Set "
                "model.config.image_token_id to the id the processor writes for each image token "
                "(e.g. processor.tokenizer.convert_tokens_to_ids(processor.image_token))."
            )
        return token

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
        self._reset_forward_state()
        h = self._handles
        h.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        h.append(self.decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True))
        h.append(self.decoder.register_forward_hook(self._decoder_post_hook, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            h.append(layer.register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True))
        for i in sorted(set(self._attn_layers) | set(self._dynamic_layers)):
            h.append(self._attn(i).register_forward_pre_hook(self._make_attn_hook(i), with_kwargs=True))
        for i, edit in self._edits.items():
            # registered last: the edit pre-hook arms the v_proj hook for the module's own call
            attn = self._attn(i)
            h.append(attn.register_forward_pre_hook(self._make_edit_pre_hook(i), with_kwargs=True))
            h.append(attn.register_forward_hook(self._make_edit_post_hook(i), with_kwargs=True))
            if edit.image_to_image == "drop":
                h.append(attn.v_proj.register_forward_hook(self._make_value_hook(i)))
        runs = getattr(self.model, "_himap_runs", [])
        runs.append(self)
        object.__setattr__(self.model, "_himap_runs", runs)
        object.__setattr__(self.model, "__deepcopy__", self._deepcopy_model)
        return self

    def detach(self) -> None:
        """Remove every hook and forget per-forward state (what ``__exit__`` does); copies leave too."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._reset_forward_state()
        runs = getattr(self.model, "_himap_runs", [])
        if self in runs:
            runs.remove(self)
        if self.model.__dict__.get("__deepcopy__") == self._deepcopy_model:
            del self.model.__dict__["__deepcopy__"]
        for ref in self._copies:
            child = ref()
            if child is not None and child.active:
                child.detach()
        self._copies.clear()

    def __enter__(self) -> PruningRun:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _deepcopy_model(self, memo: dict[int, Any]) -> nn.Module:
        """``copy.deepcopy`` of the model: a copy without this run's hooks, with its own run."""
        owner = self.model
        saved = {}
        for key in ("__deepcopy__", "_himap_runs"):
            if key in owner.__dict__:
                saved[key] = owner.__dict__.pop(key)
        hook_dicts = {}
        for module in owner.modules():
            for name in ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
                         "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                d = module.__dict__.get(name)
                if d:
                    hook_dicts[(id(module), name)] = (d, dict(d))
        ours = {h.id for h in self._handles}
        try:
            for d, _ in hook_dicts.values():
                for key in [k for k in d if k in ours]:
                    del d[key]
            clone = copy.deepcopy(owner, memo)
        finally:
            for d, original in hook_dicts.values():
                d.clear()
                d.update(original)
            owner.__dict__.update(saved)
        child = PruningRun(clone, self.method, selection=self.selection).attach()
        self._copies.append(weakref.ref(child))
        return clone

    def _warn_once(self, message: str) -> None:
        warnings.warn(message, stacklevel=4)

    # ------------------------------------------------------------------ hooks: model / decoder
    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and args[0].dtype in (torch.long, torch.int):
            ids = args[0]
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == 0:
            raise ValueError("himap: input_ids is empty (shape (B, 0)); give the model at least one token per sample")
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
        b, s = embeds.shape[:2] if embeds is not None else ids.shape[:2]
        if s == 0:
            raise ValueError("himap: the input is empty (0 tokens); give the model at least one token per sample")
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
            self._warn_once("himap: a 4-D attention mask was passed; pruning is disabled for this call")
            self._mode = "pass"
            return
        if past == 0 and isinstance(mask, torch.Tensor) and mask.shape[1] != s:
            raise contract.ContractError(
                "every continuation step hands the language model its KV cache",
                f"The attention mask covers {mask.shape[1]} tokens, the input {s}, and no cache arrived under "
                f"`{self.contract.cache_kwarg}`.",
            )
        if past > 0:
            self._start_continuation(cache, mask, b, s, past, device)
            return
        self._decode = None
        if ids is None or tuple(ids.shape[:2]) != (b, s):
            self._warn_once(
                "himap: the language model got no input_ids matching its inputs, so image tokens cannot be "
                "located; this call runs unpruned. Pass input_ids (not inputs_embeds) to the model."
            )
            self._mode = "pass"
            return
        ids = ids.to(device)
        attn2d = mask.bool().to(device) if mask is not None else torch.ones(b, s, dtype=torch.bool, device=device)
        self._start_prefill(ids, attn2d, cache, top.get("token_type_ids"))

    def _start_continuation(self, cache: Any, mask: Any, b: int, s: int, past: int, device: torch.device) -> None:
        """Decode steps (or a chunk after the prefill): no pruning; pruned layers get masks for their caches."""
        self._last_forward = None
        dec = self._decode
        if dec is None or dec.cache is not cache:
            self._mode = "pass"
            return
        new = mask[:, -s:].bool() if mask is not None else torch.ones(b, s, dtype=torch.bool, device=device)
        for seg, m2d in dec.segment_mask2d.items():
            dec.segment_mask2d[seg] = torch.cat([m2d, new.to(m2d.device)], dim=1)
        # original indices of the new tokens continue the full-length (layer 0) sequence
        added = (past + torch.arange(s, device=device))[None].expand(b, s)
        for seg, pos in dec.segment_positions.items():
            dec.segment_positions[seg] = torch.cat([pos, added.to(pos.device)], dim=1)
        if self.renumber_decode:  # each pruned segment continues its own numbering
            dec.step_rope = {}
            for seg, nxt in dec.segment_next_rope.items():
                offsets = torch.cumsum(new.long(), dim=1) - 1
                dec.step_rope[seg] = (nxt.to(device)[:, None] + offsets).clamp(min=0)
                dec.segment_next_rope[seg] = nxt.to(device) + new.long().sum(1)
        dec.mask_cache = {}
        dec.rope_cache = {}
        dec.step_len = s
        self._mode = "decode"

    def _start_prefill(self, ids: torch.Tensor, attn2d: torch.Tensor, cache: Any, token_types: Any) -> None:
        b, s = ids.shape
        is_image = (ids == self.image_token_id) & attn2d
        arange = torch.arange(s, device=ids.device)
        last_img = torch.where(is_image, arange, torch.full_like(ids, -1)).max(dim=1).values  # (B,)
        after = (arange[None, :] > last_img[:, None]) & attn2d
        replay = self._replay_for(ids, cache)
        st = PrefillState(
            input_ids=ids,
            attn2d=attn2d,
            is_image=is_image,
            after_last_image=after,
            layout=Layout.full(attn2d),
            num_image_input=[int(v) for v in is_image.sum(1).tolist()],
            cache=cache,
            replay=replay,
            decided=Replay(input_ids=ids),
        )
        if (
            self.family.bidirectional_image_blocks
            and isinstance(token_types, torch.Tensor)
            and tuple(token_types.shape[:2]) == (b, s)
        ):
            st.block_ids = image_block_ids((token_types.to(ids.device) == 1) & attn2d)
        self._prefill = st
        self.num_prefills += 1
        self.image_tokens_per_layer = []
        self.layer_positions = []
        self.record = dict(replay.record) if replay is not None else {}
        self.record["selection"] = {"mode": self.selection, "reused": replay is not None}
        self._mode = "prefill"

    def _replay_for(self, ids: torch.Tensor, cache: Any) -> Replay | None:
        """The previous decisions, if this no-cache forward continues the same ``generate`` call."""
        last, self._last_forward = self._last_forward, (ids, cache is not None)
        if self.selection != "once" or cache is not None or last is None or self._replay is None:
            return None
        prev, had_cache = last
        b, s = ids.shape
        if had_cache or prev.shape[0] != b or s != prev.shape[1] + 1 or not torch.equal(ids[:, :-1], prev):
            return None
        return self._replay

    def _decoder_post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        mode, self._mode = self._mode, "idle"
        if mode != "prefill" or self._prefill is None:
            return None
        st = self._prefill
        self._prefill = None
        if st.replay is None:
            st.decided.record = {k: v for k, v in self.record.items() if k != "selection"}
            self._replay = st.decided
        self._finish_prefill_for_decode(st)
        if not st.dropped:  # nothing left the sequence: the model's own outputs are aligned already
            return None
        norm = getattr(self.decoder, self.family.norm_attr, None)
        return align_outputs(st, output, norm, self.num_layers)

    def _finish_prefill_for_decode(self, st: PrefillState) -> None:
        cache = st.cache
        if cache is None or not st.layer_segments:
            self._decode = None
            return
        self._decode = DecodeState(
            cache=cache,
            layer_segment=dict(st.layer_segments),
            segment_mask2d=dict(st.segment_masks),
            segment_positions=dict(st.segment_positions),
            segment_next_rope={seg: st.segment_masks[seg].long().sum(1) for seg in st.segment_rope_positions},
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
        if st.replay is not None:
            if layer_idx in st.replay.drops:
                hidden = self._apply_keep(layer_idx, hidden, replayed_choice(st, layer_idx), "a re-applied selection")
        else:
            if st.pending_keep is not None and st.pending_keep[0] == layer_idx - 1:
                hidden = self._apply_keep(layer_idx, hidden, st.pending_keep[1], f"{self.method.name}.on_layer")
                st.pending_keep = None
            if layer_idx in self._step_at_layer:
                hidden = self._prune(self._step_at_layer[layer_idx], layer_idx, hidden, kwargs)
        lay = st.layout
        self._record(lay)
        st.layer_layouts.append(lay)
        if lay.segment == 0:
            return contract.with_layer_hidden(args, kwargs, hidden)
        # Pruned layers: everything positional must follow the shortened layout.
        kind = layer_type(self.text_config, layer_idx)
        key = (lay.segment, kind)
        if key not in st.mask_cache:
            st.mask_cache[key] = self.family.layer_mask(
                self.text_config,
                layer_idx,
                hidden,
                lay.mask2d,
                cache,
                context=LayerMaskContext(
                    key_positions=lay.idx,
                    block_ids=st.block_ids.gather(1, lay.idx) if st.block_ids is not None else None,
                ),
            )
        kwargs["attention_mask"] = st.mask_cache[key]
        kwargs["position_embeddings"] = self._layer_rope(st, lay, kind, kwargs.get("position_embeddings"), hidden)
        if "position_ids" in kwargs:
            kwargs["position_ids"] = lay.flash_position_ids if self._is_flash() else lay.position_ids
        st.layer_segments[layer_idx] = lay.segment
        st.segment_masks[lay.segment] = lay.mask2d
        st.segment_positions[lay.segment] = lay.idx
        return contract.with_layer_hidden(args, kwargs, hidden)

    def _layer_rope(self, st: PrefillState, lay: Layout, kind: str, incoming: Any, hidden: torch.Tensor) -> Any:
        """The rotary tables of a pruned layer in a prefill (original or renumbered positions)."""
        if self.renumber:
            key = (lay.segment, "renumber", kind)
            if key not in st.pos_cache:
                st.pos_cache[key] = contract.rotary_for_positions(self.decoder, hidden, lay.position_ids, kind)
            return st.pos_cache[key]
        if incoming is None or incoming is st.full_pos_emb:
            return lay.position_embeddings
        # per-layer-type rotary tables (Gemma3: local and global RoPE): gather this layer's own
        key = (lay.segment, id(incoming[0]))
        if key not in st.pos_cache:
            st.pos_cache[key] = gather_seq(incoming, lay.idx, -2)
        return st.pos_cache[key]

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
        kind = layer_type(self.text_config, layer_idx)
        key = (seg, kind)
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
        if self.renumber_decode:
            if key not in dec.rope_cache:
                dec.rope_cache[key] = contract.rotary_for_positions(self.decoder, hidden, dec.step_rope[seg], kind)
            kwargs["position_embeddings"] = dec.rope_cache[key]
            if "position_ids" in kwargs:
                kwargs["position_ids"] = dec.step_rope[seg]
        return args, kwargs

    def _is_flash(self) -> bool:
        return "flash" in contract.attn_implementation(self.text_config)

    def _record(self, lay: Layout) -> None:
        st = self._prefill
        is_img = st.is_image.gather(1, lay.idx) & lay.valid
        real = st.attn2d.gather(1, lay.idx) & lay.valid
        self.image_tokens_per_layer.append([int(v) for v in is_img.sum(1).tolist()])
        self.layer_positions.append([lay.idx[b][real[b]].cpu() for b in range(lay.idx.shape[0])])

    # ------------------------------------------------------------------ pruning
    def _prune(self, step_index: int, layer_idx: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        st = self._prefill
        step = self.steps[step_index]
        slots = st.slots()
        if step.score is not None and step.score.layer == "pruning":
            attn = self._attn(layer_idx)
            normed = getattr(self.layers[layer_idx], self.family.input_norm_attr)(hidden)
            pos = self._current_rope(st, layer_idx, kwargs.get("position_embeddings"), normed)
            with torch.no_grad():
                st.scores[step_index] = scoring.score(
                    self.family, self.text_config, attn, normed, pos, step.score, slots
                )
        features = None
        if step.features is not None:
            norm = getattr(self.decoder, self.family.norm_attr)
            features = step_features(st, step_index, step.features.names, hidden, slots, norm)
        scores = st.scores.pop(step_index, None)
        if step.score is not None and scores is None:
            raise RuntimeError(f"himap internal error: no attention scores for the step at layer {layer_idx}")
        chosen: list[torch.Tensor | None] = []
        for i in range(hidden.shape[0]):
            n = int(slots.is_image[i].sum())
            if n == 0:
                chosen.append(None)
                continue
            x = StepInput(
                step=step_index,
                layer=layer_idx,
                num_image=n,
                num_image_input=st.num_image_input[i],
                scores=scores[i] if scores is not None else None,
                features=features[i] if features is not None else None,
            )
            chosen.append(self.method.select(x))
        return self._apply_keep(layer_idx, hidden, chosen, f"{self.method.name}.select")

    def _current_rope(self, st: PrefillState, layer_idx: int, incoming: Any, hidden: torch.Tensor) -> Any:
        """Rotary tables of the current layout at the input of ``layer_idx`` (before its own swap)."""
        if st.layout.segment == 0:
            return incoming
        return self._layer_rope(st, st.layout, layer_type(self.text_config, layer_idx), incoming, hidden)

    def _apply_keep(
        self, layer_idx: int, hidden: torch.Tensor, chosen: list[torch.Tensor | None], source: str
    ) -> torch.Tensor:
        """Drop image tokens from layer ``layer_idx`` on (see :func:`~himap_vlm.core.engine.keep.apply_keep`)."""
        return apply_keep(
            self._prefill,
            layer_idx,
            hidden,
            chosen,
            source,
            renumber=self.renumber,
            renumber_decode=self.renumber_decode,
            flash=self._is_flash(),
        )

    # ------------------------------------------------------------------ attention pre-hooks
    def _make_attn_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            st = self._prefill
            if self._mode != "prefill" or st is None or st.replay is not None:
                return None
            hidden = contract.attn_hidden(args, kwargs, f"the attention module of layer {layer_idx}")
            pos = kwargs.get("position_embeddings")
            slots = st.slots()
            with torch.no_grad():
                for step_index in self._attn_layers.get(layer_idx, ()):
                    step = self.steps[step_index]
                    if step.score is not None and step.score.layer == "previous":
                        st.scores[step_index] = scoring.score(
                            self.family, self.text_config, module, hidden, pos, step.score, slots
                        )
                    if step.features is not None and "key_l1" in step.features.names:
                        st.features.setdefault(step_index, {})["key_l1"] = scoring.key_l1(
                            self.family, module, hidden, pos, slots
                        )
                if layer_idx in self._dynamic_layers:
                    self._dynamic(layer_idx, module, hidden, pos, slots)
            return None

        return hook

    def _dynamic(self, layer_idx: int, attn: nn.Module, hidden: torch.Tensor, pos: Any, slots: Any) -> None:
        st = self._prefill
        view = LayerView(
            layer=layer_idx,
            num_layers=self.num_layers,
            image_counts=[int(v) for v in slots.is_image.sum(1).tolist()],
            state=st.method_state,
            record=self.record,
            _positions=lambda i: st.layout.idx[i][slots.is_image[i]],
            _contributions=lambda: scoring.last_token_contributions(
                self.family, self.text_config, attn, hidden, pos, slots
            ),
        )
        decision = self.method.on_layer(layer_idx, view)
        if decision is None:
            return
        decision = list(decision)
        if len(decision) != view.batch_size:
            raise ValueError(
                f"{self.method.name}.on_layer returned {len(decision)} entries for a batch of {view.batch_size}"
            )
        if any(d is not None for d in decision):
            st.pending_keep = (layer_idx, decision)

    # ------------------------------------------------------------------ attention edits
    def _make_edit_pre_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            st = self._prefill
            if self._mode != "prefill" or st is None:
                return None
            hidden = contract.attn_hidden(args, kwargs, f"the attention module of layer {layer_idx}")
            with torch.no_grad():
                st.edit_ctx[layer_idx] = edits.prepare(
                    self._edits[layer_idx],
                    self.family,
                    self.text_config,
                    module,
                    hidden,
                    kwargs.get("position_embeddings"),
                    st.slots(),
                    self.method.name,
                    query_limit=st.replay.input_ids.shape[1] if st.replay is not None else None,
                )
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
            return edits.zero_image_values(output, ctx, layer_idx)

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
            out = edits.add_correction(output[0] if isinstance(output, tuple) else output, ctx)
            cache = self.contract.find_cache(kwargs, f"the attention module of layer {layer_idx}")
            if cache is not None:
                edits.write_cache(cache, layer_idx, ctx)
            if isinstance(output, tuple):
                return (out, *output[1:])
            return out

        return hook
