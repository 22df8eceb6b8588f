"""Per-layer FLOPs formulas and KV-cache bytes (pure arithmetic on dimensions and counts).

See :mod:`himap_vlm.apps.flops` for the two conventions these formulas implement.
"""

from __future__ import annotations

import torch

from himap_vlm.apps.flops.configs import TextDims, VisionDims
from himap_vlm.apps.flops.layout import Counts, Layout, _non_negative_int, _per_sample_counts

__all__ = ["bytes_per_element", "kv_cache_bytes", "paper_layer_flops"]


def paper_layer_flops(n: int, d: int, m: int) -> int:
    """FLOPs of ``n`` image tokens in one decoder layer, paper convention.

    ``4*n*d**2 + 2*n**2*d + 2*n*d*m`` (FastV, HiMAP).

    Parameters
    ----------
    n : int
        Image tokens present in the layer.
    d, m : int
        Hidden size and FFN size.
    """
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def _exact_layer_flops(dims: TextDims, s: int, causal: bool) -> int:
    """Prefill FLOPs of one decoder layer over ``s`` tokens (exact convention)."""
    d, hd = dims.hidden_size, dims.head_dim
    q_width, kv_width = dims.num_heads * hd, dims.num_kv_heads * hd
    proj = 2 * s * d * (2 * q_width + 2 * kv_width)  # q, o: d x H*hd; k, v: d x KV*hd
    pairs = s * (s + 1) // 2 if causal else s * s  # query-key pairs per head
    attn = 2 * (2 * pairs * hd) * dims.num_heads  # QK^T and AV
    ffn = 3 * 2 * s * d * dims.intermediate_size  # gate, up, down
    return proj + attn + ffn


def _exact_decode_layer_flops(dims: TextDims, kv_len: int) -> int:
    """FLOPs of one new token in one decoder layer attending to ``kv_len`` keys (itself included)."""
    d, hd = dims.hidden_size, dims.head_dim
    proj = 2 * d * (2 * dims.num_heads * hd + 2 * dims.num_kv_heads * hd)
    attn = 2 * (2 * kv_len * hd) * dims.num_heads
    ffn = 3 * 2 * d * dims.intermediate_size
    return proj + attn + ffn


def _vision_flops(vision: VisionDims, num_images: int) -> dict[str, int]:
    s, h = vision.seq_len, vision.hidden_size
    patch = 2 * vision.num_patches * (vision.num_channels * vision.patch_size**2) * h
    layer = 4 * 2 * s * h * h + 2 * 2 * s * s * h + 2 * 2 * s * h * vision.intermediate_size
    n = vision.num_image_tokens
    projector = 2 * n * h * vision.projector_hidden + 2 * n * vision.projector_hidden * vision.projector_out
    return {
        "vision_tower": num_images * (patch + vision.num_layers * layer),
        "projector": num_images * projector,
    }


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------
_DTYPE_ALIASES = {
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
    "fp8": "float8_e4m3fn",
}


def bytes_per_element(dtype: torch.dtype | str | int) -> int:
    """Bytes of one cache element.

    Parameters
    ----------
    dtype : torch.dtype, str or int
        A torch dtype, its name (``"float16"``, ``"bf16"``, ``"fp32"``, ``"int8"``, ...) or a
        number of bytes.

    Raises
    ------
    ValueError
        For an unknown name or a non-positive size.
    """
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype <= 0:
            raise ValueError(f"dtype as a byte count must be positive; got {dtype}")
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        resolved = getattr(torch, _DTYPE_ALIASES.get(name, name), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(
                f"unknown dtype {dtype!r}; use a torch dtype name such as 'float16', 'bfloat16' or 'float32'"
            )
        dtype = resolved
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, a dtype name or a byte count; got {dtype!r}")
    return dtype.itemsize


def kv_cache_bytes(
    dims: TextDims,
    layout: Layout,
    image_tokens_per_layer: Counts | None = None,
    dtype: torch.dtype | str | int = torch.float16,
    batch: int = 1,
    *,
    generated: int = 0,
) -> list[int]:
    """KV-cache bytes of each decoder layer after the prefill (plus ``generated`` tokens).

    ``2 * KV * hd * (text + image_tokens_per_layer[l] + generated) * bytes_per_element``, summed
    over the batch.

    Parameters
    ----------
    dims, layout
        As in :func:`prefill_flops`.
    image_tokens_per_layer : list of int, or list over layers of lists over the batch, optional
        ``None``: dense. With batched counts, each sample's own counts are used and ``batch``
        must be 1 (the default) or the batch size of the counts.
    dtype : torch.dtype, str or int
        Cache element type (see :func:`bytes_per_element`).
    batch : int
        Samples sharing a flat (per-layer) count list.
    generated : int
        Tokens decoded after the prefill and appended to every layer's cache.

    Returns
    -------
    list of int
        ``L`` byte counts. Padding of batched caches is not counted.
    """
    if not isinstance(dims, TextDims):
        raise ValueError(
            f"dims must be a TextDims (use TextDims.from_config(...)); got {type(dims).__name__}"
        )
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be a Layout(before, image, after); got {type(layout).__name__}")
    size = bytes_per_element(dtype)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer; got {batch!r}")
    generated = _non_negative_int("generated", generated)
    samples = _per_sample_counts(image_tokens_per_layer, dims.num_layers, layout.image)
    if len(samples) > 1:
        if batch not in (1, len(samples)):
            raise ValueError(
                f"batch={batch} disagrees with the {len(samples)} samples in image_tokens_per_layer; leave batch at 1 "
                "when passing per-sample counts"
            )
    else:
        samples = samples * batch
    per_token = 2 * dims.num_kv_heads * dims.head_dim * size
    base = layout.text + generated
    return [sum(per_token * (base + s[layer]) for s in samples) for layer in range(dims.num_layers)]
