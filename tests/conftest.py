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


@pytest.fixture
def scratch_registry():
    """Registrations and removals made in the test are undone afterwards."""
    from himap_vlm.core.methods.registry import restored

    with restored():
        yield


@pytest.fixture
def toy_method(scratch_registry):
    """A method registered from outside the package (alias ``toy_prune``), gone after the test."""
    from dataclasses import dataclass

    from himap_vlm.core.interface import PruneStep
    from himap_vlm.core.methods.base import PruningMethod
    from himap_vlm.core.methods.params import integer, layer
    from himap_vlm.core.methods.registry import register

    @register("toyprune", aliases=("toy_prune",))
    @dataclass(frozen=True)
    class ToyPrune(PruningMethod):
        k: int = layer(1, doc="pruning layer")
        keep: int = integer(3, minimum=0, doc="image tokens kept")

        @classmethod
        def defaults_for(cls, num_layers: int) -> dict:
            return {"k": max(1, num_layers // 2), "keep": 3}

        def steps(self) -> list[PruneStep]:
            return [PruneStep(self.k)]

        def kept_after(self, step: int, num_image: int, num_image_input: int) -> int:
            return min(num_image, self.keep)

        def select(self, x):
            return torch.arange(min(x.num_image, self.keep))

    return ToyPrune
