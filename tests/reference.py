"""Independent references the engine is checked against.

* :func:`masked_reference_logits` keeps *every* token in every layer and instead masks the dropped
  ones out of the attention of the layers that dropped them (eager attention, explicit 4-D masks,
  original positions, no KV cache). Physically dropping tokens must give the same logits.
  With ``attention_edit`` it also computes every layer's attention explicitly (full post-softmax
  matrix, edited by the callback, times V, ``o_proj``): the reference for post-softmax edits.
* :func:`explicit_attention_scores` ranks image tokens from the full attention maps of an eager
  forward (``output_attentions=True``), the way the authors' code does.
"""

from __future__ import annotations

import torch


def _positions(mask2d: torch.Tensor) -> torch.Tensor:
    return (mask2d.long().cumsum(-1) - 1).masked_fill(mask2d == 0, 0)


def _explicit_attention_hook(layer_idx: int, attention_edit):
    """Forward hook replacing an attention module's output by an explicit, edited computation."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def hook(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        mask = kwargs["attention_mask"]
        b, t, _ = hidden.shape
        hd = module.head_dim
        q = module.q_proj(hidden).view(b, t, -1, hd).transpose(1, 2)
        k = module.k_proj(hidden).view(b, t, -1, hd).transpose(1, 2)
        v = module.v_proj(hidden).view(b, t, -1, hd).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * module.scaling + mask, dim=-1)
        edited = attention_edit(layer_idx, weights)
        weights = weights if edited is None else edited
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, t, -1)
        return module.o_proj(out), weights

    return hook


@torch.no_grad()
def masked_reference_logits(
    model, inputs: dict, layer_positions, generated: torch.Tensor | None = None, attention_edit=None
):
    """Logits of the last position with dropped tokens masked (not removed) per layer.

    Parameters
    ----------
    model
        A LLaVA model; it is switched to eager attention for the call and restored.
    inputs : dict
        Processor outputs (``input_ids``, ``attention_mask``, ``pixel_values``).
    layer_positions : list[list[LongTensor]]
        ``run.layer_positions`` of the pruned prefill: which prompt tokens each layer keeps.
    generated : LongTensor, shape (B, T), optional
        Tokens generated after the prompt (always visible to every layer).
    attention_edit : callable, optional
        ``attention_edit(layer_idx, weights) -> weights or None`` with post-softmax weights of
        shape (B, H, T, T) over prompt + generated tokens; when given, every layer's attention is
        computed explicitly and the returned (edited) weights are used.

    Returns
    -------
    Tensor, shape (B, vocab)
    """
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"].bool()
    b, s = ids.shape
    if generated is not None and generated.shape[1]:
        ids = torch.cat([ids, generated], dim=1)
        mask = torch.cat([mask, torch.ones_like(generated, dtype=torch.bool)], dim=1)
    total = ids.shape[1]
    causal = torch.tril(torch.ones(total, total, dtype=torch.bool))
    allowed_per_layer = []
    for layer in layer_positions:
        allowed = torch.zeros(b, total, dtype=torch.bool)
        allowed[:, s:] = True
        for i, pos in enumerate(layer):
            allowed[i, pos] = True
        allowed &= mask
        allowed_per_layer.append(allowed)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    layers = model.model.language_model.layers
    handles = []
    dtype = next(model.parameters()).dtype
    try:
        for li, layer in enumerate(layers):
            keep = causal[None] & allowed_per_layer[li][:, None, :]
            # rows without any allowed key (fully masked) attend to themselves to stay finite
            eye = torch.eye(total, dtype=torch.bool)[None]
            keep = keep | (eye & ~keep.any(-1, keepdim=True))
            float_mask = torch.zeros(b, 1, total, total, dtype=dtype)
            float_mask.masked_fill_(~keep[:, None], torch.finfo(dtype).min)

            def hook(module, args, kwargs, _m=float_mask):
                kwargs["attention_mask"] = _m
                return args, kwargs

            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            if attention_edit is not None:
                handles.append(
                    layer.self_attn.register_forward_hook(
                        _explicit_attention_hook(li, attention_edit), with_kwargs=True
                    )
                )
        out = model(
            input_ids=ids,
            attention_mask=mask.long(),
            pixel_values=inputs.get("pixel_values"),
            position_ids=_positions(mask),
            use_cache=False,
        )
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous)
    return out.logits[:, -1].float()


@torch.no_grad()
def explicit_attention_maps(model, inputs: dict) -> list[torch.Tensor]:
    """Full attention maps of every layer (eager, dense), each of shape (B, H, S, S)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(**inputs, position_ids=_positions(inputs["attention_mask"].bool()), output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    return [a.float() for a in out.attentions]
