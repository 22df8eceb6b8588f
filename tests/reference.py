"""Independent references the engine is checked against.

* :func:`masked_reference_logits` keeps *every* token in every layer and instead masks the dropped
  ones out of the attention of the layers that dropped them (eager attention, explicit 4-D masks,
  original positions, no KV cache). Physically dropping tokens must give the same logits.
* :func:`explicit_attention_scores` ranks image tokens from the full attention maps of an eager
  forward (``output_attentions=True``), the way the authors' code does.
"""

from __future__ import annotations

import torch


def _positions(mask2d: torch.Tensor) -> torch.Tensor:
    return (mask2d.long().cumsum(-1) - 1).masked_fill(mask2d == 0, 0)


@torch.no_grad()
def masked_reference_logits(model, inputs: dict, layer_positions, generated: torch.Tensor | None = None):
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
