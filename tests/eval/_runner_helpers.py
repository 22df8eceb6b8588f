"""A tiny LLaVA and a 12-sample synthetic split on disk, built once per test session (runner and lmms tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from himap_vlm.apps.data.synthetic import SceneQAConfig, load_synthetic, write_jsonl
from himap_vlm.models.tiny import TinyLlavaSpec, save_tiny_llava

N_SAMPLES = 12
SPEC = TinyLlavaSpec(image_size=16, num_layers=4, hidden_size=32)


@dataclass
class TinyEvalEnv:
    root: Path
    model_dir: Path
    data_dir: Path
    model: Any
    processor: Any


_ENV: TinyEvalEnv | None = None


def tiny_eval_env(tmp_path_factory: Any) -> TinyEvalEnv:
    """Model folder, data folder and the loaded (model, processor), shared by the session."""
    global _ENV
    if _ENV is None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        root = tmp_path_factory.mktemp("tiny_eval")
        model_dir = save_tiny_llava(root / "tiny", SPEC)
        data_dir = root / "data"
        # grid=2: the smallest valid scene (8 px per cell) at 16 px, the tiny model's image size
        write_jsonl(load_synthetic("test", N_SAMPLES, SceneQAConfig(image_size=16, grid=2)), data_dir)
        model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
        processor = AutoProcessor.from_pretrained(model_dir)
        _ENV = TinyEvalEnv(root, model_dir, data_dir, model, processor)
    return _ENV


def single_thread():
    """Generator for a module fixture: one torch thread (generation on a tiny model on a shared CPU is
    many times faster without thread oversubscription), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
