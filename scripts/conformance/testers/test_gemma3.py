"""Gemma3 (``Gemma3ForConditionalGeneration``: bidirectional image blocks, a sliding and a full layer)."""

from __future__ import annotations

import unittest

from transformers import Gemma3Config, Gemma3ForConditionalGeneration

from ..test_modeling_common import floats_tensor
from ._common import BaseVLMTester, ConformanceTest, text_config

BOI, EOI, IMAGE = 3, 4, 5


class Gemma3Tester(BaseVLMTester):
    num_image_tokens = 9  # SigLIP 12x12 px, patch 2 (36 patches), pooled to 9
    prefix = (BOI,)
    suffix = (EOI,)
    text_config = text_config(
        "gemma3_text", head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    )
    vision_config = {
        "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 37,
        "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 12, "patch_size": 2,
    }

    def get_config(self):
        return Gemma3Config(
            text_config=self.text_config,
            vision_config=self.vision_config,
            mm_tokens_per_image=self.num_image_tokens,
            boi_token_index=BOI,
            eoi_token_index=EOI,
            image_token_index=IMAGE,
        )

    def pixel_inputs(self, config):
        return {"pixel_values": floats_tensor([self.batch_size, 3, 12, 12])}

    def token_inputs(self, ids):
        return {"token_type_ids": (ids == IMAGE).long()}


class Gemma3ConformanceTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (Gemma3ForConditionalGeneration,)
    model_tester_class = Gemma3Tester
