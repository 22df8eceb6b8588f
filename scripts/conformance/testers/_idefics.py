"""Idefics3 / SmolVLM testers: one 8x8 image per sample (no splitting), scale factor 2: 4 tokens."""

from __future__ import annotations

from ..test_modeling_common import floats_tensor
from ._common import PAD_ID, BaseVLMTester, text_config

FAKE_AROUND, GLOBAL_IMG = 3, 4


class IdeficsTester(BaseVLMTester):
    config_cls: type
    vision_model_type: str
    num_image_tokens = 4
    prefix = (FAKE_AROUND, GLOBAL_IMG)
    suffix = (FAKE_AROUND,)
    text_config = text_config("llama")

    def get_config(self):
        vision = {
            "model_type": self.vision_model_type, "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 8, "patch_size": 2,
        }
        return self.config_cls(
            vision_config=vision, text_config=self.text_config, image_token_id=0, scale_factor=2, pad_token_id=PAD_ID
        )

    def pixel_inputs(self, config):
        return {"pixel_values": floats_tensor([self.batch_size, 1, 3, 8, 8])}
