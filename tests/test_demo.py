"""``himap demo`` on a small random model of the trained tiny LLaVA's architecture (offline).

The random stand-in answers nonsense, so these tests check the plumbing (files, rows, FLOPs,
timing, the configuration rule, a no-op configuration matching dense), not accuracy; the
embedded trained model's accuracy is checked in ``tests/test_embedded_model.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from himap_vlm.apps.cli import _load_commands, app
from himap_vlm.models.tiny_llava import TrainedTinyLlavaSpec, build_model, build_processor

torch.set_num_threads(1)
_load_commands()
runner = CliRunner()

SMALL = TrainedTinyLlavaSpec(
    image_size=24,
    patch_size=4,  # 36 image tokens
    vision_hidden=32,
    vision_intermediate=64,
    vision_layers=1,
    vision_heads=2,
    hidden_size=32,
    intermediate_size=64,
    num_layers=4,
    num_heads=2,
    num_kv_heads=1,
    seed=0,
)
ROW_KEYS = {
    "label",
    "method",
    "slug",
    "params",
    "config",
    "paper_default",
    "n",
    "accuracy",
    "accuracy_by_family",
    "flops_ratio",
    "flops_ratio_paper",
    "prefill_speedup",
    "prefill_speedup_p25",
    "prefill_speedup_p75",
    "prefill_ms",
    "mean_image_tokens_per_layer",
    "predictions",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small_tiny_llava")
    model = build_model(SMALL).eval()
    model.save_pretrained(out)
    build_processor(SMALL).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def demo_run(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    args = [
        "demo",
        "--model",
        str(model_dir),
        "--n",
        "12",
        "--methods",
        "dense,himap,fastv",
        "--out",
        str(out),
    ]
    res = runner.invoke(app, [*args, "--timing-samples", "2", "--timing-repeats", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    return out, res


def test_demo_writes_json_png_and_a_row_per_configuration(demo_run):
    out, res = demo_run
    assert (out / "demo.png").stat().st_size > 1000
    data = json.loads((out / "demo.json").read_text())
    assert {"model", "settings", "rows", "skipped", "timing", "seconds", "eval_dir", "json", "png"} <= set(
        data
    )
    assert data["model"]["num_layers"] == 4 and data["model"]["image_tokens"] == 36
    # The rule at L=4: HiMAP k2=max(3, 4//4)=3; FastV k=2; each paper default plus two budgets.
    labels = [r["label"] for r in data["rows"]]
    assert labels == [
        "dense",
        "himap(k1=2,r1=0.5,k2=3,r2=0.75)",
        "himap(k1=2,r1=0.75,k2=3,r2=0.9)",
        "himap(k1=2,r1=0.9,k2=3,r2=0.95)",
        "fastv(k=2,r=0.5)",
        "fastv(k=2,r=0.75)",
        "fastv(k=2,r=0.9)",
    ]
    assert data["settings"]["configurations"] == labels
    assert [r["paper_default"] for r in data["rows"]] == [True, True, False, False, True, False, False]
    for row in data["rows"]:
        assert set(row) == ROW_KEYS
        assert row["n"] == 12
        assert 0.0 <= row["accuracy"] <= 100.0
        assert set(row["accuracy_by_family"]) == {"exists", "attribute", "count", "spatial", "choice"}
        assert row["prefill_speedup"] > 0 and row["prefill_ms"] > 0
        assert Path(row["predictions"]).is_file()
        assert len(row["mean_image_tokens_per_layer"]) == 4
    dense, himap = data["rows"][0], data["rows"][1]
    assert dense["flops_ratio"] == pytest.approx(1.0) and dense["prefill_speedup"] == pytest.approx(1.0)
    assert himap["mean_image_tokens_per_layer"] == [36, 36, 18, 4.0]  # 36 -> 18 at k1=2 -> 18 - 14 at k2=3
    ratios = [r["flops_ratio"] for r in data["rows"][4:]]  # fastv r=0.5, 0.75, 0.9
    assert ratios[0] > ratios[1] > ratios[2]
    # paired, interleaved timing: every configuration on every timed question
    timing = data["timing"]
    assert timing["settings"]["samples"] == 2 and timing["settings"]["warmup"] == 1
    assert len(timing["measurements"]) == 7 * 2
    assert data["settings"]["n"] == 12 and data["settings"]["split"] == "test"
    # the table
    text = " ".join(res.output.split())
    assert "himap demo" in text and "fastv(k=2,r=0.75)" in text and "prefill x" in text


def _predictions(path: Path) -> dict[str, str]:
    return {r["id"]: r["output"] for r in map(json.loads, path.read_text().splitlines())}


def test_configuration_that_prunes_nothing_equals_dense(model_dir, tmp_path):
    res = runner.invoke(
        app,
        ["demo", "--model", str(model_dir), "--n", "12", "--out", str(tmp_path), "--no-progress",
         "--methods", "fastv(k=2,r=0),himap(k1=1,r1=0,k2=2,r2=0)", "--timing-samples", "0"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "demo.json").read_text())
    dense, *others = data["rows"]
    assert dense["label"] == "dense"  # added first although not asked for
    assert [r["label"] for r in others] == ["fastv(k=2,r=0)", "himap(k1=1,r1=0,k2=2,r2=0)"]
    want = _predictions(Path(dense["predictions"]))
    assert len(want) == 12
    for row in others:
        assert row["accuracy"] == dense["accuracy"]
        assert row["accuracy_by_family"] == dense["accuracy_by_family"]
        assert row["flops_ratio"] == pytest.approx(1.0)
        assert row["mean_image_tokens_per_layer"] == [36.0] * 4
        assert _predictions(Path(row["predictions"])) == want
        assert row["prefill_speedup"] is None  # timing skipped
    assert "prefill timing skipped" in " ".join(res.output.split())


def test_missing_embedded_model_exits_2(monkeypatch, tmp_path):
    import himap_vlm.assets

    monkeypatch.setattr(himap_vlm.assets, "tiny_llava_path", lambda: tmp_path / "not_shipped")
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "out"), "--n", "4"])
    assert res.exit_code == 2
    assert "the embedded model is not shipped in this build; pass --model PATH" in res.output
    assert "scripts/train_tiny_llava.py" in res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "methods,message",
    [
        ("nope", "unknown method 'nope'"),
        ("fastv(k=9,r=0.5)", "k=9 is out of range for this model"),
        ("fastv(q=1)", "does not take 'q'"),
    ],
)
def test_bad_methods_exit_2(model_dir, tmp_path, methods, message):
    res = runner.invoke(
        app, ["demo", "--model", str(model_dir), "--out", str(tmp_path), "--methods", methods]
    )
    assert res.exit_code == 2
    assert message in res.output


def test_configuration_rule_at_depth_8_and_skipped_budgets():
    from himap_vlm.apps.demo import demo_configurations
    from himap_vlm.core.methods.spec import MethodSpecError

    configs, skipped = demo_configurations(None, 8)  # every method, the embedded model's depth
    labels = [c.spec.label for c in configs]
    seeds = [
        "dense",
        "himap(k1=2,r1=0.5,k2=3,r2=0.75)",
        "himap(k1=2,r1=0.75,k2=3,r2=0.9)",
        "himap(k1=2,r1=0.9,k2=3,r2=0.95)",
        "fastv(k=2,r=0.5)",
        "fastv(k=2,r=0.75)",
        "fastv(k=2,r=0.9)",
        "random(k=2,r=0.5)",
        "random(k=2,r=0.75)",
        "random(k=2,r=0.9)",
        "vtw(k=4)",
        "vtw(k=2)",
        "vtw(k=6)",
        "visipruner(shallow_layers=2)",
        "visipruner(shallow_layers=2,l2_threshold=0.1)",
        "visipruner(shallow_layers=2,l2_threshold=0.4)",
    ]
    assert labels[: len(seeds)] == seeds
    # every other registered method follows, from its own declarations (no table here)
    from himap_vlm.core.methods import get_method, method_names

    seeded = {"dense", "himap", "fastv", "random", "vtw", "visipruner"}
    rest = []
    for name in method_names():
        if name not in seeded:
            cls = get_method(name)
            for params in [cls.defaults_for(8), *cls.budgets(8)]:
                rest.append(cls(**params))
    assert [c.spec.build() for c in configs[len(seeds) :]] == rest
    assert skipped == []
    assert [c.paper_default for c in configs].count(True) == len(method_names())
    assert all(c.spec.num_layers == 8 for c in configs)
    # explicit configurations run alone; the paper default is recognised; a budget already listed
    # is not repeated
    configs, _ = demo_configurations("fastv(k=2,r=0.5),dense,fastv(k=2,r=0.9)", 8)
    assert [(c.spec.label, c.paper_default) for c in configs] == [
        ("dense", True),
        ("fastv(k=2,r=0.5)", True),
        ("fastv(k=2,r=0.9)", False),
    ]
    configs, _ = demo_configurations("fastv(r=0.9),fastv", 8)
    assert [c.spec.label for c in configs] == ["dense", "fastv(r=0.9)", "fastv(k=2,r=0.5)", "fastv(k=2,r=0.75)"]
    # the one spec syntax, as himap eval reads it: a configuration twice is an error
    with pytest.raises(MethodSpecError, match="same configuration"):
        demo_configurations("fastv(k=2,r=0.5),fastv(k=2,r=0.5)", 8)
    # a depth-3 model: HiMAP's k2=3 does not fit; with every method its configurations are
    # skipped (and said so), named explicitly it is refused
    configs, skipped = demo_configurations(None, 3)
    assert "himap" not in {c.spec.name for c in configs}
    assert [c.spec.label for c in configs if c.spec.name == "vtw"] == ["vtw(k=1)", "vtw(k=2)"]
    assert len(skipped) == 3 and all("k2=3 is out of range" in s["reason"] for s in skipped)
    assert not any(s["reason"].startswith("himap: himap:") for s in skipped)
    with pytest.raises(MethodSpecError, match="k2=3 is out of range"):
        demo_configurations("himap,vtw", 3)


@pytest.fixture
def extra_method(scratch_registry):
    """A method registered for one test only (the registry restored afterwards)."""
    from dataclasses import dataclass

    from himap_vlm.core.interface import PruneStep
    from himap_vlm.core.methods import registry
    from himap_vlm.core.methods.base import PruningMethod, kept_count, top_k_indices
    from himap_vlm.core.methods.params import layer, ratio

    @registry.register("firstkeep")
    @dataclass(frozen=True)
    class FirstKeep(PruningMethod):
        rank = 15  # between himap (10) and fastv (20)

        k: int = layer(3, doc="pruning layer")
        r: float = ratio(0.5, doc="fraction pruned")

        @classmethod
        def defaults_for(cls, num_layers):
            """k = L // 4, r = 0.6 (the demo reads this line)."""
            return {"k": max(1, num_layers // 4), "r": 0.6}

        @classmethod
        def budgets(cls, num_layers):
            """r in {0.8} and a layer the model may not have."""
            return [{"k": max(1, num_layers // 4), "r": 0.8}, {"k": 6, "r": 0.8}]

        def steps(self):
            return [PruneStep(self.k)]

        def kept_after(self, step, num_image, num_image_input):
            return kept_count(num_image, self.r)

        def select(self, x):
            return top_k_indices(-torch.arange(x.num_image, dtype=torch.float), self.kept_after(0, x.num_image, 0))

    return FirstKeep


def test_a_new_method_file_appears_in_the_demo_with_no_edit(extra_method):
    """Configurations and the rule shown to users come from the registry (issue 15)."""
    import himap_vlm.apps.demo as demo
    from himap_vlm.apps.demo import configuration_rule, demo_configurations
    from himap_vlm.apps.demo.configs import rule_lines

    assert not hasattr(demo, "method_budgets") and not hasattr(demo, "CONFIG_RULE")  # no per-method table
    configs, skipped = demo_configurations(None, 4)
    labels = [c.spec.label for c in configs]
    assert labels[:6] == [
        "dense",
        "himap(k1=2,r1=0.5,k2=3,r2=0.75)",
        "himap(k1=2,r1=0.75,k2=3,r2=0.9)",
        "himap(k1=2,r1=0.9,k2=3,r2=0.95)",
        "firstkeep(k=1,r=0.6)",  # defaults_for(4), in the registry's listing order
        "firstkeep(k=1,r=0.8)",  # budgets(4)
    ]
    assert labels[6] == "fastv(k=2,r=0.5)"
    assert skipped == [
        {"label": "firstkeep(k=6,r=0.8)", "reason": skipped[0]["reason"]}
    ] and "k=6 is out of range" in skipped[0]["reason"]
    rule = {r["method"]: r for r in configuration_rule(4)}
    assert list(rule)[:3] == ["dense", "himap", "firstkeep"]
    assert rule["firstkeep"]["defaults_rule"] == "k = L // 4, r = 0.6 (the demo reads this line)"
    assert rule["firstkeep"]["default"] == "firstkeep(k=1,r=0.6)"
    assert rule["firstkeep"]["budgets"][0] == "firstkeep(k=1,r=0.8)"
    assert "does not fit" in rule["firstkeep"]["budgets"][1]
    assert rule["dense"]["defaults_rule"] is None and rule["dense"]["budgets"] == []
    assert rule["fastv"]["default"] == "fastv(k=2,r=0.5,criterion=last_token)"  # full labels
    lines = rule_lines(configuration_rule(4), 4)
    assert any(line.startswith("firstkeep: defaults_for(4) [k = L // 4") for line in lines)


def test_the_rule_is_recorded_and_printed(demo_run):
    out, res = demo_run
    data = json.loads((out / "demo.json").read_text())
    rule = data["settings"]["rule"]
    assert [r["method"] for r in rule] == ["dense", "himap", "fastv"]
    assert rule[1]["default"] == "himap(k1=2,r1=0.5,k2=3,r2=0.75,swap_criteria=false)"
    assert "max(3, L//4)" in rule[1]["defaults_rule"]
    text = " ".join(res.output.split())
    assert "from the method registry" in text and "himap: defaults_for(4)" in text


def test_demo_asks_the_questions_of_the_synthetic_task():
    """The demo's questions are ``himap eval --task synthetic``'s (same ids, images and prompts)."""
    from himap_vlm.apps.demo import synthetic_samples
    from himap_vlm.apps.eval.tasks import get_task

    samples = synthetic_samples(10, 16)  # below the 24 px the 3 x 3 grid needs: drawn at 24
    task = get_task("synthetic", image_size=16)
    assert samples[0].load_image().size == (24, 24)
    assert [s.meta["family"] for s in samples[:5]] == ["exists", "attribute", "count", "spatial", "choice"]
    loaded = task.load(limit=10)
    assert [(s.id, s.question, s.answer) for s in loaded] == [(s.id, s.question, s.answer) for s in samples]
    assert [s.id for s in synthetic_samples(4, 48)] == [s.id for s in samples[:4]]
    assert "prompt" not in samples[0].meta  # no demo-only prompt: the prompt rule decides


def test_budgets_can_be_left_out_for_larger_models():
    from himap_vlm.apps.demo import demo_configurations
    from himap_vlm.core.methods import method_names

    configs, _ = demo_configurations(None, 30, budgets=False)
    assert [c.spec.name for c in configs] == method_names() and all(c.paper_default for c in configs)
    configs, _ = demo_configurations("himap,fastv(r=0.9)", 30, budgets=False)
    assert [c.spec.label for c in configs] == ["dense", "himap(k1=2,r1=0.5,k2=7,r2=0.75)", "fastv(r=0.9)"]
