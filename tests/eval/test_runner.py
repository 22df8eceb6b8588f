"""``himap eval`` and :func:`himap_vlm.apps.eval.runner.evaluate`: results, resuming, sharding, errors (tiny model, offline)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from _runner_helpers import N_SAMPLES, single_thread, tiny_eval_env
from typer.testing import CliRunner

from himap_vlm.apps.cli import _load_commands, app
from himap_vlm.apps.eval import get_task
from himap_vlm.apps.eval.runner import PREDICTIONS, evaluate, finalize, read_predictions
from himap_vlm.core.methods.spec import MethodSpec, MethodSpecError, parse_method_args, parse_methods

_load_commands()
cli = CliRunner()
METHODS = "dense,himap(k1=1,r1=0.5,k2=2,r2=0.5),fastv(k=1,r=0.5)"
NEW = 3  # new tokens per answer: enough to exercise decoding, short enough for a loaded CPU


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_eval_env(tmp_path_factory)


@pytest.fixture(scope="module")
def samples(env):
    return get_task("synthetic").load(env.data_dir)


@pytest.fixture(scope="module")
def full_run(env, samples, tmp_path_factory):
    """One uninterrupted run (batch 3) that several tests compare against."""
    out = tmp_path_factory.mktemp("full")
    results = evaluate(
        env.model, env.processor, "synthetic", samples, METHODS, out, batch_size=3, max_new_tokens=NEW
    )
    return out, results


# ------------------------------------------------------------------ method specs
def test_method_specs_slugs_and_labels():
    specs = parse_methods(
        "dense,himap(k1=2,r1=0.5,k2=8,r2=0.75),himap(k1=2,r1=0.5,k2=15,r2=0.5),fastv(k=2,r=0.5)"
    )
    assert [s.slug for s in specs] == [
        "dense",
        "himap_k1-2_r1-0.5_k2-8_r2-0.75",
        "himap_k1-2_r1-0.5_k2-15_r2-0.5",
        "fastv_k-2_r-0.5",
    ]
    assert specs[1].label == "himap(k1=2,r1=0.5,k2=8,r2=0.75)"
    # --method-args give defaults per method; parentheses win; repeated --methods concatenate
    specs = parse_methods(["dense,himap", "fastv(r=0.25)"], "himap:k1=3,k2=9;fastv:k=4,r=0.5")
    assert [s.label for s in specs] == ["dense", "himap(k1=3,k2=9)", "fastv(k=4,r=0.25)"]
    assert specs[1].slug == "himap_k1-3_r1-0.5_k2-9_r2-0.75"
    assert (
        MethodSpec("fastv", {"criterion": "mean_received"}).slug == "fastv_k-2_r-0.5_criterion-mean_received"
    )
    assert MethodSpec("himap", {"r1": 1}).slug == MethodSpec("himap", {"r1": 1.0}).slug
    assert parse_method_args(["himap:k1=2", "fastv:swap=true"]) == {
        "himap": {"k1": 2},
        "fastv": {"swap": True},
    }


@pytest.mark.parametrize(
    "methods,args,message",
    [
        ("himap(k1=2", None, "missing ')'"),
        ("himap(k3=2)", None, "method 'himap' does not take 'k3'; its parameters are: k1, r1, k2, r2"),
        ("nope", None, "unknown method 'nope'"),
        ("himap,himap(k1=2)", None, "are the same configuration"),
        ("himap(k1=4,k2=3)", None, "k2=3 must be greater than k1=4"),
        ("fastv(k)", None, "expected KEY=VALUE"),
        ("dense,,fastv", None, "empty entry"),
        ("dense", "himap:k1=2", "not in the method list"),
        ("himap", "himap k1=2", "expected METHOD:KEY=VALUE"),
    ],
)
def test_method_spec_errors(methods, args, message):
    with pytest.raises(MethodSpecError, match=None) as info:
        parse_methods(methods, args)
    assert message in str(info.value)


# ------------------------------------------------------------------ results
def test_results_layout_metrics_and_summary(env, samples, full_run):
    out, results = full_run
    root = out / "synthetic" / env.model_dir.name
    assert results.directory == root
    assert [c.slug for c in results.configs] == ["dense", "himap_k1-1_r1-0.5_k2-2_r2-0.5", "fastv_k-1_r-0.5"]
    ids = [s.id for s in samples]
    for c in results.configs:
        files = sorted(p.name for p in c.directory.iterdir())
        assert files == ["config.json", "metrics.json", "predictions.jsonl"]  # part files merged away
        records = read_predictions(c.directory / PREDICTIONS)
        assert [r["id"] for r in records] == ids
        assert all(isinstance(r["output"], str) and len(r["image_tokens_per_layer"]) == 4 for r in records)
        config = json.loads((c.directory / "config.json").read_text())
        assert config["method"] == c.method and config["max_new_tokens"] == NEW
        assert c.n_samples == N_SAMPLES and c.n_missing == 0 and c.primary_metric == "accuracy"
        assert c.score == pytest.approx(c.metrics["accuracy"])
        assert json.loads((c.directory / "metrics.json").read_text())["score"] == c.score
    dense, himap, fastv = results.configs
    assert dense.flops_ratio == pytest.approx(1.0) and dense.flops_ratio_paper == pytest.approx(1.0)
    # 16 image tokens: himap keeps 8 from layer 1 and 4 from layer 2; fastv keeps 8 from layer 1
    assert himap.mean_image_tokens_per_layer == [16, 8, 4, 4]
    assert fastv.mean_image_tokens_per_layer == [16, 8, 8, 8]
    assert 0 < himap.flops_ratio < fastv.flops_ratio < 1
    assert himap.flops_ratio_paper < himap.flops_ratio  # the paper convention ignores text tokens
    with results.summary_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["slug"] for r in rows] == [c.slug for c in results.configs]
    assert {"flops_ratio", "flops_ratio_paper", "score", "n", "metric:accuracy"} <= set(rows[0])
    assert float(rows[1]["flops_ratio"]) == pytest.approx(himap.flops_ratio)
    assert json.loads((root / "summary.json").read_text())["configs"][2]["slug"] == "fastv_k-1_r-0.5"
    assert "FLOPs ratio" in _render(results)


def _render(results) -> str:
    from rich.console import Console

    console = Console(record=True, width=200)
    results.print(console)
    return console.export_text()


class _Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted(env, samples, full_run, tmp_path):
    full_out, full = full_run
    methods = "dense,fastv(k=1,r=0.5)"
    seen: list[str] = []

    def kill_after_5(spec, record):
        seen.append(record["id"])
        if len(seen) == 5:  # mid-batch (batch size 3)
            raise _Killed

    with pytest.raises(_Killed):
        evaluate(
            env.model,
            env.processor,
            "synthetic",
            samples,
            methods,
            tmp_path,
            batch_size=3,
            max_new_tokens=NEW,
            on_record=kill_after_5,
        )
    folder = tmp_path / "synthetic" / env.model_dir.name / "dense"
    part = folder / "predictions.part0.jsonl"
    assert len(read_predictions(part)) == 5 and not (folder / PREDICTIONS).exists()
    # a write cut short by the kill: half of the next line, no newline
    line = json.dumps({"id": samples[5].id, "output": "cut sh"})
    with part.open("a") as f:
        f.write(line[: len(line) // 2])

    resumed: list[str] = []
    results = evaluate(
        env.model,
        env.processor,
        "synthetic",
        samples,
        methods,
        tmp_path,
        batch_size=3,
        max_new_tokens=NEW,
        on_record=lambda spec, rec: resumed.append(f"{spec.name}:{rec['id']}"),
    )
    ids = [s.id for s in samples]
    assert resumed == [f"dense:{i}" for i in ids[5:]] + [f"fastv:{i}" for i in ids]  # nothing twice
    for slug in ("dense", "fastv_k-1_r-0.5"):
        got = (tmp_path / "synthetic" / env.model_dir.name / slug / PREDICTIONS).read_bytes()
        want = (full_out / "synthetic" / env.model_dir.name / slug / PREDICTIONS).read_bytes()
        assert got == want
    assert results["dense"].metrics == full["dense"].metrics

    # a finished run generates nothing; another max_new_tokens in the same folder is refused
    again: list[str] = []
    evaluate(
        env.model,
        env.processor,
        "synthetic",
        samples,
        methods,
        tmp_path,
        batch_size=3,
        max_new_tokens=NEW,
        on_record=lambda spec, rec: again.append(rec["id"]),
    )
    assert again == []
    with pytest.raises(ValueError, match="holds results of another configuration"):
        evaluate(env.model, env.processor, "synthetic", samples, "dense", tmp_path, max_new_tokens=NEW + 1)


def test_sharding_covers_every_sample_once(env, samples, tmp_path):
    methods = "fastv(k=1,r=0.5)"
    single = evaluate(
        env.model, env.processor, "synthetic", samples, methods, tmp_path / "single", max_new_tokens=NEW
    )
    out = tmp_path / "sharded"
    folder = out / "synthetic" / env.model_dir.name / "fastv_k-1_r-0.5"
    # a stale shard of an earlier 3-process run that finished one sample, plus a cut line
    folder.mkdir(parents=True)
    first = read_predictions(single["fastv_k-1_r-0.5"].directory / PREDICTIONS)
    (folder / "predictions.part2.jsonl").write_text(json.dumps(first[2]) + "\n" + '{"id": "x", "out')
    written: dict[int, list[str]] = {0: [], 1: []}
    for rank in (0, 1):
        partial = evaluate(
            env.model,
            env.processor,
            "synthetic",
            samples,
            methods,
            out,
            rank=rank,
            world_size=2,
            max_new_tokens=NEW,
            on_record=lambda spec, rec, r=rank: written[r].append(rec["id"]),
        )
        assert partial.summary_csv is None  # no merge without a process group
    ids = [s.id for s in samples]
    assert written[0] == [i for i in ids[0::2] if i != ids[2]]
    assert written[1] == ids[1::2]
    merged = finalize(out, "synthetic", samples, methods, env.model_dir.name)
    again = finalize(out, "synthetic", samples, methods, env.model_dir.name)  # idempotent
    records = read_predictions(folder / PREDICTIONS)
    assert [r["id"] for r in records] == ids
    assert [r["output"] for r in records] == [r["output"] for r in first]  # batch size 1: same generations
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metrics.json", "predictions.jsonl"]
    assert merged.configs[0].metrics == again.configs[0].metrics == single.configs[0].metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_processes(env, tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "out"
    launch = "-m accelerate.commands.launch --num_processes 2 --cpu --num_machines 1 --mixed_precision no"
    launch += f" --dynamo_backend no --main_process_port {_free_port()}"
    run = f"-m himap_vlm eval --model {env.model_dir} --task synthetic --data {env.data_dir} --out {out}"
    run += " --methods dense,fastv(k=1,r=0.5) --limit 5 --batch-size 2 --max-new-tokens 2 --no-progress"
    cmd = [sys.executable, *launch.split(), *run.split()]
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=environ)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = out / "synthetic" / env.model_dir.name
    ids = [s.id for s in get_task("synthetic").load(env.data_dir, limit=5)]
    for slug in ("dense", "fastv_k-1_r-0.5"):
        assert [r["id"] for r in read_predictions(root / slug / PREDICTIONS)] == ids
        assert not list((root / slug).glob("predictions.part*"))
    with (root / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["n"] for r in rows] == ["5", "5"]
    assert proc.stdout.count("himap eval") == 1  # one table, from rank 0


# ------------------------------------------------------------------ CLI
def test_cli_eval_runs_and_resumes(env, tmp_path):
    args = ["eval", "--model", str(env.model_dir), "--task", "synthetic", "--data", str(env.data_dir)]
    args += ["--out", str(tmp_path), "--methods", "dense", "--methods", "himap"]
    args += "--method-args himap:k1=1,r1=0.5,k2=2,r2=0.5 --limit 4 --batch-size 2 --max-new-tokens 2".split()
    args += ["--no-progress"]
    res = cli.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "FLOPs ratio" in res.stdout and "samples/s" in res.stdout and "himap(k1=1" in res.stdout
    res = cli.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [c["slug"] for c in data["configs"]] == ["dense", "himap_k1-1_r1-0.5_k2-2_r2-0.5"]
    assert data["configs"][0]["n_samples"] == 4 and data["configs"][1]["flops_ratio"] < 1
    assert data["configs"][0]["samples_per_second"] is None  # resumed: nothing left to generate


def _cli_error(args: list[str]) -> str:
    res = cli.invoke(app, ["eval", *args])
    assert res.exit_code == 2, res.output
    return res.output


def _eval_args(env, data, out, *extra):
    return [
        "--model",
        str(env.model_dir),
        "--task",
        "synthetic",
        "--data",
        str(data),
        "--out",
        str(out),
    ] + list(extra)


def test_cli_unknown_task(env, tmp_path):
    out = _cli_error(["--model", str(env.model_dir), "--task", "nosuchtask", "--out", str(tmp_path)])
    assert "Unknown task 'nosuchtask'" in out and "synthetic" in out


def test_cli_missing_image(env, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(env.data_dir, data)
    first = json.loads((data / "test.jsonl").read_text().splitlines()[0])
    (data / first["image"]).unlink()
    out = _cli_error(_eval_args(env, data, tmp_path / "out"))
    assert "missing image" in out and first["id"] in out


def test_cli_malformed_record(env, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(env.data_dir, data)
    lines = (data / "test.jsonl").read_text().splitlines()
    bad = json.loads(lines[3])
    del bad["question"]
    lines[3] = json.dumps(bad)
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    out = _cli_error(_eval_args(env, data, tmp_path / "out"))
    assert "malformed data" in out and "line 4" in out and "question" in out


def test_cli_bad_methods(env, tmp_path):
    out = _cli_error(_eval_args(env, env.data_dir, tmp_path, "--methods", "himap(k1=2,bogus=1)"))
    assert "does not take 'bogus'" in out
    out = _cli_error(_eval_args(env, env.data_dir, tmp_path, "--methods", "fastv(k=9)", "--limit", "1"))
    assert "k=9 is out of range for this model" in out
    out = _cli_error(_eval_args(env, env.data_dir / "nope", tmp_path))
    assert "does not exist" in out


def test_bare_names_take_defaults_for_the_model_depth(env, samples, tmp_path):
    """On the 4-layer tiny model ``himap`` is defaults_for(4) (k2=3), as bench and demo read it --
    not the 32-layer constructor default (k2=8), which does not even fit."""
    two = samples[:2]
    results = evaluate(env.model, env.processor, "synthetic", two, "dense,himap,vtw", tmp_path, max_new_tokens=1)
    assert [c.slug for c in results.configs] == ["dense", "himap_k1-2_r1-0.5_k2-3_r2-0.75", "vtw_k-2"]
    assert results.configs[1].config == {"k1": 2, "r1": 0.5, "k2": 3, "r2": 0.75, "swap_criteria": False}
    again = finalize(tmp_path, "synthetic", two, "dense,himap,vtw", results.model, num_layers=4)
    assert [c.slug for c in again.configs] == [c.slug for c in results.configs]
    assert [c.n_samples for c in again.configs] == [2, 2, 2]
    args = _eval_args(env, env.data_dir, tmp_path / "cli", "--methods", "himap", "--limit", "2")
    res = cli.invoke(app, ["eval", *args, "--max-new-tokens", "1", "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    assert [c["slug"] for c in json.loads(res.stdout)["configs"]] == ["himap_k1-2_r1-0.5_k2-3_r2-0.75"]
