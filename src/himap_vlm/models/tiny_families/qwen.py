"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (multimodal RoPE, ``image_grid_thw``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from himap_vlm.core import contract

from .base import (
    BOS,
    EOS,
    IMAGE,
    PAD,
    VIDEO,
    VISION_END,
    VISION_START,
    VOCAB_SIZE,
    ImageSpan,
    TinyFamily,
    _pixels,
)

# ---------------------------------------------------------------------------------------------- Qwen-VL
_QWEN_GRIDS = [(4, 4), (4, 6), (6, 4), (6, 6), (4, 8)]  # (h, w) in patches; tokens = h * w / 4


class TinyQwen2VL(TinyFamily):
    """Qwen2-VL: ``<|vision_start|> <|image_pad|>*N <|vision_end|>``, 3-D M-RoPE positions."""

    name = "qwen2-vl"

    def vision_config(self, text_hidden: int):
        Qwen2VLVisionConfig = contract.private_config_class("qwen2_vl", "Qwen2VLVisionConfig")

        return Qwen2VLVisionConfig(
            depth=2, embed_dim=32, hidden_size=text_hidden, num_heads=4, mlp_ratio=2,
            patch_size=2, spatial_merge_size=2, temporal_patch_size=2,
        )

    def text_config_(self):
        Qwen2VLTextConfig = contract.private_config_class("qwen2_vl", "Qwen2VLTextConfig")

        return Qwen2VLTextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=96, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        )

    def config_class(self):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        return Qwen2VLConfig, Qwen2VLForConditionalGeneration

    def build_model(self) -> nn.Module:
        config_cls, model_cls = self.config_class()
        text = self.text_config_()
        config = config_cls(
            text_config=text,
            vision_config=self.vision_config(text.hidden_size),
            image_token_id=IMAGE,
            video_token_id=VIDEO,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
        return model_cls(config)

    def image_span(self, seed: int) -> ImageSpan:
        h, w = _QWEN_GRIDS[seed % len(_QWEN_GRIDS)]
        vc = self.model.config.vision_config
        dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        px = _pixels(seed, h * w, dim)
        n = h * w // vc.spatial_merge_size**2
        return ImageSpan([VISION_START] + [IMAGE] * n + [VISION_END], px, {"grid": (1, h, w)})

    def pixel_inputs(self, spans: list[list[ImageSpan]]) -> dict[str, Any]:
        flat = [sp for sample in spans for sp in sample]
        return {
            "pixel_values": torch.cat([sp.pixels for sp in flat]),
            "image_grid_thw": torch.tensor([sp.extra["grid"] for sp in flat]),
        }

    def token_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": (ids == IMAGE).int()}

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """3-D M-RoPE positions from the model's own ``get_rope_index`` (text positions for text-only)."""
        if "image_grid_thw" not in inputs:
            return super().position_ids(inputs)
        pos, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return pos


class TinyQwen25VL(TinyQwen2VL):
    """Qwen2.5-VL: as Qwen2-VL, with a windowed-attention vision tower."""

    name = "qwen2.5-vl"

    def vision_config(self, text_hidden: int):
        Qwen2_5_VLVisionConfig = contract.private_config_class("qwen2_5_vl", "Qwen2_5_VLVisionConfig")

        return Qwen2_5_VLVisionConfig(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, window_size=8, out_hidden_size=text_hidden, fullatt_block_indexes=[1],
        )

    def text_config_(self):
        Qwen2_5_VLTextConfig = contract.private_config_class("qwen2_5_vl", "Qwen2_5_VLTextConfig")

        return Qwen2_5_VLTextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=96, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        )

    def config_class(self):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration


class TinyQwen3VL(TinyQwen2VL):
    """Qwen3-VL: interleaved M-RoPE, q/k norms, DeepStack features added after decoder layers 0 and 1."""

    name = "qwen3-vl"

    def vision_config(self, text_hidden: int):
        Qwen3VLVisionConfig = contract.private_config_class("qwen3_vl", "Qwen3VLVisionConfig")

        return Qwen3VLVisionConfig(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=text_hidden, num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
        )

    def text_config_(self):
        Qwen3VLTextConfig = contract.private_config_class("qwen3_vl", "Qwen3VLTextConfig")

        return Qwen3VLTextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=512,
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2], "mrope_interleaved": True,
            },
            pad_token_id=PAD,
        )

    def config_class(self):
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        return Qwen3VLConfig, Qwen3VLForConditionalGeneration
