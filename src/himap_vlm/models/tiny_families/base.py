"""What every tiny family shares: token ids, :class:`ImageSpan`, :class:`TinyFamily` and text configs."""

from __future__ import annotations

import zlib
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
def _decoder(config_class: Any, hidden: int, layers: int, heads: int, kv: int, **extra: Any):
    """A tiny decoder config of ``config_class`` on the shared test vocabulary."""
    return config_class(
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


def _llama(hidden: int = 48, layers: int = 5, heads: int = 4, kv: int = 2, **extra: Any):
    from transformers import LlamaConfig

    return _decoder(LlamaConfig, hidden, layers, heads, kv, **extra)


def _qwen2(hidden: int = 48, layers: int = 5, heads: int = 4, kv: int = 2, **extra: Any):
    from transformers import Qwen2Config

    return _decoder(Qwen2Config, hidden, layers, heads, kv, use_sliding_window=False, **extra)
