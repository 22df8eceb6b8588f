"""Bad input to ``himap eval`` / ``demo`` / ``calibrate``: one line, exit status 2, before loading where possible."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from _runner_helpers import single_thread, tiny_eval_env
from typer.testing import CliRunner

from himap_vlm.apps.cli import _load_commands, app

_load_commands()
cli = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_eval_env(tmp_path_factory)


def _variant(env, folder: Path, **config) -> Path:
    """A copy of the tiny model folder with ``config.json`` fields replaced."""
    shutil.copytree(env.model_dir, folder)
    data = json.loads((folder / "config.json").read_text())
    data.update(config)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def weightless(env, tmp_path_factory) -> Path:
    """A model folder whose weights are missing: any command that loads it fails loading."""
    folder = _variant(env, tmp_path_factory.mktemp("weightless") / "model")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    return folder


def _error(args: list[str]) -> str:
    res = cli.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output  # one line, no traceback
    return lines[0]


def _eval(model, out, *extra, data=None):
    args = ["eval", "--model", str(model), "--task", "synthetic", "--out", str(out), "--no-progress"]
    if data is not None:
        args += ["--data", str(data)]
    return [*args, *extra]


def test_out_below_a_file_or_a_file(env, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _error(_eval(env.model_dir, afile / "sub", data=env.data_dir))
    assert "cannot be created" in line and "is a file" in line
    line = _error(_eval(env.model_dir, afile, data=env.data_dir))
    assert "is a file, not a folder" in line
    line = _error(["demo", "--model", str(env.model_dir), "--out", str(afile / "sub"), "--n", "2"])
    assert "cannot be created" in line
    assert not (tmp_path / "afile").is_dir()


@pytest.mark.skipif(sys.platform != "linux", reason="uses /proc, where no file can be created")
def test_out_that_cannot_be_written(env, tmp_path):
    line = _error(_eval(env.model_dir, "/proc/himap-out/run", data=env.data_dir))
    assert "cannot be written" in line and "'/proc'" in line
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            line = _error(_eval(env.model_dir, ro / "out", data=env.data_dir))
            assert "cannot be written" in line and "Permission denied" in line
        finally:
            ro.chmod(0o755)


def test_checked_before_the_model_is_loaded(env, weightless, tmp_path):
    """Spec errors, depth errors, tasks and --out are found from the files: the weights are never read."""
    line = _error(_eval(weightless, tmp_path, "--methods", "fastv(k=9)", data=env.data_dir))
    assert line == "error: fastv: k=9 is out of range for this model: it has 4 decoder layers, so k must be in [1, 3]"
    line = _error(_eval(weightless, tmp_path, "--methods", "himap(k1=2,bogus=1)", data=env.data_dir))
    assert "does not take 'bogus'" in line
    line = _error(_eval(weightless, tmp_path, "--methods", "dense,", data=env.data_dir))
    assert "empty entry" in line
    line = _error(["eval", "--model", str(weightless), "--task", "nosuchtask", "--out", str(tmp_path)])
    assert "Unknown task 'nosuchtask'" in line
    line = _error(_eval(weightless, tmp_path, "--instructions", "sometimes", data=env.data_dir))
    assert "--instructions must be one of auto, task, none" in line
    line = _error(["demo", "--model", str(weightless), "--out", str(tmp_path), "--methods", "vtw(k=7)"])
    assert "k=7 is out of range" in line
    line = _error(["demo", "--model", str(weightless), "--out", str(tmp_path), "--methods", "nope"])
    assert "unknown method 'nope'" in line
    line = _error(_eval(tmp_path / "missing", tmp_path, data=env.data_dir))
    assert "does not exist" in line
    # and a model that cannot be loaded is one line too
    line = _error(_eval(weightless, tmp_path, data=env.data_dir))
    assert "cannot load the model" in line


@pytest.mark.parametrize(
    "config,message",
    [
        ({"image_token_id": 999}, "config.image_token_id=999 is not a token of the language model"),
        ({"image_token_id": None}, "config.image_token_id=None is not a token of the language model"),
        ({"image_token_id": 5}, "config.image_token_id=5 but the processor writes '<image>'"),
    ],
    ids=["outside-vocabulary", "missing", "not-the-processor's"],
)
def test_unusable_image_token_id(env, tmp_path, config, message):
    model = _variant(env, tmp_path / "model", **config)
    assert message in _error(_eval(model, tmp_path / "out", data=env.data_dir))
    assert message in _error(["demo", "--model", str(model), "--out", str(tmp_path / "d"), "--n", "2"])
    records = tmp_path / "calib.jsonl"
    shutil.copy(env.data_dir / "test.jsonl", records)
    shutil.copytree(env.data_dir / "images", tmp_path / "images")
    assert message in _error(["calibrate", "vtw", "--model", str(model), "--data", str(records), "--start", "1"])
    assert not (tmp_path / "out").exists()


def test_library_checks_the_image_token_before_any_forward(env):
    """calibrate_vtw refuses an unusable image_token_id with the engine's message, not a forward's error."""
    from himap_vlm.apps.calibrate import calibrate_vtw
    from himap_vlm.apps.eval import get_task

    sample = get_task("synthetic").load(env.data_dir, limit=1)[0]
    records = [{"image": sample.load_image(), "question": sample.question}]
    before = env.model.config.image_token_id
    env.model.config.image_token_id = 999
    try:
        with pytest.raises(ValueError, match="is not a token of the language model"):
            calibrate_vtw(env.model, env.processor, records, start=1)
    finally:
        env.model.config.image_token_id = before


def test_device_without_cuda(env, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = _error(_eval(env.model_dir, tmp_path, "--device", "cuda", "--limit", "1", data=env.data_dir))
    assert "CUDA is not available" in line
