"""Shared fixtures: tiny offline LLaVA models (several backbones and shapes) and inputs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models are dominated by threading overhead: one thread is faster and deterministic.
torch.set_num_threads(1)

from himap_vlm.models.tiny import TinyLlavaSpec, build_tiny_llava, example_image  # noqa: E402

# Several shapes: MHA and GQA, three backbones, different depths and image grids.
SPECS = {
    "llama-mha": TinyLlavaSpec(backbone="llama", num_layers=6, num_heads=4, num_kv_heads=4, seed=0),
    "mistral-gqa": TinyLlavaSpec(backbone="mistral", num_layers=5, num_heads=4, num_kv_heads=2, seed=1, image_size=20),
    "qwen2-gqa": TinyLlavaSpec(
        backbone="qwen2", num_layers=6, hidden_size=48, num_heads=6, num_kv_heads=2, intermediate_size=96, seed=2
    ),
}

_CACHE: dict[tuple, tuple] = {}


def tiny(name: str, attn: str = "sdpa"):
    """A cached (model, processor) pair; ``attn`` picks the attention implementation."""
    key = (name, attn)
    if key not in _CACHE:
        spec = SPECS[name]
        _CACHE[key] = build_tiny_llava(TinyLlavaSpec(**{**spec.__dict__, "attn_implementation": attn}))
    return _CACHE[key]


@pytest.fixture(params=sorted(SPECS))
def family_model(request):
    model, proc = tiny(request.param)
    return request.param, model, proc


def make_inputs(proc, prompts: list[str], images: list, padding_side: str = "left"):
    proc.tokenizer.padding_side = padding_side
    try:
        return proc(images=images, text=prompts, return_tensors="pt", padding=True)
    finally:
        proc.tokenizer.padding_side = "left"


def image_for(model, seed: int):
    return example_image(model.config.vision_config.image_size, seed)


PROMPTS = [
    "user : <image> what is in the picture ? answer with one word . assistant :",
    "<image> describe the image",
    "system : you are helpful . user : how many objects ? <image> count them . assistant :",
]


@pytest.fixture
def batch_inputs():
    def _make(model, proc, n: int = 2, padding_side: str = "left", prompts=None):
        prompts = prompts or PROMPTS[:n]
        images = [image_for(model, i) for i in range(len(prompts) * 4)]
        per = [images[i * 4 : i * 4 + p.count("<image>")] for i, p in enumerate(prompts)]
        return make_inputs(proc, prompts, per, padding_side)

    return _make
