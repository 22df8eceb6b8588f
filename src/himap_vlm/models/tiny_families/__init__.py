"""Tiny, offline models of every supported family, and inputs built directly as tensors.

Each builder makes a small random model of one transformers v5 class (hidden size 32-64, 4-6
decoder layers, a handful of image tokens per image) from a config, offline, and turns prompts
with ``<image>`` markers into the tensors that class expects. Processors are bypassed on purpose:
several families need image processors (anyres tiling, Qwen2-VL ``image_grid_thw``, Idefics3
image splitting) that would make the tests slow or depend on optional packages. Instead:

* the image span of every family is written out the way its processor writes it (marker tokens,
  row/column tokens, image-newline features counted inside the span, ...);
* the number of placeholder tokens per image is taken from what the model itself produces for the
  pixel tensors (or from the config where it is fixed), and the model checks it again in its own
  forward (it raises when placeholders and image features do not match).

Text words map to fixed ids (CRC32 of the word), so a prompt gives the same ids in a batch and
alone. Images are integer seeds: a seed fixes the pixel values and, for families with a variable
number of tokens per image, the geometry (size, grid, tiles).

These models are random; they check mechanics, not accuracy.

Modules: :mod:`.base` (token ids, :class:`ImageSpan`, :class:`TinyFamily`), one module per
family group (:mod:`.llava`, :mod:`.qwen`, :mod:`.internvl`, :mod:`.idefics`, :mod:`.gemma`);
everything is importable from this package.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import (
    BOI,
    BOS,
    DOUBLE_NEWLINE,
    EOI,
    EOS,
    FAKE_AROUND,
    FIRST_WORD,
    GLOBAL_IMG,
    IMAGE,
    IMAGE_MARKER,
    IMG_END,
    IMG_START,
    NEWLINE,
    PAD,
    ROW_COL_BASE,
    VIDEO,
    VISION_END,
    VISION_START,
    VOCAB_SIZE,
    ImageSpan,
    TinyFamily,
    word_id,
)
from .gemma import TinyGemma3
from .idefics import TinyIdefics3, TinySmolVLM
from .internvl import TinyInternVL
from .llava import TinyLlavaNext, TinyLlavaOnevision, TinyLlavaSWA
from .qwen import TinyQwen2VL, TinyQwen3VL, TinyQwen25VL

__all__ = [
    "FAMILY_BUILDERS",
    "IMAGE_MARKER",
    "ImageSpan",
    "TinyFamily",
    "TinyGemma3",
    "TinyIdefics3",
    "TinyInternVL",
    "TinyLlavaNext",
    "TinyLlavaOnevision",
    "TinyLlavaSWA",
    "TinyQwen25VL",
    "TinyQwen2VL",
    "TinyQwen3VL",
    "TinySmolVLM",
    "build_tiny_family",
    "word_id",
    "VOCAB_SIZE",
    "PAD",
    "BOS",
    "EOS",
    "IMAGE",
    "BOI",
    "EOI",
    "VISION_START",
    "VISION_END",
    "FAKE_AROUND",
    "GLOBAL_IMG",
    "NEWLINE",
    "DOUBLE_NEWLINE",
    "IMG_START",
    "IMG_END",
    "VIDEO",
    "ROW_COL_BASE",
    "FIRST_WORD",
]



FAMILY_BUILDERS: dict[str, Callable[..., TinyFamily]] = {
    cls.name: cls
    for cls in (
        TinyLlavaSWA,
        TinyLlavaNext,
        TinyLlavaOnevision,
        TinyQwen2VL,
        TinyQwen25VL,
        TinyQwen3VL,
        TinyInternVL,
        TinyIdefics3,
        TinySmolVLM,
        TinyGemma3,
    )
}


def build_tiny_family(name: str, attn: str = "sdpa", seed: int = 0) -> TinyFamily:
    """Build the tiny model of family ``name`` (a key of :data:`FAMILY_BUILDERS`), offline."""
    if name not in FAMILY_BUILDERS:
        raise ValueError(f"unknown tiny family {name!r}; choose one of {', '.join(sorted(FAMILY_BUILDERS))}")
    return FAMILY_BUILDERS[name](attn=attn, seed=seed)
