"""Random-weight LLaVAs of any shape for benchmarks, built directly on the device that runs them.

``himap bench --tiny`` times a random LLaVA (:func:`himap_vlm.models.tiny.build_tiny_llava`'s
architecture and processor). On the CPU it is that very model (the same seeded weights). At a
real model's shape on a GPU — LLaVA-1.5-7B's language model has 6.5 B parameters — building it
on the CPU in float32 and copying it over costs minutes and 26 GB of host memory, so
:func:`build_random_llava` instantiates the same configuration directly on the device in the
benchmark's dtype and draws its weights there. Timing does not depend on the weights' values, only
on the shapes; the distribution matches (``N(0, 0.08)`` for the language model's matrices).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from himap_vlm.core import contract
from himap_vlm.models.tiny import IMAGE_TOKEN, TinyLlavaSpec, build_processor, build_tiny_llava

__all__ = ["build_random_llava", "random_llava_config"]


def random_llava_config(spec: TinyLlavaSpec, processor: Any | None = None) -> Any:
    """The ``LlavaConfig`` :func:`~himap_vlm.models.tiny.build_tiny_llava` builds for ``spec``.

    Built without instantiating a model (``tests/test_bench.py`` checks it equals the config of
    the model ``build_tiny_llava`` returns).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig, Qwen2Config

    processor = processor or build_processor(spec.image_size, spec.patch_size)
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
    common: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **spec.extra_text_config,
    )
    backbones = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    if spec.backbone not in backbones:
        raise ValueError(f"unknown backbone {spec.backbone!r}; choose one of {', '.join(backbones)}")
    if spec.backbone == "mistral":
        common.setdefault("sliding_window", None)
    if spec.backbone == "qwen2":
        common.setdefault("use_sliding_window", False)
    config = LlavaConfig(
        vision_config=vision,
        text_config=backbones[spec.backbone](**common),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tok.pad_token_id
    return config


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random_llava(
    spec: TinyLlavaSpec,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    on_device: bool | None = None,
) -> tuple[Any, Any]:
    """A random LLaVA of shape ``spec`` on ``device`` in ``dtype``, and its processor.

    Parameters
    ----------
    spec : TinyLlavaSpec
        Shape, seed and attention implementation.
    device : str or torch.device
        ``"cpu"``: :func:`~himap_vlm.models.tiny.build_tiny_llava` (same weights), cast to
        ``dtype``. Any other device: the same configuration instantiated there in ``dtype``, with
        weights drawn on the device from a generator seeded with ``spec.seed``.
    dtype : torch.dtype
    on_device : bool, optional
        Force the on-device construction (``True``) or the CPU one (``False``); default: on the
        device unless it is the CPU.

    Returns
    -------
    (model, processor)
        The model in eval mode on ``device``.
    """
    device = torch.device(device)
    if not (device.type != "cpu" if on_device is None else on_device):
        model, processor = build_tiny_llava(spec)
        return model.to(dtype), processor
    from transformers import LlavaForConditionalGeneration

    processor = build_processor(spec.image_size, spec.patch_size)
    config = random_llava_config(spec, processor)
    torch.manual_seed(spec.seed)
    with _default_dtype(dtype), torch.device(device):
        model = LlavaForConditionalGeneration(config)
    gen = torch.Generator(device=device).manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "language_model" in name:
                p.normal_(0.0, 0.08, generator=gen)
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = tok.bos_token_id
    model.eval()
    contract.set_attn_implementation(model, spec.attn_implementation)
    return model, processor
