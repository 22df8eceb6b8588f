"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``: Llama text model, CLIP tower, anyres)."""

from __future__ import annotations

import unittest

from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextModel

from ._anyres import PINPOINTS, AnyresTester, vision_config
from ._common import ConformanceTest, text_config


class LlavaNextTester(AnyresTester):
    base_cls = LlavaNextModel
    text_config = text_config("llama")
    vision_config = vision_config("clip_vision_model")

    def get_config(self):
        return LlavaNextConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            image_token_id=0,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            image_seq_length=4,
        )


class LlavaNextConformanceTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (LlavaNextForConditionalGeneration,)
    model_tester_class = LlavaNextTester
