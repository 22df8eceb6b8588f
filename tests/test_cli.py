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
            "--prompt", "what is in the picture ?", "--method", "himap", "--k1", "1", "--r1", "0.5",
            "--k2", "2", "--r2", "0.75", "--max-new-tokens", "3", "--json", "--compare", "--repeats", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["image_tokens_per_layer"] == [16, 8, 2, 2]
    assert data["prefill_ms_dense"] > 0 and data["prefill_ms_pruned"] > 0
    assert isinstance(data["answer"], str)


def test_generate_text_summary(tiny_dir):
    res = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--image", str(tiny_dir / "example.png"),
                              "--prompt", "describe", "--method", "fastv", "--k", "2", "--r", "0.5",
                              "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert "L0-1: 16 · L2-3: 8" in res.output


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "fastv", "--k1", "2"], "method 'fastv' does not take --k1"),
        (["--method", "himap", "--k1", "3", "--k2", "2"], "k2=2 must be greater than k1=3"),
        (["--method", "fastv", "--k", "9"], "k=9 is out of range for this model"),
        (["--method", "nope"], "unknown method 'nope'"),
        (["--method", "fastv", "--method-arg", "oops"], "--method-arg expects KEY=VALUE"),
    ],
)
def test_generate_bad_options(tiny_dir, extra, message):
    res = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--image", str(tiny_dir / "example.png"),
                              "--prompt", "x", *extra])
    assert res.exit_code == 2
    assert message in res.output


def test_generate_missing_files(tiny_dir, tmp_path):
    res = runner.invoke(app, ["generate", "--model", str(tmp_path / "nope"), "--image", str(tiny_dir / "example.png"),
                              "--prompt", "x", "--method", "dense"])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--image", str(tmp_path / "missing.png"),
                              "--prompt", "x", "--method", "dense"])
    assert res.exit_code == 2 and "image file not found" in res.output
