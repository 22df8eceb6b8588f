"""Gemma3 (begin/end-of-image tokens, token type ids)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import (
    BOI,
    BOS,
    DOUBLE_NEWLINE,
    EOI,
    EOS,
    IMAGE,
    PAD,
    VOCAB_SIZE,
    ImageSpan,
    TinyFamily,
    _pixels,
)


# ---------------------------------------------------------------------------------------------- Gemma3
class TinyGemma3(TinyFamily):
    """Gemma3: ``\\n\\n <start_of_image> <image>*9 <end_of_image> \\n\\n``; sliding (window 8) and full layers.

    Image tokens attend bidirectionally within their image (``token_type_ids``). The window (8) is
    shorter than an image span plus its neighbours, so both the window and the blocks matter.
    """

    name = "gemma3"

    def build_model(self) -> nn.Module:
        from transformers import (
            Gemma3Config,
            Gemma3ForConditionalGeneration,
            Gemma3TextConfig,
            SiglipVisionConfig,
        )

        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=12, patch_size=2,
        )
        text = Gemma3TextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=12,
            sliding_window=8, max_position_embeddings=512,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        )
        config = Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=9,
            boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE, tie_word_embeddings=False,
        )
        model = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():
            proj = model.model.multi_modal_projector.mm_input_projection_weight
            if not proj.abs().sum():
                gen = torch.Generator().manual_seed(self.seed)
                proj.copy_(torch.randn(proj.shape, generator=gen) * 0.2)
        return model

    def image_span(self, seed: int) -> ImageSpan:
        n = int(self.model.config.mm_tokens_per_image)
        px = _pixels(seed, 3, 12, 12)
        return ImageSpan([DOUBLE_NEWLINE, BOI] + [IMAGE] * n + [EOI, DOUBLE_NEWLINE], px)

    def pixel_inputs(self, spans: list[list[ImageSpan]]) -> dict[str, Any]:
        return {"pixel_values": torch.stack([sp.pixels for sample in spans for sp in sample])}

    def token_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token_type_ids": (ids == IMAGE).long()}
