"""The ``himap`` command line on a tiny model written by ``himap tiny-model`` (offline)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from himap_vlm.apps.cli import _load_commands, app

_load_commands()
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    res = runner.invoke(app, ["tiny-model", str(out), "--layers", "4", "--hidden", "32", "--image-size", "16"])
    assert res.exit_code == 0, res.output
    return out


def test_generate_json(tiny_dir):
    args = ["generate", "--model", str(tiny_dir), "--image", str(tiny_dir / "example.png"),
            "--prompt", "what is in the picture ?", "--method", "himap(k1=1,r1=0.5,k2=2,r2=0.75)",
            "--max-new-tokens", "3", "--json", "--compare", "--repeats", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["image_tokens_per_layer"] == [16, 8, 2, 2]
    assert data["spec"] == "himap(k1=1,r1=0.5,k2=2,r2=0.75,swap_criteria=false)"
    assert data["prefill_ms_dense"] > 0 and data["prefill_ms_pruned"] > 0
    assert data["lm_prefill_ms_dense"] > 0 and data["lm_prefill_speedup"] > 0
    assert 0 < data["flops_ratio"] < 1 and data["ideal_speedup"] == pytest.approx(1 / data["flops_ratio"])
    assert data["measured_over_ideal"] == pytest.approx(data["lm_prefill_speedup"] / data["ideal_speedup"])
    assert isinstance(data["answer"], str)


def test_generate_compare_uses_the_benchmark_timer(tiny_dir, monkeypatch):
    """--compare is the benchmark's routine (one timer in the package), not a copy of it."""
    import himap_vlm.apps.bench as bench

    calls = []
    real = bench.run_benchmark

    def spy(model, samples, rows, **kw):
        calls.append(([r.name for r in rows], kw))
        return real(model, samples, rows, **kw)

    monkeypatch.setattr(bench, "run_benchmark", spy)
    args = ["generate", "--model", str(tiny_dir), "--image", str(tiny_dir / "example.png"), "--prompt", "x",
            "--method", "vtw", "--max-new-tokens", "1", "--json", "--compare", "--repeats", "2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert calls == [(["dense", "vtw"], dict(repeats=2, warmup=1, max_new_tokens=1, memory=False))]
    data = json.loads(res.stdout)
    assert data["image_tokens_per_layer"] == [16, 16, 0, 0]  # bare name: VTW's K = L // 2 for 4 layers
    assert data["repeats"] == 2


def test_generate_bare_name_and_method_arg(tiny_dir):
    base = ["generate", "--model", str(tiny_dir), "--image", str(tiny_dir / "example.png"), "--prompt", "x",
            "--max-new-tokens", "1", "--json"]
    res = runner.invoke(app, [*base, "--method", "himap"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["config"] == {"k1": 2, "r1": 0.5, "k2": 3, "r2": 0.75, "swap_criteria": False}
    res = runner.invoke(app, [*base, "--method", "fastv(k=1)", "--method-arg", "r=0.75", "--method-arg",
                              "criterion=mean_received"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["config"] == {"k": 1, "r": 0.75, "criterion": "mean_received"}
    assert data["image_tokens_per_layer"] == [16, 4, 4, 4]


def test_generate_text_summary(tiny_dir):
    res = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--image", str(tiny_dir / "example.png"),
                              "--prompt", "describe", "--method", "fastv(k=2,r=0.5)", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert "L0-1: 16 · L2-3: 8" in res.output


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "fastv(k1=2)"], "method 'fastv' does not take 'k1'; its parameters are: k, r, criterion"),
        (["--method", "himap(k1=3,k2=2)"], "k2=2 must be greater than k1=3"),
        (["--method", "fastv(k=9)"], "fastv: k=9 is out of range for this model: it has 4 decoder layers"),
        (["--method", "himap(k1=3)"], "k2=3 must be greater than k1=3"),  # defaults_for(4) gives k2=3
        (["--method", "nope"], "unknown method 'nope'; known methods: dense"),
        (["--method", "fastv(k=2"], "invalid method configuration"),
        (["--method", "fastv(k=two)"], "k must be an integer layer index"),
        (["--method", "fastv", "--method-arg", "oops"], "--method-arg expects KEY=VALUE"),
        (["--method", "fastv", "--method-arg", "=3"], "--method-arg expects KEY=VALUE"),
        (["--method", "fastv(k=1)", "--method-arg", "k=2"], "parameter 'k' given twice"),
        (["--method", "fastv", "--k", "2"], "No such option: --k"),
    ],
)
def test_generate_bad_options(tiny_dir, extra, message):
    res = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--image", str(tiny_dir / "example.png"),
                              "--prompt", "x", *extra])
    assert res.exit_code == 2
    assert message in res.output
    if "No such option" not in message:  # typer's own usage errors are framed; ours are one line
        assert len(res.output.strip().splitlines()) == 1, res.output


def test_generate_missing_files(tiny_dir, tmp_path):
    res = runner.invoke(app, ["generate", "--model", str(tmp_path / "nope"), "--image", str(tiny_dir / "example.png"),
                              "--prompt", "x", "--method", "dense"])
    assert res.exit_code == 2 and "does not exist" in res.output and "tiny-llava" in res.output
    res = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--image", str(tmp_path / "missing.png"),
                              "--prompt", "x", "--method", "dense"])
    assert res.exit_code == 2 and "image file not found" in res.output


def test_generate_named_model(tmp_path):
    from himap_vlm.assets import has_tiny_llava
    from himap_vlm.models.tiny import example_image

    if not has_tiny_llava():
        pytest.skip("this build does not ship the tiny LLaVA")
    png = tmp_path / "x.png"
    example_image(32).save(png)
    res = runner.invoke(app, ["generate", "--model", "tiny-llava", "--image", str(png), "--prompt",
                              "what is in the picture ?", "--method", "fastv", "--max-new-tokens", "1", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["method"] == "fastv"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--backbone", "gpt"], "--backbone must be llama, mistral or qwen2"),
        (["--image-size", "30", "--patch-size", "4"], "must be a multiple of --patch-size"),
        (["--hidden", "30", "--heads", "4"], "--hidden must be divisible by --heads"),
    ],
)
def test_tiny_model_bad_options(tmp_path, args, message):
    res = runner.invoke(app, ["tiny-model", str(tmp_path / "m"), *args])
    assert res.exit_code == 2 and message in res.output


def test_tiny_model_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = runner.invoke(app, ["tiny-model", str(blocker / "model")])
    assert res.exit_code == 2 and "cannot write to" in res.output and "Traceback" not in res.output
