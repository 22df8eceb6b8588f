"""LLaVA-1.5 (Mistral backbone, sliding window), LLaVA-NeXT (anyres) and LLaVA-OneVision."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from himap_vlm.core import contract

from .base import (
    BOS,
    EOS,
    IMAGE,
    IMAGE_MARKER,
    PAD,
    VIDEO,
    VOCAB_SIZE,
    ImageSpan,
    TinyFamily,
    _llama,
    _pixels,
    _qwen2,
    word_id,
)


# ---------------------------------------------------------------------------------------------- LLaVA-1.5
class TinyLlavaSWA(TinyFamily):
    """LLaVA-1.5 class with a Mistral backbone whose every layer has a sliding window (8 tokens).

    16 image tokens per image (CLIP 8x8 px, patch 2, CLS dropped): image spans are longer than the
    window, so pruned layers must measure it on original positions.
    """

    name = "llava-mistral-swa"

    def build_model(self) -> nn.Module:
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=8, patch_size=2, projection_dim=32,
        )
        text = MistralConfig(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=96, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=8,
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
        )
        config = LlavaConfig(
            vision_config=vision, text_config=text, image_token_id=IMAGE,
            vision_feature_layer=-1, vision_feature_select_strategy="default",
        )
        return LlavaForConditionalGeneration(config)

    def image_span(self, seed: int) -> ImageSpan:
        vc = self.model.config.vision_config
        return ImageSpan([IMAGE] * (vc.image_size // vc.patch_size) ** 2, _pixels(seed, 3, 8, 8))

    def pixel_inputs(self, spans: list[list[ImageSpan]]) -> dict[str, Any]:
        return {"pixel_values": torch.stack([sp.pixels for sample in spans for sp in sample])}


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT
_ANYRES_SIZES = [(8, 16), (16, 8), (12, 14), (16, 16), (14, 9)]


class TinyLlavaNext(TinyFamily):
    """LLaVA-NeXT: anyres tiles (8x8 px, 4 tokens each) + base image, image-newline features."""

    name = "llava-next"

    def build_model(self) -> nn.Module:
        from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=8, patch_size=4, projection_dim=32,
        )
        config = LlavaNextConfig(
            vision_config=vision,
            text_config=_llama(),
            image_token_index=IMAGE,
            image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]],
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            image_seq_length=4,
        )
        return LlavaNextForConditionalGeneration(config)

    def _num_patches(self, size: tuple[int, int]) -> int:
        image_size_to_num_patches = contract.image_size_to_num_patches()

        cfg = self.model.config
        return image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)

    def image_span(self, seed: int) -> ImageSpan:
        size = _ANYRES_SIZES[seed % len(_ANYRES_SIZES)]
        px = _pixels(seed, self._num_patches(size), 3, 8, 8)
        with torch.no_grad():
            feats = self.model.model.get_image_features(px[None], torch.tensor([size])).pooler_output
        return ImageSpan([IMAGE] * int(feats[0].shape[0]), px, {"image_size": size})

    def pixel_inputs(self, spans: list[list[ImageSpan]]) -> dict[str, Any]:
        flat = [sp for sample in spans for sp in sample]
        most = max(sp.pixels.shape[0] for sp in flat)
        pv = torch.zeros(len(flat), most, *flat[0].pixels.shape[1:])
        for i, sp in enumerate(flat):
            pv[i, : sp.pixels.shape[0]] = sp.pixels
        return {"pixel_values": pv, "image_sizes": torch.tensor([sp.extra["image_size"] for sp in flat])}


class TinyLlavaOnevision(TinyLlavaNext):
    """LLaVA-OneVision: SigLIP tower, anyres for single-image samples, one tile per image otherwise."""

    name = "llava-onevision"

    def build_model(self) -> nn.Module:
        from transformers import (
            LlavaOnevisionConfig,
            LlavaOnevisionForConditionalGeneration,
            SiglipVisionConfig,
        )

        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=8, patch_size=4,
        )
        config = LlavaOnevisionConfig(
            vision_config=vision,
            text_config=_qwen2(),
            image_token_index=IMAGE,
            video_token_index=VIDEO,
            image_grid_pinpoints=[[8, 16], [16, 8], [16, 16]],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        return LlavaOnevisionForConditionalGeneration(config)

    def image_span(self, seed: int, single: bool = True) -> ImageSpan:
        size = _ANYRES_SIZES[seed % len(_ANYRES_SIZES)]
        n = self._num_patches(size) if single else 1
        px = _pixels(seed, n, 3, 8, 8)
        with torch.no_grad():
            feats = self.model.model.get_image_features(
                px[None], torch.tensor([size]), batch_num_images=torch.tensor([1 if single else 2])
            ).pooler_output
        return ImageSpan([IMAGE] * int(feats[0].shape[0]), px, {"image_size": size})

    def encode(self, prompt: str, images: list[int]) -> tuple[list[int], list[ImageSpan]]:
        # Multi-image samples are not tiled (as the processor and the model do with batch_num_images).
        single = len(images) == 1
        ids = [BOS]
        spans = []
        it = iter(images)
        for word in prompt.split():
            if word == IMAGE_MARKER:
                seed = next(it)
                key = seed if single else -1 - seed
                if key not in self._span_cache:
                    self._span_cache[key] = self.image_span(seed, single)
                sp = self._span_cache[key]
                spans.append(sp)
                ids.extend(sp.ids)
            else:
                ids.append(word_id(word))
        return ids, spans

    def pixel_inputs(self, spans: list[list[ImageSpan]]) -> dict[str, Any]:
        out = super().pixel_inputs(spans)
        out["batch_num_images"] = torch.tensor([len(s) for s in spans if s])
        return out
