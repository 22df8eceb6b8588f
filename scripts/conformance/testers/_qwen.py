"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL testers: ``<|vision_start|> <|image_pad|>*8 <|vision_end|>``, 3-D M-RoPE."""

from __future__ import annotations

import torch

from ..test_modeling_common import floats_tensor
from ._common import BaseVLMTester, text_config

IMAGE, VIDEO, VISION_START, VISION_END = 3, 4, 5, 6
GRID = (1, 4, 8)  # (t, h, w) in patches: 32 patches, 8 tokens after the 2x2 merge
PATCH, MERGE, TEMPORAL = 2, 2, 2
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}


def qwen_text_config(model_type: str, **extra) -> dict:
    return text_config(model_type, rope_parameters=dict(ROPE), **extra)


class QwenTester(BaseVLMTester):
    config_cls: type
    num_image_tokens = GRID[1] * GRID[2] // MERGE**2
    prefix = (VISION_START,)
    suffix = (VISION_END,)

    def get_config(self):
        return self.config_cls(
            text_config=self.text_config,
            vision_config=self.vision_config,
            image_token_id=IMAGE,
            video_token_id=VIDEO,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )

    def reserved_ids(self, config):
        return (IMAGE, VIDEO, VISION_START, VISION_END)

    def pixel_inputs(self, config):
        patches = GRID[0] * GRID[1] * GRID[2]
        return {
            "pixel_values": floats_tensor([self.batch_size * patches, 3 * TEMPORAL * PATCH**2]),
            "image_grid_thw": torch.tensor([GRID] * self.batch_size),
        }

    def token_inputs(self, ids):
        return {"mm_token_type_ids": (ids == IMAGE).int()}
