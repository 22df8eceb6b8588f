"""Idefics3 (``Idefics3ForConditionalGeneration``: the language model is ``model.text_model``)."""

from __future__ import annotations

import unittest

from transformers import Idefics3Config, Idefics3ForConditionalGeneration

from ._common import ConformanceTest
from ._idefics import IdeficsTester


class Idefics3Tester(IdeficsTester):
    config_cls = Idefics3Config
    vision_model_type = "idefics3_vision"


class Idefics3ConformanceTest(ConformanceTest, unittest.TestCase):
    all_model_classes = (Idefics3ForConditionalGeneration,)
    model_tester_class = Idefics3Tester
