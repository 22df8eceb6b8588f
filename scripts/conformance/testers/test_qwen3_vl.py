"""Qwen3-VL (``Qwen3VLForConditionalGeneration``: interleaved M-RoPE, one DeepStack level).

DeepStack adds vision features after decoder layer 0, so himap may drop tokens from layer 1 on.
"""

from __future__ import annotations

import unittest

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from ._common import ConformanceTest, text_config
from ._qwen import MERGE, PATCH, ROPE, TEMPORAL, QwenTester


class Qwen3VLTester(QwenTester):
    config_cls = Qwen3VLConfig
    text_config = text_config("qwen3_vl_text", head_dim=8, rope_parameters={**ROPE, "mrope_interleaved": True})
    vision_config = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 37, "num_heads": 4, "patch_size": PATCH,
        "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL, "out_hidden_size": 32,
        "num_position_embeddings": 16, "deepstack_visual_indexes": [0],
    }


class Qwen3VLConformanceTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (Qwen3VLForConditionalGeneration,)
    model_tester_class = Qwen3VLTester
