"""Model-family adapter records: where a model keeps what the engine needs.

Each supported model class maps to one small :class:`ModelFamily` record: how to reach the
decoder (language model) and its layers, where the image-placeholder id lives, how to compute the
query/key vectors a method scores, and how to build a layer's attention mask. The engine reads
only these records, so adding a family means adding a record, not touching the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate half of the last dimension (the RoPE convention of Llama-style models)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def default_query_key(
    attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of a Llama-style attention module, with RoPE (and q/k norms if present).

    Parameters
    ----------
    attn : nn.Module
        The attention module (``q_proj``, ``k_proj``, ``head_dim``; optional ``q_norm``/``k_norm``).
    hidden : Tensor, shape (B, L, D)
        The attention input (after the layer's input norm).
    cos, sin : Tensor, shape (B, L, head_dim)
        The rotary tables of the L positions.
    rows : LongTensor, shape (B, R), optional
        Query rows to compute (all rows when omitted).

    Returns
    -------
    q : Tensor, shape (B, H, R, head_dim)
    k : Tensor, shape (B, H_kv, L, head_dim)
    """
    b, length, _ = hidden.shape
    hd = attn.head_dim
    if rows is not None:
        hq = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
        cq = cos.gather(1, rows[..., None].expand(-1, -1, cos.shape[-1]))
        sq = sin.gather(1, rows[..., None].expand(-1, -1, sin.shape[-1]))
    else:
        hq, cq, sq = hidden, cos, sin
    q = attn.q_proj(hq).view(b, hq.shape[1], -1, hd)
    k = attn.k_proj(hidden).view(b, length, -1, hd)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    if getattr(attn, "k_norm", None) is not None:
        k = attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    q = q * cq.unsqueeze(1) + rotate_half(q) * sq.unsqueeze(1)
    k = k * cos.unsqueeze(1) + rotate_half(k) * sin.unsqueeze(1)
    return q, k


def default_layer_mask(
    text_config: Any,
    layer_idx: int,
    hidden: torch.Tensor,
    mask2d: torch.Tensor,
    cache: Any,
) -> Any:
    """Attention mask of one decoder layer for a (possibly shortened) sequence.

    Built with transformers' own ``masking_utils`` so that its format matches the attention kernel
    in use (SDPA, eager, flash, flex). ``position_ids`` are deliberately not passed: gapped
    positions would be read as packed sequences. Kept tokens stay in their original order, so
    causality by index equals causality by original position.
    """
    from transformers import masking_utils

    layer_types = getattr(text_config, "layer_types", None)
    kind = layer_types[layer_idx] if layer_types else "full_attention"
    fn = (
        masking_utils.create_sliding_window_causal_mask
        if kind == "sliding_attention"
        else masking_utils.create_causal_mask
    )
    kwargs = dict(
        config=text_config,
        inputs_embeds=hidden,
        attention_mask=mask2d,
        past_key_values=cache,
        position_ids=None,
    )
    if fn is masking_utils.create_causal_mask:
        kwargs["layer_idx"] = layer_idx
    return fn(**kwargs)


@dataclass(frozen=True)
class ModelFamily:
    """How the engine reaches the parts of one model family.

    Parameters
    ----------
    name : str
        Human-readable family name.
    class_names : tuple of str
        Model class names (``type(model).__name__``) handled by this record.
    decoder : callable
        ``model -> nn.Module``: the language model whose ``layers`` the engine hooks.
    text_config : callable
        ``model -> PretrainedConfig`` of the language model.
    image_token_id : callable
        ``config -> int``: the placeholder id marking image tokens in ``input_ids``.
    layers_attr, norm_attr, attn_attr : str
        Attribute names of the decoder's layer list, final norm, and a layer's attention module.
    query_key : callable
        Computes the queries/keys a method scores (see :func:`default_query_key`).
    layer_mask : callable
        Builds a layer's attention mask (see :func:`default_layer_mask`).
    min_prune_layer : callable
        ``config -> int``: the first layer at which tokens may be dropped.
    notes : str
        Anything a user should know (shown in errors and docs).
    """

    name: str
    class_names: tuple[str, ...]
    decoder: Callable[[nn.Module], nn.Module]
    text_config: Callable[[nn.Module], Any]
    image_token_id: Callable[[Any], int]
    layers_attr: str = "layers"
    norm_attr: str = "norm"
    attn_attr: str = "self_attn"
    query_key: Callable[..., tuple[torch.Tensor, torch.Tensor]] = default_query_key
    layer_mask: Callable[..., Any] = default_layer_mask
    min_prune_layer: Callable[[Any], int] = field(default=lambda config: 1)
    notes: str = ""


def _llava_decoder(model: nn.Module) -> nn.Module:
    return model.model.language_model


LLAVA = ModelFamily(
    name="LLaVA-1.5",
    class_names=("LlavaForConditionalGeneration",),
    decoder=_llava_decoder,
    text_config=lambda model: model.config.text_config,
    image_token_id=lambda config: int(config.image_token_id),
    notes="LLaVA-1.5 layout with Llama, Mistral or Qwen2 text backbones (MHA or grouped-query attention).",
)

FAMILIES: list[ModelFamily] = [LLAVA]


def supported_classes() -> list[str]:
    """Names of every supported model class."""
    return sorted(name for fam in FAMILIES for name in fam.class_names)


def resolve_family(model: nn.Module) -> ModelFamily:
    """The :class:`ModelFamily` record for ``model``.

    Raises
    ------
    ValueError
        If the model class is not supported, listing the supported classes.
    """
    cls = type(model).__name__
    for fam in FAMILIES:
        if cls in fam.class_names:
            return fam
    raise ValueError(
        f"himap does not support {cls} yet. Supported model classes: {', '.join(supported_classes())}. "
        "Load the model with one of these classes (e.g. LlavaForConditionalGeneration.from_pretrained(path))."
    )
