"""Qwen2-VL (``Qwen2VLForConditionalGeneration``)."""

from __future__ import annotations

import unittest

from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from ._common import ConformanceTest
from ._qwen import MERGE, PATCH, TEMPORAL, QwenTester, qwen_text_config


class Qwen2VLTester(QwenTester):
    config_cls = Qwen2VLConfig
    text_config = qwen_text_config("qwen2_vl_text")
    vision_config = {
        "depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2,
        "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL,
    }


class Qwen2VLConformanceTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (Qwen2VLForConditionalGeneration,)
    model_tester_class = Qwen2VLTester
