"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``: windowed-attention vision tower)."""

from __future__ import annotations

import unittest

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ._common import ConformanceTest
from ._qwen import MERGE, PATCH, TEMPORAL, QwenTester, qwen_text_config


class Qwen25VLTester(QwenTester):
    config_cls = Qwen2_5_VLConfig
    text_config = qwen_text_config("qwen2_5_vl_text")
    vision_config = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 37, "num_heads": 4, "patch_size": PATCH,
        "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL, "window_size": 8,
        "out_hidden_size": 32, "fullatt_block_indexes": [1],
    }


class Qwen25VLConformanceTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (Qwen2_5_VLForConditionalGeneration,)
    model_tester_class = Qwen25VLTester
