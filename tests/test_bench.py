"""Tests of :mod:`himap_vlm.apps.bench` and ``himap bench`` (tiny models, one or two rounds, CPU)."""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from himap_vlm.apps.bench import (
    ReferenceStyle,
    RowSpec,
    Stat,
    build_rows,
    greedy_generate,
    measure_run,
    reference_generate,
    run_benchmark,
)
from himap_vlm.apps.flops import Layout, TextDims, kv_cache_bytes, layout_from_inputs
from himap_vlm.core.methods import METHODS, Dense, FastV, HiMAP, RandomPrune
from himap_vlm.models.tiny import build_tiny_llava, example_image

torch.set_num_threads(1)  # 2 shared cores: two threads oversubscribe them and time out of all proportion

PROMPT = "user : <image> what is in the picture ? answer with one word . assistant :"
_MODELS: dict[str, tuple] = {}


def tiny(attn: str = "sdpa"):
    if attn not in _MODELS:
        _MODELS[attn] = build_tiny_llava(
            num_layers=6, num_heads=4, num_kv_heads=2, image_size=24, attn_implementation=attn
        )
    return _MODELS[attn]


def inputs_for(proc, seed: int = 0, prompt: str = PROMPT):
    return dict(proc(images=[example_image(24, seed)], text=prompt, return_tensors="pt"))


def attn_impls(model) -> tuple:
    c = model.config
    return c._attn_implementation, c.text_config._attn_implementation, c.vision_config._attn_implementation


def hook_count(model) -> int:
    """Hooks on the model, not counting the output recorders transformers installs for good."""
    hooks = [h for m in model.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())]
    return sum("output_capturing" not in getattr(h, "__qualname__", "") for h in hooks)


# ------------------------------------------------------------------------------------ reference style
@pytest.mark.parametrize(
    "method",
    [
        HiMAP(k1=2, r1=0.5, k2=4, r2=0.75),
        HiMAP(k1=1, r1=0.4, k2=3, r2=0.5, swap_criteria=True),
        FastV(k=2, r=0.5),
        FastV(k=3, r=0.7, criterion="mean_received"),
        RandomPrune(k=2, r=0.5),
    ],
    ids=["himap", "himap-swapped", "fastv-last", "fastv-mean", "random"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_style_keeps_the_engine_tokens(method, seed):
    model, proc = tiny()
    inputs = inputs_for(proc, seed)
    before = hook_count(model)
    with torch.no_grad(), method(model) as run:
        model(**inputs)
    with torch.no_grad(), ReferenceStyle(method)(model) as ref:
        assert attn_impls(model) == ("eager", "eager", "eager")
        model(**inputs, use_cache=False, output_attentions=True)
    assert attn_impls(model) == ("sdpa", "sdpa", "sdpa")
    assert hook_count(model) == before
    assert ref.image_tokens_per_layer == run.image_tokens_per_layer
    assert ref.image_tokens_per_layer[-1][0] < ref.image_tokens_per_layer[0][0]
    for ours, theirs in zip(run.layer_positions, ref.layer_positions, strict=True):
        assert torch.equal(ours[0], theirs[0])


def test_reference_generate_equals_generate_without_cache():
    model, proc = tiny()
    inputs = inputs_for(proc)
    method = HiMAP(k1=2, r1=0.5, k2=4, r2=0.75)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        with method(model, selection="every_forward"):  # re-chosen at every step, as the authors' code
            expected = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)[:, n:]
        with ReferenceStyle(method)(model) as ref:
            tokens = reference_generate(model, inputs, 4)
    assert torch.equal(tokens, expected)
    assert ref.num_prefills == 4  # re-pruned at every generated token


def test_reference_style_limits():
    model, proc = tiny()
    with pytest.raises(ValueError, match="static methods"):
        ReferenceStyle(METHODS["visipruner"]())
    with pytest.raises(ValueError, match="PruningMethod"):
        ReferenceStyle("himap")
    batch = proc(
        images=[example_image(24, 0), example_image(24, 1)], text=[PROMPT, PROMPT], return_tensors="pt"
    )
    with pytest.raises(ValueError, match="batch size 1"), torch.no_grad(), ReferenceStyle(FastV())(model):
        model(**batch, use_cache=False)
    assert attn_impls(model) == ("sdpa", "sdpa", "sdpa")


# ------------------------------------------------------------------------------------ one run
def test_greedy_generate_equals_generate():
    model, proc = tiny()
    inputs = inputs_for(proc)
    n = inputs["input_ids"].shape[1]
    for method in (Dense(), HiMAP(k1=2, r1=0.5, k2=4, r2=0.75), METHODS["vtw"](k=3)):
        with torch.no_grad(), method(model):
            expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, n:]
            tokens, _ = greedy_generate(model, inputs, 5)
        assert torch.equal(tokens, expected), method


def test_measure_run_kv_bytes_equal_prediction():
    model, proc = tiny()
    inputs = inputs_for(proc)
    dims = TextDims.from_config(model.config)
    layout = layout_from_inputs(inputs["input_ids"], model.config.image_token_id)
    for row in (RowSpec("dense", "dense"), RowSpec("fastv", "fastv", {"k": 2, "r": 0.75})):
        m = measure_run(model, inputs, row, 3)
        assert m.kv_bytes == sum(kv_cache_bytes(dims, layout, m.image_tokens_per_layer, dtype=torch.float32))
        assert m.new_tokens == 3 and len(m.tokens) == 3
        assert 0 < m.prefill_s <= m.ttft_s <= m.e2e_s
        assert m.decode_tokens_per_s == pytest.approx(2 / m.decode_s)
    ref = measure_run(
        model, inputs, RowSpec("fastv (reference-style)", "fastv", {"k": 2, "r": 0.75}, "reference"), 2
    )
    assert ref.kv_bytes == 0 and ref.image_tokens_per_layer == m.image_tokens_per_layer


# ------------------------------------------------------------------------------------ rows and stats
def test_rows_from_the_spec_syntax():
    rows = build_rows("himap(k2=6),fastv", 12, reference="himap")
    assert [r.name for r in rows] == ["dense", "himap(k2=6)", "fastv", "himap(k2=6) (reference-style)"]
    assert rows[1].args == {"k1": 2, "r1": 0.5, "k2": 6, "r2": 0.75, "swap_criteria": False}
    assert rows[3].style == "reference" and rows[3].args == rows[1].args
    assert isinstance(rows[3].build(), ReferenceStyle)
    # bare names take the method's own defaults for the depth (no table in the bench)
    for name in ("himap", "fastv", "vtw", "random"):
        row = build_rows(name, 32)[1]
        assert row.args == {**row.args, **METHODS[name].defaults_for(32)}, name
    assert build_rows("himap", 8)[1].args["k2"] == 3 and build_rows("vtw", 32)[1].args == {"k": 16}
    # the same method twice, each with its own reference row when named bare
    rows = build_rows(["dense", "himap", "himap(r2=0.5)"], 12, reference=["himap"])
    assert [r.name for r in rows][-2:] == ["himap (reference-style)", "himap(r2=0.5) (reference-style)"]
    # "all": every registered method; reference "all": every static one without attention edits
    rows = build_rows("all", 12, reference="all")
    engine = [r.method for r in rows if r.style == "engine"]
    assert engine == list(METHODS)
    refs = {r.method for r in rows if r.style == "reference"}
    assert refs == {n for n in METHODS if n != "dense" and not METHODS[n].dynamic and not METHODS[n]().attention_edits()}
    with pytest.raises(ValueError, match="not in the methods"):
        build_rows("himap", 12, reference="fastv")
    with pytest.raises(ValueError, match="not in the methods"):
        build_rows("himap(k2=4)", 12, reference="himap(k2=5)")
    with pytest.raises(ValueError, match="static methods"):
        build_rows("visipruner", 12, reference="visipruner")
    with pytest.raises(ValueError, match="out of range"):
        build_rows("fastv(k=9)", 4)
    with pytest.raises(ValueError, match="unknown method"):
        build_rows("nope", 4)
    with pytest.raises(ValueError, match="does not take"):
        build_rows("fastv(k1=2)", 4)


def test_stat():
    s = Stat.of([4.0, 1.0, 3.0, 2.0, None])
    assert (s.median, s.p25, s.p75, s.min, s.max, s.n) == (2.5, 1.75, 3.25, 1.0, 4.0, 4)
    assert Stat.of([]).median is None
    assert s.scaled(10).median == 25.0


# ------------------------------------------------------------------------------------ benchmark
def test_run_benchmark_structure():
    model, proc = tiny()
    samples = [inputs_for(proc, 0), inputs_for(proc, 1, "<image> describe the image")]
    rows = build_rows("himap,vtw", 6, reference="himap")
    ticks = []
    result = run_benchmark(model, samples, rows, repeats=2, warmup=1, max_new_tokens=2, progress=ticks.append)
    n_rows = len(rows)
    assert n_rows == 4 and len(ticks) == n_rows * (1 + 2 * 2 + 2)
    assert len(result.measurements) == n_rows * 2 * 2
    d = result.to_dict()
    json.dumps(d)
    assert {
        "model",
        "settings",
        "environment",
        "layouts",
        "rows",
        "summary",
        "measurements",
        "memory_bytes",
    } <= set(d)
    columns = {
        "prefill_ms",
        "ttft_ms",
        "decode_tokens_per_s",
        "e2e_ms",
        "peak_memory_bytes",
        "kv_bytes",
        "flops_ratio",
        "ideal_speedup",
        "prefill_speedup",
        "measured_over_ideal",
    }
    summary = {s.row: s for s in result.summary}
    for row in rows:
        s = summary[row.name]
        assert columns <= set(d["summary"][0])
        raw = [m for m in result.measurements if m.row == row.name]
        assert s.runs == len(raw) == 4
        assert s.prefill_ms.median == pytest.approx(statistics.median(m.prefill_s * 1e3 for m in raw))
        assert s.e2e_ms.median == pytest.approx(statistics.median(m.e2e_s * 1e3 for m in raw))
        assert s.peak_memory_bytes.n == 2
        pairs = [
            next(
                b for b in result.measurements if (b.row, b.sample, b.repeat) == ("dense", m.sample, m.repeat)
            ).prefill_s
            / m.prefill_s
            for m in raw
        ]
        assert s.prefill_speedup.median == pytest.approx(statistics.median(pairs))
        assert s.ideal_speedup == pytest.approx(1 / s.flops_ratio)
        assert s.measured_over_ideal == pytest.approx(s.prefill_speedup.median / s.ideal_speedup)
    assert summary["dense"].flops_ratio == 1.0 and summary["dense"].prefill_speedup.median == 1.0
    ref = summary["himap (reference-style)"]
    assert ref.flops_ratio == summary["himap"].flops_ratio < 1
    assert ref.image_tokens_per_layer == summary["himap"].image_tokens_per_layer
    assert ref.kv_bytes == 0 and ref.kv_ratio == 0
    # KV bytes of the real caches equal the calculator's prediction
    for name, predicted in result.kv_predicted_bytes.items():
        measured = sorted({(m.sample, m.kv_bytes) for m in result.measurements if m.row == name})
        assert [kv for _, kv in measured] == predicted
    assert summary["vtw"].kv_ratio < 1 and summary["himap"].kv_ratio < 1 and summary["dense"].kv_ratio == 1
    layout = Layout(**result.layouts[0])
    assert layout.image == 36


def test_run_benchmark_rejects_bad_input():
    model, proc = tiny()
    rows = [RowSpec("himap", "himap", {"k1": 2, "k2": 4})]
    with pytest.raises(ValueError, match="baseline"):
        run_benchmark(model, [inputs_for(proc)], rows, repeats=1)
    with pytest.raises(ValueError, match="at least one sample"):
        run_benchmark(model, [], [RowSpec("dense", "dense")])


# ------------------------------------------------------------------------------------ CLI
def invoke(args: list[str]):
    from himap_vlm.apps.cli import _load_commands, app

    _load_commands()
    return CliRunner().invoke(app, ["bench", *args])


TINY = ["--tiny", "--layers", "4", "--hidden", "32", "--heads", "2", "--kv-heads", "2", "--n", "1"]
FAST = ["--repeats", "1", "--warmup", "0", "--max-new-tokens", "2"]


def test_cli_tiny_writes_json_and_png(tmp_path):
    out = tmp_path / "bench"
    result = invoke(
        [
            *TINY,
            *FAST,
            "--image-tokens",
            "16",
            "--methods",
            "himap(k2=3),fastv",
            "--reference",
            "fastv",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert [s["row"] for s in printed["runs"][0]["summary"]] == [
        "dense",
        "himap(k2=3)",
        "fastv",
        "fastv (reference-style)",
    ]
    data = json.loads((out / "bench.json").read_text())
    run = data["runs"][0]
    assert run["summary"][1]["args"]["k2"] == 3
    assert len(run["measurements"]) == 4 and run["settings"]["image_tokens"] == 16
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| fastv (reference-style) |" in (out / "bench.md").read_text()


def test_cli_sweep_and_table(tmp_path):
    result = invoke(
        [*TINY, *FAST, "--no-memory", "--sweep", "4,16", "--methods", "fastv", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "measured/ideal" in result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert [r["settings"]["image_tokens"] for r in data["runs"]] == [4, 16]
    assert (tmp_path / "bench.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "x"], "either --model"),
        (["--tiny", "--model", "m", "--out", "x"], "either --model"),
        (["--model", "/nonexistent", "--sweep", "16", "--out", "x"], "use it with --tiny"),
        (["--tiny", "--sweep", "15", "--out", "x"], "squares"),
        (["--tiny", "--methods", "nope", "--out", "x"], "--methods nope: unknown method 'nope'; known methods: dense"),
        (["--tiny", "--methods", "fastv(k=9)", "--out", "x"], "fastv: k=9 is out of range for this model: it has 8"),
        (["--tiny", "--methods", "fastv(k1=2)", "--out", "x"], "method 'fastv' does not take 'k1'"),
        (["--tiny", "--methods", "himap,fastv(", "--out", "x"], "missing ')'"),
        (["--tiny", "--reference", "fastv", "--methods", "himap", "--out", "x"], "not in the methods"),
        (["--tiny", "--reference", "visipruner", "--methods", "visipruner", "--out", "x"], "static methods"),
        (["--model", "/nonexistent/model", "--out", "x"], "model path '/nonexistent/model' does not exist"),
        (["--model", "smol_llava_missing", "--out", "x"], "does not exist"),
        (["--tiny", "--dtype", "float8", "--out", "x"], "--dtype must be one of"),
    ],
)
def test_cli_errors(args, message):
    result = invoke(args)
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_cli_method_arg_is_gone():
    result = invoke(["--tiny", "--method-arg", "himap.k1=2", "--out", "x"])
    assert result.exit_code == 2 and "No such option: --method-arg" in result.output


# ------------------------------------------------------------------------------------ the registry drives it
def test_a_registered_method_appears_in_bench_without_edits(toy_method, tmp_path):
    rows = build_rows("all", 6, reference="all")
    assert ("toyprune", "engine") in {(r.method, r.style) for r in rows}
    assert ("toyprune", "reference") in {(r.method, r.style) for r in rows}
    assert next(r for r in rows if r.method == "toyprune").args == {"k": 3, "keep": 3}
    # the default method list is the registry
    result = invoke([*TINY, *FAST, "--no-memory", "--max-new-tokens", "1", "--image-tokens", "16",
                     "--reference", "toyprune", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = {s["row"]: s for s in json.loads(result.output)["runs"][0]["summary"]}
    assert list(summary) == [*METHODS, "toyprune (reference-style)"]
    assert summary["toyprune"]["image_tokens_per_layer"] == [16, 16, 3, 3]  # 4 layers: k = 2
    assert summary["toyprune (reference-style)"]["image_tokens_per_layer"] == [16, 16, 3, 3]


# ------------------------------------------------------------------------------------ models on the device
def test_random_llava_config_and_on_device_build():
    from himap_vlm.apps.bench.models import build_random_llava, random_llava_config
    from himap_vlm.models.tiny import TinyLlavaSpec

    for spec in (TinyLlavaSpec(num_layers=3, image_size=16), TinyLlavaSpec(backbone="qwen2", num_kv_heads=2)):
        model, _ = build_tiny_llava(spec)
        assert random_llava_config(spec).to_dict() == model.config.to_dict()
    spec = TinyLlavaSpec(num_layers=4, image_size=16)
    cpu, _ = build_random_llava(spec, "cpu", torch.bfloat16)  # the CPU path: build_tiny_llava's weights
    assert next(cpu.parameters()).dtype == torch.bfloat16
    model, proc = build_random_llava(spec, "cpu", torch.bfloat16, on_device=True)  # the GPU path, on the CPU
    assert torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in cpu.parameters())
    inputs = inputs_for(proc, prompt=PROMPT)
    with torch.no_grad(), HiMAP(k1=1, r1=0.5, k2=2, r2=0.75)(model) as run:
        model(**inputs)
    assert [c[0] for c in run.image_tokens_per_layer] == [16, 8, 2, 2]


# ------------------------------------------------------------------------------------ benchmarks/gpu.sh
ROOT = Path(__file__).resolve().parents[1]


def gpu_script_commands(tmp_path, *flags: str) -> list[list[str]]:
    """The ``himap`` commands ``benchmarks/gpu.sh --dry-run`` prints (arguments after ``-m himap_vlm``)."""
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("HIMAP_BENCH_SMOKE", None)
    env.pop("HIMAP_BENCH_ARGS", None)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(tmp_path / "gpu"), *flags],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    commands = [shlex.split(line[2:]) for line in done.stderr.splitlines() if line.startswith("+ ")]
    assert commands and all(c[:3] == [sys.executable, "-m", "himap_vlm"] for c in commands), done.stderr
    assert not (tmp_path / "gpu").exists()  # a dry run writes nothing
    return [c[3:] for c in commands]


def test_gpu_script_full_shape_dry_run(tmp_path):
    commands = gpu_script_commands(tmp_path)
    benches = [c for c in commands if c[0] == "bench"]
    assert [c[c.index("--attn-implementation") + 1] for c in benches] == ["sdpa", "flash_attention_2"]
    for cmd in benches:
        opts = dict(zip(cmd[2::2], cmd[3::2], strict=False)) if cmd[1] == "--tiny" else {}
        assert (opts["--layers"], opts["--hidden"], opts["--heads"], opts["--intermediate"]) == ("32", "4096", "32", "11008")
        assert (opts["--image-tokens"], opts["--dtype"], opts["--device"]) == ("576", "bfloat16", "cuda")
        assert opts["--methods"] == "all"  # the registry, not a list in the script
    assert dict(zip(benches[0][2::2], benches[0][3::2], strict=False))["--reference"] == "all"
    assert {c[c.index("--convention") + 1] for c in commands if c[0] == "flops"} == {"exact", "paper"}


def test_gpu_script_smoke_runs_every_method_and_reference_row(tmp_path, toy_method):
    """The script's own commands, at its reduced CPU shape, run in this process (no new interpreter)."""
    from himap_vlm.apps.cli import _load_commands, app

    _load_commands()
    commands = gpu_script_commands(tmp_path, "--smoke")
    assert [c[0] for c in commands] == ["flops", "bench"]
    flops = CliRunner().invoke(app, commands[0])
    assert flops.exit_code == 0, flops.output
    assert [r["method"] for r in json.loads(flops.output)["methods"]] == list(METHODS)
    bench = CliRunner().invoke(app, [*commands[1], "--json"])
    assert bench.exit_code == 0, bench.output
    rows = [s["row"] for s in json.loads(bench.output)["runs"][0]["summary"]]
    static = [n for n in METHODS if n != "dense" and not METHODS[n].dynamic and not METHODS[n]().attention_edits()]
    assert "toyprune" in static
    assert rows == [*METHODS, *(f"{n} (reference-style)" for n in static)]
    out = Path(commands[1][commands[1].index("--out") + 1])
    assert (out / "bench.json").is_file() and (out / "bench.md").is_file() and (out / "bench.png").is_file()
