"""InternVL (``InternVLForConditionalGeneration``: Qwen2 text model; 2 tiles of 4 tokens per sample)."""

from __future__ import annotations

import unittest

from transformers import InternVLConfig, InternVLForConditionalGeneration

from ..test_modeling_common import floats_tensor
from ._common import BaseVLMTester, ConformanceTest, text_config

IMG_START, IMG_END = 3, 4


class InternVLTester(BaseVLMTester):
    tiles = 2
    num_image_tokens = 2 * 4  # 8x8 px tiles, patch 2, pixel shuffle 0.5: 4 tokens per tile
    prefix = (IMG_START,)
    suffix = (IMG_END,)
    text_config = text_config("qwen2")
    vision_config = {
        "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": [8, 8], "patch_size": [2, 2],
    }

    def get_config(self):
        return InternVLConfig(
            vision_config=self.vision_config,
            text_config=self.text_config,
            image_token_id=0,
            image_seq_length=4,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )

    def pixel_inputs(self, config):
        return {"pixel_values": floats_tensor([self.batch_size * self.tiles, 3, 8, 8])}


class InternVLConformanceTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (InternVLForConditionalGeneration,)
    model_tester_class = InternVLTester
