"""Tiny, offline models of every supported family, and inputs built directly as tensors.

Each builder makes a small random model of one transformers v5 class (hidden size 32-64, 4-6
decoder layers, a handful of image tokens per image) from a config, offline, and turns prompts
with ``<image>`` markers into the tensors that class expects. Processors are bypassed on purpose:
several families need image processors (anyres tiling, Qwen2-VL ``image_grid_thw``, Idefics3
image splitting) that would make the tests slow or depend on optional packages. Instead:

* the image span of every family is written out the way its processor writes it (marker tokens,
  row/column tokens, image-newline features counted inside the span, ...);
* the number of placeholder tokens per image is taken from what the model itself produces for the
  pixel tensors (or from the config where it is fixed), and the model checks it again in its own
  forward (it raises when placeholders and image features do not match).

Text words map to fixed ids (CRC32 of the word), so a prompt gives the same ids in a batch and
alone. Images are integer seeds: a seed fixes the pixel values and, for families with a variable
number of tokens per image, the geometry (size, grid, tiles).

These models are random; they check mechanics, not accuracy.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from himap_vlm.core import contract

VOCAB_SIZE = 160
PAD, BOS, EOS = 0, 1, 2
IMAGE = 3  # the image placeholder id of every tiny family
BOI, EOI = 4, 5  # Gemma3 start/end of image
VISION_START, VISION_END = 6, 7  # Qwen-VL
FAKE_AROUND, GLOBAL_IMG = 8, 9  # Idefics3 / SmolVLM
NEWLINE, DOUBLE_NEWLINE = 10, 11
IMG_START, IMG_END = 12, 13  # InternVL <img> </img>
VIDEO = 14
ROW_COL_BASE = 16  # Idefics3 <row_r_col_c>: 16 + 4 * (r - 1) + (c - 1), r, c <= 4
FIRST_WORD = 40

IMAGE_MARKER = "<image>"


def word_id(word: str) -> int:
    """The fixed token id of a text word (CRC32, so stable across processes)."""
    return FIRST_WORD + zlib.crc32(word.encode()) % (VOCAB_SIZE - FIRST_WORD)


def _pixels(seed: int, *shape: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(*shape, generator=gen)


@dataclass
class ImageSpan:
    """One image inside a prompt: its token ids and what the vision side needs."""

    ids: list[int]
    pixels: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


class TinyFamily:
    """A tiny random model of one family plus an input builder.

    Attributes
    ----------
    name : str
        Short family id (test parameter id).
    model : nn.Module
        The model, in eval mode, with the requested attention implementation.
    """

    name = "family"
    #: Attention implementations this family is tested with.
    kernels: tuple[str, ...] = ("sdpa", "eager")

    def __init__(self, attn: str = "sdpa", seed: int = 0):
        self.attn = attn
        self.seed = seed
        torch.manual_seed(seed)
        self.model = self.build_model()
        self._spread_init()
        self.model.eval()
        contract.set_attn_implementation(self.model, attn)
        gen_cfg = self.model.generation_config
        gen_cfg.pad_token_id = PAD
        gen_cfg.eos_token_id = None
        gen_cfg.bos_token_id = BOS
        # Never generate markers or placeholders (a generated image id would count as an image token).
        gen_cfg.suppress_tokens = list(range(FIRST_WORD))
        self._span_cache: dict[int, ImageSpan] = {}

    # ------------------------------------------------------------------ per family
    def build_model(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_span(self, seed: int) -> ImageSpan:  # pragma: no cover - abstract
        raise NotImplementedError

    def pixel_inputs(self, spans: list[list[ImageSpan]]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-token inputs derived from ``input_ids`` (e.g. token type ids)."""
        return {}

    # ------------------------------------------------------------------ shared
    @property
    def decoder(self) -> nn.Module:
        from himap_vlm.core.families import resolve_family

        return resolve_family(self.model).decoder(self.model)

    @property
    def text_config(self) -> Any:
        from himap_vlm.core.families import resolve_family

        return resolve_family(self.model).text_config(self.model)

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def image_token_id(self) -> int:
        from himap_vlm.core.families import resolve_family

        return resolve_family(self.model).image_token_id(self.model.config)

    def _spread_init(self) -> None:
        # Larger spread than the default init so that attention is far from uniform.
        gen = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            for p in self.decoder.parameters():
                if p.dim() >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.08)

    def span(self, seed: int) -> ImageSpan:
        if seed not in self._span_cache:
            self._span_cache[seed] = self.image_span(seed)
        return self._span_cache[seed]

    def encode(self, prompt: str, images: list[int]) -> tuple[list[int], list[ImageSpan]]:
        """Token ids of one prompt, ``<image>`` markers replaced by the image spans of ``images``."""
        ids = [BOS]
        spans = []
        it = iter(images)
        for word in prompt.split():
            if word == IMAGE_MARKER:
                sp = self.span(next(it))
                spans.append(sp)
                ids.extend(sp.ids)
            else:
                ids.append(word_id(word))
        if next(it, None) is not None:
            raise ValueError("more images than <image> markers in the prompt")
        return ids, spans

    def inputs(
        self, prompts: list[str], images: list[list[int]] | None = None, padding_side: str = "left"
    ) -> dict[str, torch.Tensor]:
        """Model inputs for a batch: padded ``input_ids``, ``attention_mask`` and the pixel inputs.

        Parameters
        ----------
        prompts : list of str
            Whitespace-separated words; ``<image>`` marks where an image goes.
        images : list of list of int, optional
            Per prompt, the image seeds, one per ``<image>`` marker.
        padding_side : {"left", "right"}
        """
        images = images or [[] for _ in prompts]
        encoded = [self.encode(p, im) for p, im in zip(prompts, images, strict=True)]
        width = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, (ids, _) in enumerate(encoded):
            n = len(ids)
            sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
            input_ids[i, sl] = torch.tensor(ids)
            mask[i, sl] = 1
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        out.update(self.token_inputs(input_ids))
        spans = [sp for _, sp in encoded]
        if any(spans):
            out.update(self.pixel_inputs(spans))
        return out

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Position ids of ``inputs`` (padded), as the model computes them for a prefill."""
        mask = inputs["attention_mask"].bool()
        return (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)

    def extend_inputs(self, inputs: dict[str, torch.Tensor], generated: torch.Tensor) -> dict[str, torch.Tensor]:
        """``inputs`` with generated (text) tokens appended, for a full-length reference forward."""
        out = dict(inputs)
        if generated.shape[1] == 0:
            return out
        out["input_ids"] = torch.cat([inputs["input_ids"], generated], dim=1)
        out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(generated)], dim=1)
        out.update(self.token_inputs(out["input_ids"]))
        return out


# ---------------------------------------------------------------------------------------------- configs
def _llama(hidden: int = 48, layers: int = 5, heads: int = 4, kv: int = 2, **extra: Any):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=False,
        **extra,
    )


def _qwen2(hidden: int = 48, layers: int = 5, heads: int = 4, kv: int = 2, **extra: Any):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=512,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        use_sliding_window=False,
        tie_word_embeddings=False,
        **extra,
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


# ---------------------------------------------------------------------------------------------- Qwen-VL
_QWEN_GRIDS = [(4, 4), (4, 6), (6, 4), (6, 6), (4, 8)]  # (h, w) in patches; tokens = h * w / 4


class TinyQwen2VL(TinyFamily):
    """Qwen2-VL: ``<|vision_start|> <|image_pad|>*N <|vision_end|>``, 3-D M-RoPE positions."""

    name = "qwen2-vl"

    def vision_config(self, text_hidden: int):
        Qwen2VLVisionConfig = contract.private_config_class("qwen2_vl", "Qwen2VLVisionConfig")

        return Qwen2VLVisionConfig(
            depth=2, embed_dim=32, hidden_size=text_hidden, num_heads=4, mlp_ratio=2,
            patch_size=2, spatial_merge_size=2, temporal_patch_size=2,
        )

    def text_config_(self):
        Qwen2VLTextConfig = contract.private_config_class("qwen2_vl", "Qwen2VLTextConfig")

        return Qwen2VLTextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=96, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        )

    def config_class(self):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        return Qwen2VLConfig, Qwen2VLForConditionalGeneration

    def build_model(self) -> nn.Module:
        config_cls, model_cls = self.config_class()
        text = self.text_config_()
        config = config_cls(
            text_config=text,
            vision_config=self.vision_config(text.hidden_size),
            image_token_id=IMAGE,
            video_token_id=VIDEO,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
        return model_cls(config)

    def image_span(self, seed: int) -> ImageSpan:
        h, w = _QWEN_GRIDS[seed % len(_QWEN_GRIDS)]
        vc = self.model.config.vision_config
        dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        px = _pixels(seed, h * w, dim)
        n = h * w // vc.spatial_merge_size**2
        return ImageSpan([VISION_START] + [IMAGE] * n + [VISION_END], px, {"grid": (1, h, w)})

    def pixel_inputs(self, spans: list[list[ImageSpan]]) -> dict[str, Any]:
        flat = [sp for sample in spans for sp in sample]
        return {
            "pixel_values": torch.cat([sp.pixels for sp in flat]),
            "image_grid_thw": torch.tensor([sp.extra["grid"] for sp in flat]),
        }

    def token_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mm_token_type_ids": (ids == IMAGE).int()}

    def position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """3-D M-RoPE positions from the model's own ``get_rope_index`` (text positions for text-only)."""
        if "image_grid_thw" not in inputs:
            return super().position_ids(inputs)
        pos, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        return pos


class TinyQwen25VL(TinyQwen2VL):
    """Qwen2.5-VL: as Qwen2-VL, with a windowed-attention vision tower."""

    name = "qwen2.5-vl"

    def vision_config(self, text_hidden: int):
        Qwen2_5_VLVisionConfig = contract.private_config_class("qwen2_5_vl", "Qwen2_5_VLVisionConfig")

        return Qwen2_5_VLVisionConfig(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, window_size=8, out_hidden_size=text_hidden, fullatt_block_indexes=[1],
        )

    def text_config_(self):
        Qwen2_5_VLTextConfig = contract.private_config_class("qwen2_5_vl", "Qwen2_5_VLTextConfig")

        return Qwen2_5_VLTextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=96, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        )

    def config_class(self):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration


class TinyQwen3VL(TinyQwen2VL):
    """Qwen3-VL: interleaved M-RoPE, q/k norms, DeepStack features added after decoder layers 0 and 1."""

    name = "qwen3-vl"

    def vision_config(self, text_hidden: int):
        Qwen3VLVisionConfig = contract.private_config_class("qwen3_vl", "Qwen3VLVisionConfig")

        return Qwen3VLVisionConfig(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=2, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=text_hidden, num_position_embeddings=16,
            deepstack_visual_indexes=[0, 1],
        )

    def text_config_(self):
        Qwen3VLTextConfig = contract.private_config_class("qwen3_vl", "Qwen3VLTextConfig")

        return Qwen3VLTextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=512,
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2], "mrope_interleaved": True,
            },
            pad_token_id=PAD,
        )

    def config_class(self):
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        return Qwen3VLConfig, Qwen3VLForConditionalGeneration


# ---------------------------------------------------------------------------------------------- InternVL
class TinyInternVL(TinyFamily):
    """InternVL: ``<img> <IMG_CONTEXT>*N </img>``; 1-3 tiles of 4 tokens per image (pixel shuffle)."""

    name = "internvl"

    def build_model(self) -> nn.Module:
        from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

        vision = InternVLVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=[8, 8], patch_size=[2, 2],
        )
        config = InternVLConfig(
            vision_config=vision,
            text_config=_qwen2(),
            image_token_id=IMAGE,
            image_seq_length=4,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
        return InternVLForConditionalGeneration(config)

    def image_span(self, seed: int) -> ImageSpan:
        tiles = 1 + seed % 3
        px = _pixels(seed, tiles, 3, 8, 8)
        n = tiles * int(self.model.config.image_seq_length)
        return ImageSpan([IMG_START] + [IMAGE] * n + [IMG_END], px)

    def pixel_inputs(self, spans: list[list[ImageSpan]]) -> dict[str, Any]:
        return {"pixel_values": torch.cat([sp.pixels for sample in spans for sp in sample])}


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


# ---------------------------------------------------------------------------------------------- Gemma3
class TinyGemma3(TinyFamily):
    """Gemma3: ``\\n\\n <start_of_image> <image>*9 <end_of_image> \\n\\n``; sliding (window 8) and full layers.

    Image tokens attend bidirectionally within their image (``token_type_ids``). The window (8) is
    shorter than an image span plus its neighbours, so both the window and the blocks matter.
    """

    name = "gemma3"

    def build_model(self) -> nn.Module:
        from transformers import (
            Gemma3Config,
            Gemma3ForConditionalGeneration,
            Gemma3TextConfig,
            SiglipVisionConfig,
        )

        vision = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=12, patch_size=2,
        )
        text = Gemma3TextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=12,
            sliding_window=8, max_position_embeddings=512,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        )
        config = Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=9,
            boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE, tie_word_embeddings=False,
        )
        model = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():
            proj = model.model.multi_modal_projector.mm_input_projection_weight
            if not proj.abs().sum():
                gen = torch.Generator().manual_seed(self.seed)
                proj.copy_(torch.randn(proj.shape, generator=gen) * 0.2)
        return model

    def image_span(self, seed: int) -> ImageSpan:
        n = int(self.model.config.mm_tokens_per_image)
        px = _pixels(seed, 3, 12, 12)
        return ImageSpan([DOUBLE_NEWLINE, BOI] + [IMAGE] * n + [EOI, DOUBLE_NEWLINE], px)

    def pixel_inputs(self, spans: list[list[ImageSpan]]) -> dict[str, Any]:
        return {"pixel_values": torch.stack([sp.pixels for sample in spans for sp in sample])}

    def token_inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"token_type_ids": (ids == IMAGE).long()}


FAMILY_BUILDERS: dict[str, Callable[..., TinyFamily]] = {
    cls.name: cls
    for cls in (
        TinyLlavaSWA,
        TinyLlavaNext,
        TinyLlavaOnevision,
        TinyQwen2VL,
        TinyQwen25VL,
        TinyQwen3VL,
        TinyInternVL,
        TinyIdefics3,
        TinySmolVLM,
        TinyGemma3,
    )
}


def build_tiny_family(name: str, attn: str = "sdpa", seed: int = 0) -> TinyFamily:
    """Build the tiny model of family ``name`` (a key of :data:`FAMILY_BUILDERS`), offline."""
    if name not in FAMILY_BUILDERS:
        raise ValueError(f"unknown tiny family {name!r}; choose one of {', '.join(sorted(FAMILY_BUILDERS))}")
    return FAMILY_BUILDERS[name](attn=attn, seed=seed)
