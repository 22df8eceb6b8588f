"""SmolVLM (``SmolVLMForConditionalGeneration``: the Idefics3 layout with its own classes)."""

from __future__ import annotations

import unittest

from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

from ._common import ConformanceTest
from ._idefics import IdeficsTester


class SmolVLMTester(IdeficsTester):
    config_cls = SmolVLMConfig
    vision_model_type = "smolvlm_vision"


class SmolVLMConformanceTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (SmolVLMForConditionalGeneration,)
    model_tester_class = SmolVLMTester
