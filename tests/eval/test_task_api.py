"""The Task API: registry, Sample images, data-source resolution and the clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from _eval_helpers import make_image, pil, save_hf, write_jsonl
from PIL import Image

from himap_vlm.apps.eval import (
    DataFormatError,
    MissingImageError,
    Sample,
    Task,
    get_task,
    list_tasks,
    register_task,
)
from himap_vlm.apps.eval.io import HFImageRef

ALL_TASKS = [
    "aokvqa_mc",
    "flickr30k",
    "gqa",
    "mmbench",
    "mme",
    "nocaps",
    "pope",
    "scienceqa_img",
    "synthetic",
    "textvqa",
    "vqav2",
]


def test_registry_lists_every_task() -> None:
    assert list_tasks() == ALL_TASKS
    for name in ALL_TASKS:
        task = get_task(name)
        assert isinstance(task, Task)
        assert task.name == name
        assert task.max_new_tokens > 0


def test_get_task_is_lenient_on_case_and_dashes() -> None:
    assert get_task("ScienceQA-IMG").name == "scienceqa_img"


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="Unknown task 'sqa'") as info:
        get_task("sqa")
    for name in ALL_TASKS:
        assert name in str(info.value)


def test_register_task_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_task("pope", type(get_task("pope")))


def test_task_options_are_passed() -> None:
    task = get_task("textvqa", use_ocr_tokens=False)
    s = Sample("1", None, "what brand?", ["nokia"] * 10, {"ocr_line": "Reference OCR token: nokia"})
    assert task.prompt(s) == "what brand?\nAnswer the question using a single word or phrase."


def test_sample_load_image_variants(tmp_path: Path) -> None:
    path = make_image(tmp_path / "a.png", color=1)
    for source in (path, pil(1), lambda: pil(1).convert("L").convert("RGB")):
        img = Sample("x", source, "q", "a").load_image()
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (8, 8)
    assert Sample("x", None, "q", "a").load_image() is None
    gray = Sample("x", Image.new("L", (4, 4)), "q", "a").load_image()
    assert gray is not None and gray.mode == "RGB"
    with pytest.raises(MissingImageError, match=r"'x'.*gone\.png"):
        Sample("x", tmp_path / "gone.png", "q", "a").load_image()


def test_hf_images_are_decoded_lazily(tmp_path: Path) -> None:
    src = save_hf(
        tmp_path / "hf",
        {"image": [pil(0), pil(2)], "question": ["q0", "q1"], "answer": ["a", "b"], "family": ["f", "f"]},
    )
    samples = get_task("synthetic").load(src)
    assert all(isinstance(s.image, HFImageRef) for s in samples)
    img = samples[1].load_image()
    assert img is not None and img.getpixel((0, 0)) == (0, 0, 255)


def test_missing_data_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_task("pope").load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_task("pope").load("./relative/nowhere.jsonl")


def test_missing_image_names_sample_and_path(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.png")
    f = write_jsonl(
        tmp_path / "bench.jsonl",
        [
            {"id": "s1", "image": "ok.png", "question": "q", "answer": "a", "family": "f"},
            {"id": "s2", "image": "img/missing.png", "question": "q", "answer": "a", "family": "f"},
        ],
    )
    with pytest.raises(FileNotFoundError) as info:
        get_task("synthetic").load(f)
    assert isinstance(info.value, MissingImageError)
    assert "'s2'" in str(info.value) and "missing.png" in str(info.value)
    # check_images=False defers the error to load_image
    samples = get_task("synthetic").load(f, check_images=False)
    with pytest.raises(MissingImageError, match="s2"):
        samples[1].load_image()


def test_malformed_record_names_file_line_and_field(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.png")
    f = write_jsonl(
        tmp_path / "bench.jsonl",
        [
            {"id": "s1", "image": "ok.png", "question": "q", "answer": "a", "family": "f"},
            {"id": "s2", "image": "ok.png", "answer": "a", "family": "f"},
        ],
    )
    with pytest.raises(DataFormatError) as info:
        get_task("synthetic").load(f)
    msg = str(info.value)
    assert "bench.jsonl" in msg and "line 2" in msg and "'question'" in msg
    assert isinstance(info.value, ValueError)


def test_invalid_json_line(tmp_path: Path) -> None:
    f = tmp_path / "bench.jsonl"
    f.write_text('{"id": "s1"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bench\.jsonl, line 1: missing field"):
        get_task("synthetic").load(f)
    f.write_text('\n{"id": "s1", "image": "x.png", "question": "q", "answer": "a"\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"line 2: invalid JSON"):
        get_task("synthetic").load(f)


def test_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.png")
    rec = {"id": "same", "image": "ok.png", "question": "q", "answer": "a", "family": "f"}
    f = write_jsonl(tmp_path / "bench.jsonl", [rec, rec])
    with pytest.raises(DataFormatError, match="same"):
        get_task("synthetic").load(f)


def test_limit_and_lengths(tmp_path: Path) -> None:
    make_image(tmp_path / "ok.png")
    recs = [
        {"id": str(i), "image": "ok.png", "question": "q", "answer": "a", "family": "f"} for i in range(5)
    ]
    f = write_jsonl(tmp_path / "bench.jsonl", recs)
    task = get_task("synthetic")
    assert [s.id for s in task.load(f, limit=2)] == ["0", "1"]
    assert task.load(f, limit=0) == []
    with pytest.raises(ValueError):
        task.load(f, limit=-1)
    samples = task.load(f)
    with pytest.raises(ValueError, match="5 samples but 4"):
        task.evaluate(samples, ["a"] * 4)


def test_hf_split_selection(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    cols = {
        "image": [pil(0)],
        "question": ["q"],
        "answer": ["yes"],
        "category": ["random"],
        "question_id": [1],
    }
    dd = datasets.DatasetDict(
        {"test": datasets.Dataset.from_dict(cols), "other": datasets.Dataset.from_dict(cols)}
    ).cast_column("image", datasets.Image())
    dd.save_to_disk(str(tmp_path / "dd"))
    task = get_task("pope")
    assert len(task.load(tmp_path / "dd")) == 1  # the task's default split ("test")
    assert len(task.load(tmp_path / "dd", split="other")) == 1
    with pytest.raises(ValueError, match="available splits: test, other"):
        task.load(tmp_path / "dd", split="validation")
    # in-memory datasets objects work too
    assert len(task.load(dd)) == 1


def test_hf_string_image_column_uses_image_dir(tmp_path: Path) -> None:
    make_image(tmp_path / "imgs" / "a.png", color=3)
    src = save_hf(
        tmp_path / "hf",
        {"image": ["a.png"], "question": ["q"], "answer": ["a"], "family": ["f"], "id": ["x"]},
        image_column=None,
    )
    (s,) = get_task("synthetic").load(src, image_dir=tmp_path / "imgs")
    assert s.image == tmp_path / "imgs" / "a.png"
    with pytest.raises(MissingImageError, match="'x'"):
        get_task("synthetic").load(src, image_dir=tmp_path)
