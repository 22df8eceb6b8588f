"""LLaVA-NeXT / LLaVA-OneVision testers: anyres tiles plus a base view, image-newline features in the span."""

from __future__ import annotations

import functools
import json

import torch

from ..test_modeling_common import floats_tensor
from ._common import BaseVLMTester

IMAGE_SIZE = (8, 16)  # (height, width) of every image: with the pinpoints below, two 8x8 tiles + the base view
PINPOINTS = [[8, 16], [16, 8], [16, 16]]
NUM_TILES = 3


@functools.cache
def image_tokens(base_cls: type, config_json: str) -> int:
    """Image features one IMAGE_SIZE image gives, counted by the family's own base model (once per process)."""
    config = base_cls.config_class.from_dict(json.loads(config_json))
    model = base_cls(config).eval()
    with torch.no_grad():
        feats = model.get_image_features(torch.zeros(1, NUM_TILES, 3, 8, 8), torch.tensor([IMAGE_SIZE]))
    return int(feats.pooler_output[0].shape[0])


class AnyresTester(BaseVLMTester):
    base_cls: type

    def __init__(self, parent):
        self.num_image_tokens = image_tokens(self.base_cls, self.get_config().to_json_string())
        super().__init__(parent)

    def pixel_inputs(self, config):
        return {
            "pixel_values": floats_tensor([self.batch_size, NUM_TILES, 3, 8, 8]),
            "image_sizes": torch.tensor([IMAGE_SIZE] * self.batch_size),
        }


def vision_config(model_type: str) -> dict:
    return {
        "model_type": model_type, "image_size": 8, "patch_size": 4, "hidden_size": 32, "intermediate_size": 37,
        "num_hidden_layers": 2, "num_attention_heads": 4,
    }
