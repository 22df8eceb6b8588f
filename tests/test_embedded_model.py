"""The embedded tiny trained LLaVA (``src/himap_vlm/assets/tiny_llava``), when this build ships it.

Skipped, with the reason, in a build without the model. The benchmark it is evaluated on is
checked in ``tests/test_synthetic.py``: the generator is deterministic per seed
(``test_same_seed_gives_identical_records``, ``test_prefix_property_and_scene_determinism``)
and splits never share a scene (``test_splits_never_share_a_scene``), so the questions below
were never seen in training.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from himap_vlm import FastV, HiMAP, RandomPrune, assets

torch.set_num_threads(1)

PATH = assets.tiny_llava_path()
pytestmark = pytest.mark.skipif(
    not assets.has_tiny_llava(PATH),
    reason=f"the embedded model is not shipped in this build ({PATH} does not exist); "
    "train one with scripts/train_tiny_llava.py and copy it there",
)

N_ACCURACY = 200
MIN_DENSE_ACCURACY = 90.0


@pytest.fixture(scope="module")
def loaded():
    """The model and processor, loaded with the plain transformers classes (offline)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(PATH).eval()
    processor = AutoProcessor.from_pretrained(PATH)
    return model, processor


def test_files_are_small_and_documented():
    weights = PATH / "model.safetensors"
    assert weights.is_file()
    assert weights.stat().st_size <= 25 * 2**20
    assert sum(p.stat().st_size for p in PATH.iterdir() if p.is_file()) <= 26 * 2**20
    assert (PATH / "README.md").is_file(), "the model card ships as README.md next to the weights"


def test_loads_offline_with_stock_classes(loaded):
    from himap_vlm.core.families import resolve_family
    from himap_vlm.models.tiny_llava import TrainedTinyLlavaSpec, format_prompt

    model, processor = loaded
    spec = TrainedTinyLlavaSpec()
    text = model.config.text_config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert text.num_hidden_layers == spec.num_layers and text.hidden_size == spec.hidden_size
    assert model.config.vision_config.image_size == spec.image_size
    resolve_family(model)  # a supported family
    question = "Is there a red circle in the image?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == format_prompt(question)
    from himap_vlm.apps.data.synthetic import SceneQAConfig, load_synthetic

    image = load_synthetic("test", 1, SceneQAConfig(image_size=spec.image_size))[0]["image"]
    enc = processor(images=[image], text=[prompt], return_tensors="pt")
    image_id = model.config.image_token_id
    assert int((enc["input_ids"] == image_id).sum()) == spec.num_image_tokens


def test_dense_accuracy_on_held_out_questions(loaded, tmp_path):
    from himap_vlm.apps.demo import synthetic_samples
    from himap_vlm.apps.eval.runner import evaluate

    model, processor = loaded
    samples = synthetic_samples(N_ACCURACY, model.config.vision_config.image_size)
    assert all(s.id.startswith("test") for s in samples), samples[0].id
    t0 = time.perf_counter()
    results = evaluate(
        model, processor, "synthetic", samples, "dense", tmp_path, batch_size=32, max_new_tokens=3
    )
    seconds = time.perf_counter() - t0
    dense = results.configs[0]
    assert dense.n_samples == N_ACCURACY
    detail = {k: round(v, 1) for k, v in dense.metrics.items() if k.startswith("accuracy")}
    assert dense.score is not None and dense.score >= MIN_DENSE_ACCURACY, detail
    assert seconds < 120, f"{seconds:.0f} s for {N_ACCURACY} questions"


@pytest.mark.parametrize(
    "make",
    [
        lambda: FastV(k=2, r=0.0),
        lambda: HiMAP(k1=2, r1=0.0, k2=4, r2=0.0),
        lambda: RandomPrune(k=1, r=0.0, seed=3),
    ],
    ids=["fastv", "himap", "random"],
)
def test_method_that_prunes_nothing_equals_dense(loaded, make):
    """Hooks installed but every image token kept: same logits and same greedy answers as dense."""
    from himap_vlm.apps.data.synthetic import SceneQAConfig, load_synthetic
    from himap_vlm.models.tiny_llava import TrainedTinyLlavaSpec, format_prompt

    model, processor = loaded
    records = load_synthetic("test", 24, SceneQAConfig(image_size=model.config.vision_config.image_size))
    enc = processor(
        images=[r["image"] for r in records],
        text=[format_prompt(r["question"]) for r in records],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        dense_logits = model(**enc).logits
        dense_out = model.generate(**enc, max_new_tokens=3, do_sample=False)
        with make()(model) as run:
            logits = model(**enc).logits
            out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(logits, dense_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(out, dense_out)
    image_tokens = TrainedTinyLlavaSpec().num_image_tokens
    assert all(n == image_tokens for layer in run.image_tokens_per_layer for n in layer)


def test_demo_runs_on_the_embedded_model_by_default(tmp_path):
    from typer.testing import CliRunner

    from himap_vlm.apps.cli import _load_commands, app

    _load_commands()
    res = CliRunner().invoke(
        app,
        ["demo", "--out", str(tmp_path), "--n", "20", "--methods", "dense,himap", "--no-progress",
         "--timing-samples", "2", "--timing-repeats", "1"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["model"]["embedded"] is True and data["model"]["label"] == "tiny_llava"
    assert [r["method"] for r in data["rows"]] == ["dense", "himap", "himap", "himap"]
    assert (tmp_path / "demo.png").is_file()


def _cli(args):
    from typer.testing import CliRunner

    from himap_vlm.apps.cli import _load_commands, app

    _load_commands()
    return CliRunner().invoke(app, args)


def test_eval_on_the_shipped_model_reproduces_the_demo(tmp_path):
    """``himap eval --task synthetic --model tiny-llava`` asks the demo's questions the way the model
    was trained to read them: the same answers, the same dense accuracy. (With the task's short-answer
    instruction appended, which the model's tokenizer cannot spell, eval scored 21.0 % on the demo's
    300 questions against the demo's 98.0 %.)"""
    n = 60
    res = _cli(
        ["eval", "--model", "tiny-llava", "--task", "synthetic", "--limit", str(n), "--out", str(tmp_path / "eval"),
         "--batch-size", "32", "--max-new-tokens", "3", "--no-progress", "--json"]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    dense = json.loads(res.stdout)["configs"][0]
    res = _cli(
        ["demo", "--n", str(n), "--methods", "dense", "--timing-samples", "0", "--out", str(tmp_path / "demo"),
         "--no-progress", "--json"]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    demo = json.loads(res.stdout)["rows"][0]
    assert dense["n_samples"] == demo["n"] == n
    assert dense["score"] == pytest.approx(demo["accuracy"]) and dense["score"] >= MIN_DENSE_ACCURACY

    def read(path):
        return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}

    evaluated = read(tmp_path / "eval" / "synthetic" / "tiny_llava" / "dense" / "predictions.jsonl")
    shown = read(tmp_path / "demo" / "eval" / "synthetic" / "tiny_llava" / "dense" / "predictions.jsonl")
    assert list(evaluated) == list(shown)
    assert {k: (r["prompt"], r["output"]) for k, r in evaluated.items()} == {
        k: (r["prompt"], r["output"]) for k, r in shown.items()
    }
    first = next(iter(evaluated.values()))  # an "exists" question: asked as trained, no instruction
    assert first["instruction"] is None and first["input_text"].endswith(f"{first['prompt']} ASSISTANT:")


def test_calibrate_takes_the_named_model(tmp_path):
    from himap_vlm.apps.data.synthetic import SceneQAConfig, load_synthetic, write_jsonl

    data = write_jsonl(load_synthetic("validation", 2, SceneQAConfig()), tmp_path / "data")
    res = _cli(["calibrate", "vtw", "--model", "tiny-llava", "--data", str(data), "--start", "6", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["candidates"] == [6, 7] and out["forwards"] == 2 * 3
