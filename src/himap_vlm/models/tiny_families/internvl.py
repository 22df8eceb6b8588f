"""InternVL (``<img>`` ... ``</img>`` spans)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import (
    IMAGE,
    IMG_END,
    IMG_START,
    ImageSpan,
    TinyFamily,
    _pixels,
    _qwen2,
)


# ---------------------------------------------------------------------------------------------- InternVL
class TinyInternVL(TinyFamily):
    """InternVL: ``<img> <IMG_CONTEXT>*N </img>``; 1-3 tiles of 4 tokens per image (pixel shuffle)."""

    name = "internvl"

    def build_model(self) -> nn.Module:
        from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

        vision = InternVLVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=[8, 8], patch_size=[2, 2],
        )
        config = InternVLConfig(
            vision_config=vision,
            text_config=_qwen2(),
            image_token_id=IMAGE,
            image_seq_length=4,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
        return InternVLForConditionalGeneration(config)

    def image_span(self, seed: int) -> ImageSpan:
        tiles = 1 + seed % 3
        px = _pixels(seed, tiles, 3, 8, 8)
        n = tiles * int(self.model.config.image_seq_length)
        return ImageSpan([IMG_START] + [IMAGE] * n + [IMG_END], px)

    def pixel_inputs(self, spans: list[list[ImageSpan]]) -> dict[str, Any]:
        return {"pixel_values": torch.cat([sp.pixels for sample in spans for sp in sample])}
