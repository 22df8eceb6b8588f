"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``: Qwen2 text model, SigLIP tower, anyres)."""

from __future__ import annotations

import unittest

from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

from ._anyres import PINPOINTS, AnyresTester, vision_config
from ._common import ConformanceTest, text_config


class LlavaOnevisionTester(AnyresTester):
    base_cls = LlavaOnevisionModel
    text_config = text_config("qwen2")
    vision_config = vision_config("siglip_vision_model")

    def get_config(self):
        return LlavaOnevisionConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            image_token_id=0,
            video_token_id=3,
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )

    def reserved_ids(self, config):
        return (config.image_token_id, config.video_token_id)


class LlavaOnevisionConformanceTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (LlavaOnevisionForConditionalGeneration,)
    model_tester_class = LlavaOnevisionTester
