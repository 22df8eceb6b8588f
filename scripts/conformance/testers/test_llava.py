"""LLaVA-1.5 (``LlavaForConditionalGeneration``: Llama text model, CLIP vision tower, 16 image tokens)."""

from __future__ import annotations

import unittest

from transformers import LlavaConfig, LlavaForConditionalGeneration

from ..test_modeling_common import floats_tensor
from ._common import BaseVLMTester, ConformanceTest, text_config


class LlavaTester(BaseVLMTester):
    num_image_tokens = (8 // 2) ** 2  # CLIP 8x8 px, patch 2; the "default" strategy drops CLS
    text_config = text_config("llama", num_key_value_heads=4, hidden_act="gelu")
    vision_config = {
        "image_size": 8, "patch_size": 2, "num_channels": 3, "hidden_size": 32, "projection_dim": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
    }

    def get_config(self):
        return LlavaConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            image_token_id=0,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            image_seq_length=self.num_image_tokens,
        )

    def pixel_inputs(self, config):
        return {"pixel_values": floats_tensor([self.batch_size, 3, 8, 8])}


class LlavaConformanceTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (LlavaForConditionalGeneration,)
    model_tester_class = LlavaTester
