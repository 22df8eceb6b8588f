"""Module size of the demo, eval, data and tiny-family code, and the import paths their users rely on."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "himap_vlm"
MAX_LINES = 500
AREAS = ["apps/demo", "apps/eval", "apps/data", "apps/calibrate.py", "apps/prompting.py", "apps/integrations",
         "models/tiny_families", "apps/cli/demo.py", "apps/cli/eval.py", "apps/cli/calibrate.py"]  # fmt: skip


def _modules():
    for area in AREAS:
        path = SRC / area
        yield from sorted(path.rglob("*.py")) if path.is_dir() else [path]


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_over_500_lines(path):
    assert path.is_file()
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines; split it along a real seam"


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
