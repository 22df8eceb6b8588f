"""Model-family adapter records: where a model keeps what the engine needs.

Each supported model class maps to one small :class:`ModelFamily` record: how to reach the
decoder (language model) and its layers, where the image-placeholder id lives, how to compute the
query/key vectors a method scores, and how to build a layer's attention mask. The engine reads
only these records, so adding a family means adding a record, not touching the engine.

Conventions shared by every family (see ``docs/families.md``):

* image tokens are all positions where ``input_ids == image_token_id`` (every span of every image
  of a sample: anyres tiles and image-newline features, Idefics3 tiles and global view, several
  images); marker tokens around them (``<|vision_start|>``, ``<start_of_image>``,
  ``<fake_token_around_image>``, ``<row_1_col_1>``, ``<img>``, ...) are text and never dropped;
* instruction tokens (HiMAP's shallow queries) are the tokens after the sample's last image
  placeholder (a closing marker of the last span included);
* a method's budget applies to all image tokens of a sample together;
* video placeholders are not image tokens: they are kept like text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from himap_vlm.core import contract


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


def default_value(attn: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Value vectors of a Llama-style attention module (``v_proj``; no position encoding).

    Parameters
    ----------
    attn : nn.Module
        The attention module (``v_proj``, ``head_dim``).
    hidden : Tensor, shape (B, L, D)
        The attention input (after the layer's input norm).

    Returns
    -------
    Tensor, shape (B, H_kv, L, head_dim)
    """
    b, length, _ = hidden.shape
    return attn.v_proj(hidden).view(b, length, -1, attn.head_dim).transpose(1, 2)


def layer_type(text_config: Any, layer_idx: int) -> str:
    """The attention type of decoder layer ``layer_idx``.

    ``config.layer_types`` when the config has it; otherwise inferred the way transformers' own
    ``DynamicCache`` does: ``"sliding_attention"`` when ``config.sliding_window`` is set (e.g.
    Mistral), else ``"full_attention"``.
    """
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        return str(layer_types[layer_idx])
    return "sliding_attention" if getattr(text_config, "sliding_window", None) is not None else "full_attention"


def layer_window(text_config: Any, layer_idx: int) -> int | None:
    """The sliding window of decoder layer ``layer_idx`` (``None`` for full attention)."""
    if layer_type(text_config, layer_idx) != "sliding_attention":
        return None
    window = getattr(text_config, "sliding_window", None)
    return int(window) if window else None


@dataclass(frozen=True)
class LayerMaskContext:
    """What a layer's mask builder may need besides the 2-D mask of allowed keys.

    A layer that dropped tokens works on its own shortened sequence ("slots"); the key slots are the
    layer's cached slots followed by the current ones, and the queries are the last slots. These
    tensors say which *original* token each key slot holds, so masks that depend on distances or on
    token kinds follow the original sequence rather than the shortened one.

    Attributes
    ----------
    key_positions : LongTensor, shape (B, K)
        Original index of every key slot: its index in the padded input sequence (generated tokens
        continue it: the t-th generated token has index ``S + t``). Sliding windows are measured on
        these indices, so a window covers the same original tokens as in the unpruned model.
    block_ids : LongTensor, shape (B, K), optional
        Image block of every key slot (``-1`` for text), for families whose image tokens attend
        bidirectionally within their image (:attr:`ModelFamily.bidirectional_image_blocks`).
        ``None`` when no slot needs it (e.g. decode steps: generated tokens are text).
    """

    key_positions: torch.Tensor
    block_ids: torch.Tensor | None = None


def _window_by_position(positions: torch.Tensor, window: int) -> Callable[..., torch.Tensor]:
    """Mask function: key within ``window`` of the query, measured on original indices."""

    def inner(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> torch.Tensor:
        return positions[batch_idx, kv_idx] > positions[batch_idx, q_idx] - window

    return inner


def _either(a: Callable[..., torch.Tensor], b: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Mask function: ``a`` or ``b``."""

    def inner(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> torch.Tensor:
        return a(batch_idx, head_idx, q_idx, kv_idx) | b(batch_idx, head_idx, q_idx, kv_idx)

    return inner


def default_layer_mask(
    text_config: Any,
    layer_idx: int,
    hidden: torch.Tensor,
    mask2d: torch.Tensor,
    cache: Any,
    context: LayerMaskContext | None = None,
) -> Any:
    """Attention mask of one decoder layer for a (possibly shortened) sequence.

    Built with transformers' own mask builders (through :func:`himap_vlm.core.contract.layer_mask`) so
    that its format matches the attention kernel in use (SDPA, eager, flex). ``position_ids`` are deliberately not passed: gapped positions
    would be read as packed sequences. Kept tokens stay in their original order, so causality by
    slot index equals causality by original position.

    With a ``context``, sliding-window layers measure the window on original indices (the same
    keys as the unpruned model minus the dropped ones), and image blocks of
    ``context.block_ids`` attend bidirectionally (``AND(window, OR(causal, block))``, Gemma3's
    composition). Masks are sized against this layer's own cache (``layer_idx``), whose length
    differs from unpruned layers of the same type. Flash attention builds no mask: its window
    would count slots, not original tokens (untested).

    Parameters
    ----------
    text_config : PretrainedConfig
        The language model's config (attention implementation, ``layer_types``, window).
    layer_idx : int
        The decoder layer.
    hidden : Tensor, shape (B, Q, D)
        The layer's input (queries).
    mask2d : BoolTensor, shape (B, K)
        Keys allowed (cached slots then current ones).
    cache : Cache or None
        The KV cache.
    context : LayerMaskContext, optional
        Original indices (and image blocks) of the key slots.
    """
    window = layer_window(text_config, layer_idx)
    and_fn = or_fn = None
    if context is not None and window:
        and_fn = _window_by_position(context.key_positions, int(window))
    if context is not None and context.block_ids is not None:
        or_fn = contract.blockwise_overlay(context.block_ids)
        if and_fn is not None and contract.image_blocks_override_window():
            # AND(OR(causal, block), OR(window, block)) = OR(AND(causal, window), block)
            and_fn = _either(and_fn, or_fn)
    return contract.layer_mask(
        text_config,
        layer_idx,
        hidden,
        mask2d,
        cache,
        sliding=bool(window),
        and_mask_function=and_fn,
        or_mask_function=or_fn,
    )


def image_block_ids(is_image: torch.Tensor) -> torch.Tensor:
    """Block id of every token: contiguous image runs numbered from 0 per sample, text ``-1``.

    The convention of transformers' ``block_sequence_ids`` (Gemma3): tokens of one image attend to
    each other bidirectionally; different images and text stay causal.
    """
    prev = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    starts = is_image & ~prev
    groups = torch.cumsum(starts.long(), dim=1) - 1
    return torch.where(is_image, groups, torch.full_like(groups, -1))


def _llava_decoder(model: nn.Module) -> nn.Module:
    return model.model.language_model


def _text_model(model: nn.Module) -> nn.Module:
    return model.model.text_model


def _text_config(model: nn.Module) -> Any:
    return model.config.text_config


def _image_token_id(config: Any) -> int:
    return int(config.image_token_id)


def _deepstack_done(config: Any) -> int:
    """Qwen3-VL: DeepStack adds vision features after decoder layers 0 .. n-1; prune from n on."""
    return max(1, len(getattr(config.vision_config, "deepstack_visual_indexes", ()) or ()))


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
        ``model -> nn.Module``: the language model whose ``layers`` the engine hooks (default
        ``model.model.language_model``).
    text_config : callable
        ``model -> PretrainedConfig`` of the language model (default ``config.text_config``).
    image_token_id : callable
        ``config -> int``: the placeholder id marking image tokens in ``input_ids`` (default
        ``config.image_token_id``).
    layers_attr, norm_attr, attn_attr, input_norm_attr : str
        Attribute names of the decoder's layer list, final norm, a layer's attention module and a
        layer's input norm.
    query_key : callable
        Computes the queries/keys a method scores (see :func:`default_query_key`).
    value : callable
        Computes the value vectors (see :func:`default_value`); used for attention contributions
        and attention edits.
    layer_mask : callable
        Builds a layer's attention mask (see :func:`default_layer_mask`): called as
        ``layer_mask(text_config, layer_idx, hidden, mask2d, cache, context=LayerMaskContext)``.
    min_prune_layer : callable
        ``config -> int``: the first layer at which tokens may be dropped (e.g. after Qwen3-VL's
        DeepStack layers); a method pruning earlier is refused with a ``ValueError``.
    bidirectional_image_blocks : bool
        Whether the tokens of one image attend to each other bidirectionally (Gemma3). The blocks
        come from the ``token_type_ids`` the model was called with (``1`` = image; none given:
        causal, as the model itself does); the engine keeps them in rebuilt masks and in scores.
    renumber_positions : bool
        Whether positions can be renumbered ``0 .. n-1`` after a drop (a method's
        ``position_policy="renumber"``): False for 3-D M-RoPE, where a token's position is a
        (t, h, w) triple and renumbering has no definition.
    notes : str
        Anything a user should know (shown in errors and docs).
    """

    name: str
    class_names: tuple[str, ...]
    decoder: Callable[[nn.Module], nn.Module] = _llava_decoder
    text_config: Callable[[nn.Module], Any] = _text_config
    image_token_id: Callable[[Any], int] = _image_token_id
    layers_attr: str = "layers"
    norm_attr: str = "norm"
    attn_attr: str = "self_attn"
    input_norm_attr: str = "input_layernorm"
    query_key: Callable[..., tuple[torch.Tensor, torch.Tensor]] = default_query_key
    value: Callable[..., torch.Tensor] = default_value
    layer_mask: Callable[..., Any] = default_layer_mask
    min_prune_layer: Callable[[Any], int] = field(default=lambda config: 1)
    bidirectional_image_blocks: bool = False
    renumber_positions: bool = True
    notes: str = ""


LLAVA = ModelFamily(
    name="LLaVA-1.5",
    class_names=("LlavaForConditionalGeneration",),
    notes="LLaVA-1.5 layout with Llama, Mistral or Qwen2 text backbones (MHA or grouped-query attention).",
)

LLAVA_NEXT = ModelFamily(
    name="LLaVA-NeXT / LLaVA-OneVision",
    class_names=("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration"),
    notes="anyres: each image is a base view plus tiles, with image-newline features inside the span; "
    "every placeholder of the span (newlines included) is an image token.",
)

QWEN_VL = ModelFamily(
    name="Qwen2-VL / Qwen2.5-VL",
    class_names=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
    renumber_positions=False,
    notes="3-D M-RoPE: kept tokens keep their (t, h, w) rotary tables; decode positions come from the "
    "model's rope_deltas and layer 0's (never pruned) cache length.",
)

QWEN3_VL = ModelFamily(
    name="Qwen3-VL",
    class_names=("Qwen3VLForConditionalGeneration",),
    min_prune_layer=_deepstack_done,
    renumber_positions=False,
    notes="DeepStack adds vision features to the image positions after the first "
    "len(vision_config.deepstack_visual_indexes) decoder layers; tokens may be dropped only after them.",
)

INTERNVL = ModelFamily(
    name="InternVL",
    class_names=("InternVLForConditionalGeneration",),
    notes="<img> <IMG_CONTEXT>... </img> spans; every tile of an image is inside one span.",
)

IDEFICS3 = ModelFamily(
    name="Idefics3 / SmolVLM",
    class_names=("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"),
    decoder=_text_model,
    notes="image splitting: one span per tile (row/column marker tokens) plus a global view; "
    "the markers are text, every <image> placeholder is an image token.",
)

GEMMA3 = ModelFamily(
    name="Gemma3",
    class_names=("Gemma3ForConditionalGeneration",),
    bidirectional_image_blocks=True,
    notes="image tokens attend bidirectionally within their image (token_type_ids); sliding-window "
    "and full layers get their own masks, windows measured on original positions.",
)

FAMILIES: list[ModelFamily] = [LLAVA, LLAVA_NEXT, QWEN_VL, QWEN3_VL, INTERNVL, IDEFICS3, GEMMA3]


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
