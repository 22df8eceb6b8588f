"""The import paths users of the demo, eval, data and tiny-family code rely on (sizes: tests/test_layout.py)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "himap_vlm"
@pytest.mark.parametrize(
    "module,names",
    [
        ("himap_vlm.apps.data.synthetic", "load_synthetic SceneQAConfig generate_questions generate_scenes render_scene "
         "score read_jsonl write_jsonl to_hf_dataset split_words VOCABULARY FAMILIES SHAPES COLORS SIZES "
         "NUMBER_WORDS LETTERS RELATIONS SPLITS SHAPE_PLURALS CHOICE_INSTRUCTION COLOR_RGB YES_NO"),
        ("himap_vlm.apps.data", "load_synthetic SceneQAConfig score read_jsonl write_jsonl"),
        ("himap_vlm.apps.demo", "run_demo demo_configurations configuration_rule synthetic_samples plot_demo "
         "DemoConfig DemoResult DemoRow DEFAULT_N DEFAULT_BATCH_SIZE DEFAULT_MAX_NEW_TOKENS "
         "DEFAULT_TIMING_SAMPLES DEFAULT_TIMING_REPEATS"),
        ("himap_vlm.apps.eval.runner", "evaluate finalize model_label read_predictions ConfigResult EvalResults "
         "PREDICTIONS flops_ratios prompt_layouts"),
        ("himap_vlm.apps.eval", "evaluate finalize ConfigResult EvalResults get_task Sample Task"),
        ("himap_vlm.models.tiny_families", "FAMILY_BUILDERS TinyFamily build_tiny_family word_id ImageSpan IMAGE "
         "VOCAB_SIZE PAD BOS EOS FIRST_WORD IMAGE_MARKER TinyLlavaSWA TinyQwen2VL TinyGemma3"),
    ],  # fmt: skip
)
def test_public_import_paths_still_work(module, names):
    mod = importlib.import_module(module)
    missing = [n for n in names.split() if not hasattr(mod, n)]
    assert not missing, f"{module} lost {missing}"
