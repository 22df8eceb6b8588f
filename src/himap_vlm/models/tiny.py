"""Tiny, offline LLaVA models and processors for tests, examples and the CLI.

Nothing here downloads anything: the vision tower, the text backbone and the tokenizer are
built from small configs with random weights (seeded), so that the engine can be exercised
on every backbone shape we support without the Hugging Face Hub.

These models are *random*: their answers are meaningless. They exist to check mechanics
(equivalence to dense, KV-cache consistency, batching) and to give the CLI something to run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from himap_vlm.core import contract

IMAGE_TOKEN = "<image>"

# A small closed vocabulary: enough words for prompts in tests and the README example.
_WORDS = (
    "what is in the picture image photo describe color colour shape size left right above below "
    "red green blue yellow purple orange black white gray circle square triangle star small large big "
    "how many are there a an the of on to and or yes no answer with option letter from given choices "
    "directly question user assistant system you helpful is this there one two three four five six "
    "seven eight nine zero count object objects which where does do contain contains A B C D E ? . , :"
).split()
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)


@dataclass
class TinyLlavaSpec:
    """Shape of a tiny LLaVA built by :func:`build_tiny_llava`.

    Parameters
    ----------
    backbone : {"llama", "mistral", "qwen2"}
        Text model family (all use rotary embeddings and SwiGLU MLPs).
    hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads
        Text model dimensions; ``num_kv_heads < num_heads`` gives grouped-query attention.
    image_size, patch_size
        Vision tower geometry; the image yields ``(image_size // patch_size) ** 2`` tokens.
    vision_hidden, vision_layers
        Vision tower dimensions.
    seed
        Seed of the random initialisation.
    attn_implementation
        ``"sdpa"`` (default) or ``"eager"``.
    """

    backbone: str = "llama"
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 4
    image_size: int = 24
    patch_size: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2
    seed: int = 0
    attn_implementation: str = "sdpa"
    extra_text_config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_tokenizer():
    """Build an offline word-level fast tokenizer with an ``<image>`` special token.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *_WORDS):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    for lowered in [w.lower() for w in _WORDS]:
        if lowered not in vocab:
            vocab[lowered] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    fast.padding_side = "left"
    return fast


def build_processor(image_size: int = 24, patch_size: int = 4):
    """Build an offline :class:`~transformers.LlavaProcessor` for a tiny model.

    Parameters
    ----------
    image_size, patch_size : int
        Must match the vision tower of the model.
    """
    from transformers import LlavaProcessor
    LlavaImageProcessorPil = contract.llava_image_processor_class()

    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    tokenizer = build_tokenizer()
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def _text_config(spec: TinyLlavaSpec, vocab_size: int, pad_id: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
    )
    common.update(spec.extra_text_config)
    if spec.backbone == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if spec.backbone == "mistral":
        from transformers import MistralConfig

        common.setdefault("sliding_window", None)
        return MistralConfig(**common)
    if spec.backbone == "qwen2":
        from transformers import Qwen2Config

        common.setdefault("use_sliding_window", False)
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny backbone {spec.backbone!r}; choose one of 'llama', 'mistral', 'qwen2'")


def build_tiny_llava(spec: TinyLlavaSpec | None = None, **overrides: Any):
    """Build a tiny random :class:`~transformers.LlavaForConditionalGeneration`, offline.

    Parameters
    ----------
    spec : TinyLlavaSpec, optional
        Shape of the model; keyword ``overrides`` replace its fields.

    Returns
    -------
    (model, processor)
        The model in eval mode and a matching processor.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    spec = spec or TinyLlavaSpec()
    if overrides:
        spec = TinyLlavaSpec(**{**spec.__dict__, **overrides})
    processor = build_processor(spec.image_size, spec.patch_size)
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=4,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = _text_config(spec, vocab_size=len(tok), pad_id=tok.pad_token_id)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    # Random init with a larger spread than the default so that attention is far from uniform
    # (otherwise every scoring criterion ranks image tokens almost at random).
    with torch.no_grad():
        gen = torch.Generator().manual_seed(spec.seed)
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "language_model" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.08)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = tok.bos_token_id
    model.eval()
    contract.set_attn_implementation(model, spec.attn_implementation)
    return model, processor


def example_image(size: int = 24, seed: int = 0):
    """A deterministic synthetic RGB image (coloured rectangles on a gradient).

    Returns
    -------
    PIL.Image.Image
    """
    from PIL import Image, ImageDraw

    g = torch.Generator().manual_seed(seed)
    img = Image.new("RGB", (size, size))
    px = img.load()
    for y in range(size):
        for x in range(size):
            px[x, y] = (int(255 * x / max(size - 1, 1)), int(255 * y / max(size - 1, 1)), 128)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = (int(v) for v in torch.randint(0, size - 4, (2,), generator=g))
        w, h = (int(v) for v in torch.randint(2, max(3, size // 2), (2,), generator=g))
        colour = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))
        draw.rectangle([x0, y0, min(size - 1, x0 + w), min(size - 1, y0 + h)], fill=colour)
    return img


def save_tiny_llava(out_dir: str | Path, spec: TinyLlavaSpec | None = None, **overrides: Any) -> Path:
    """Build a tiny random LLaVA and save model, processor and an example image to ``out_dir``.

    The directory loads offline with ``LlavaForConditionalGeneration.from_pretrained`` and
    ``AutoProcessor.from_pretrained`` (safetensors weights).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_llava(spec, **overrides)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    size = model.config.vision_config.image_size
    example_image(size).save(out / "example.png")
    (out / "README.md").write_text(
        "# tiny random LLaVA (himap test model)\n\n"
        "Random weights built offline by `himap tiny-model`; answers are meaningless. "
        "Use it to check mechanics and timing, not accuracy.\n\n"
        f"```json\n{json.dumps({'layers': model.config.text_config.num_hidden_layers, 'image_tokens': (size // model.config.vision_config.patch_size) ** 2}, indent=2)}\n```\n"
    )
    return out
