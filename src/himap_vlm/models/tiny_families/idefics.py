"""Idefics3 and SmolVLM (image splitting into tiles, row/column tokens)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from himap_vlm.core import contract

from .base import (
    FAKE_AROUND,
    GLOBAL_IMG,
    IMAGE,
    NEWLINE,
    PAD,
    ROW_COL_BASE,
    ImageSpan,
    TinyFamily,
    _llama,
    _pixels,
)

# ---------------------------------------------------------------------------------------------- Idefics3
_SPLITS = [(0, 0), (1, 2), (2, 1), (2, 2)]


class TinyIdefics3(TinyFamily):
    """Idefics3: image splitting into row/column tiles + a global image, marker tokens around each."""

    name = "idefics3"

    def build_model(self) -> nn.Module:
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration
        Idefics3VisionConfig = contract.private_config_class("idefics3", "Idefics3VisionConfig")

        vision = Idefics3VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=8, patch_size=2,
        )
        config = Idefics3Config(
            vision_config=vision, text_config=_llama(), image_token_id=IMAGE, scale_factor=2, pad_token_id=PAD
        )
        return Idefics3ForConditionalGeneration(config)

    @property
    def tokens_per_tile(self) -> int:
        vc = self.model.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2 // self.model.config.scale_factor**2

    def image_span(self, seed: int) -> ImageSpan:
        rows, cols = _SPLITS[seed % len(_SPLITS)]
        n = self.tokens_per_tile
        ids: list[int] = []
        for r in range(rows):
            for c in range(cols):
                ids += [FAKE_AROUND, ROW_COL_BASE + 4 * r + c] + [IMAGE] * n
            ids.append(NEWLINE)
        if rows:
            ids.append(NEWLINE)
        ids += [FAKE_AROUND, GLOBAL_IMG] + [IMAGE] * n + [FAKE_AROUND]
        px = _pixels(seed, rows * cols + 1, 3, 8, 8)
        return ImageSpan(ids, px)

    def pixel_inputs(self, spans: list[list[ImageSpan]]) -> dict[str, Any]:
        per = [torch.cat([sp.pixels for sp in sample]) if sample else None for sample in spans]
        most = max(p.shape[0] for p in per if p is not None)
        pv = torch.zeros(len(spans), most, 3, 8, 8)
        for i, p in enumerate(per):
            if p is not None:
                pv[i, : p.shape[0]] = p
        return {"pixel_values": pv}


class TinySmolVLM(TinyIdefics3):
    """SmolVLM: the Idefics3 layout with its own classes."""

    name = "smolvlm"

    def build_model(self) -> nn.Module:
        from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
        SmolVLMVisionConfig = contract.private_config_class("smolvlm", "SmolVLMVisionConfig")

        vision = SmolVLMVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=8, patch_size=2,
        )
        config = SmolVLMConfig(
            vision_config=vision, text_config=_llama(), image_token_id=IMAGE, scale_factor=2, pad_token_id=PAD
        )
        return SmolVLMForConditionalGeneration(config)
