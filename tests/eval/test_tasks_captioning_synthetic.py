"""NoCaps/Flickr30k captioning (CIDEr) and the himap synthetic benchmark."""

from __future__ import annotations

from pathlib import Path

import pytest
from _eval_helpers import make_image, pil, save_hf, write_json, write_jsonl

from himap_vlm.apps.eval import DataFormatError, get_task
from himap_vlm.apps.eval.metrics import cider_d

CAPTION = "Provide a one-sentence caption for the provided image."


# --------------------------------------------------------------------------- captioning


def _nocaps(root: Path) -> Path:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        make_image(root / "validation" / name)
    return write_json(
        root / "nocaps_val_4500_captions.json",
        {
            "images": [
                {"id": 0, "file_name": "a.jpg", "domain": "in-domain"},
                {"id": 1, "file_name": "b.jpg", "domain": "out-domain"},
                {"id": 2, "file_name": "c.jpg", "domain": "out-domain"},
            ],
            "annotations": [
                {"image_id": 0, "id": 10, "caption": "A man riding a bike down the street."},
                {"image_id": 0, "id": 11, "caption": "A person rides a bicycle."},
                {"image_id": 1, "id": 12, "caption": "A jellyfish floating in the sea."},
                {"image_id": 2, "id": 13, "caption": "Two owls sitting on a branch."},
            ],
        },
    )


def test_nocaps_coco_layout_and_domains(tmp_path: Path) -> None:
    _nocaps(tmp_path)
    task = get_task("nocaps")
    samples = task.load(tmp_path)
    assert [s.id for s in samples] == ["0", "1", "2"]
    assert samples[0].answer == ["A man riding a bike down the street.", "A person rides a bicycle."]
    assert task.prompt(samples[0]) == CAPTION and task.max_new_tokens >= 32
    preds = ["A man riding a bike down the street.", "A jellyfish floating in the sea.", "a dog"]
    m = task.evaluate(samples, preds)
    corpus, _ = cider_d(preds, [s.answer for s in samples])
    assert m["cider"] == pytest.approx(100 * corpus)
    # each domain is scored on its own subset
    out_domain, _ = cider_d(preds[1:], [s.answer for s in samples[1:]])
    assert m["cider/out-domain"] == pytest.approx(100 * out_domain)
    assert "cider/in-domain" in m and m["n"] == 3


def test_caption_missing_annotation_is_an_error(tmp_path: Path) -> None:
    f = _nocaps(tmp_path)
    data = f.read_text().replace('{"image_id": 2, "id": 13, "caption": "Two owls sitting on a branch."}', "")
    f.write_text(data.replace(", ]", "]"))
    with pytest.raises(DataFormatError, match=r"images entry 2.*no caption"):
        get_task("nocaps").load(f)


def test_flickr30k_karpathy_layout(tmp_path: Path) -> None:
    make_image(tmp_path / "flickr30k-images" / "1.jpg")
    make_image(tmp_path / "flickr30k-images" / "2.jpg")
    write_json(
        tmp_path / "dataset_flickr30k.json",
        {"images": [
            {"filename": "1.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "Two dogs run."}, {"raw": "Dogs running."}]},
            {"filename": "2.jpg", "imgid": 1, "split": "train", "sentences": [{"raw": "A cat."}]},
            {"filename": "2.jpg", "imgid": 2, "split": "test", "sentences": [{"raw": "A cat sleeps."}]},
        ]},
    )  # fmt: skip
    task = get_task("flickr30k")
    samples = task.load(tmp_path)
    assert [s.id for s in samples] == ["0", "2"]
    assert task.load(tmp_path, split="train")[0].answer == ["A cat."]
    m = task.evaluate(samples, ["two dogs run", "a cat sleeps"])
    assert m["cider"] > 0 and "cider/in-domain" not in m


def test_caption_jsonl_and_hf(tmp_path: Path) -> None:
    make_image(tmp_path / "x.png")
    f = write_jsonl(tmp_path / "caps.jsonl", [{"id": "x", "image": "x.png", "captions": ["a red square"]}])
    (s,) = get_task("flickr30k").load(f)
    assert s.answer == ["a red square"]
    src = save_hf(
        tmp_path / "hf",
        {
            "image": [pil(0), pil(1)],
            "img_id": ["5", "6"],
            "caption": [["a red square", "red"], ["a green square"]],
        },
    )
    samples = get_task("flickr30k").load(src)
    assert [(s.id, s.answer) for s in samples] == [("5", ["a red square", "red"]), ("6", ["a green square"])]
    m = get_task("flickr30k").evaluate(samples, ["a red square", "nothing"])
    assert m["cider"] > 0


# --------------------------------------------------------------------------- synthetic


def _synthetic(root: Path) -> Path:
    for i in range(3):
        make_image(root / "images" / f"{i}.png", color=i)
    return write_jsonl(
        root / "bench.jsonl",
        [
            {"id": "c0", "image": "images/0.png", "question": "What colour is the square?", "answer": "red",
             "family": "color"},
            {"id": "n0", "image": "images/1.png", "question": "How many circles are there?", "answer": "3",
             "family": "count"},
            {"id": "m0", "image": "images/2.png",
             "question": "Which shape is largest?\nA. circle\nB. square\nC. star", "answer": "B", "family": "choice"},
        ],
    )  # fmt: skip


def test_synthetic_loader_prompts_and_families(tmp_path: Path) -> None:
    _synthetic(tmp_path)
    task = get_task("synthetic")
    samples = task.load(tmp_path)  # the folder's single .jsonl
    assert [s.id for s in samples] == ["c0", "n0", "m0"]
    assert samples[2].load_image().getpixel((0, 0)) == (0, 0, 255)
    assert (
        task.prompt(samples[0])
        == "What colour is the square?\nAnswer the question using a single word or phrase."
    )
    assert task.prompt(samples[2]).endswith(
        "C. star\nAnswer with the option's letter from the given choices directly."
    )
    m = task.evaluate(samples, ["Red.", "three", "(B)"])
    assert m == {
        "accuracy": 100.0,
        "n": 3,
        "accuracy/choice": 100.0,
        "accuracy/color": 100.0,
        "accuracy/count": 100.0,
    }
    m = task.evaluate(samples, ["The square is red", "3", "A"])
    assert (
        m["accuracy"] == pytest.approx(100 / 3)
        and m["accuracy/count"] == 100.0
        and m["accuracy/choice"] == 0.0
    )


@pytest.mark.parametrize(("text", "ok"), [("B", True), ("B.", True), ("(B)", True), ("B. square", True),
                                          ("square", True), ("b", False), ("A", False), ("Both", False)])  # fmt: skip
def test_synthetic_letter_answers(tmp_path: Path, text: str, ok: bool) -> None:
    _synthetic(tmp_path)
    task = get_task("synthetic")
    sample = task.load(tmp_path)[2]
    assert task.score_sample(sample, task.parse(sample, text)) == (1.0 if ok else 0.0)


def test_synthetic_folder_needs_one_file(tmp_path: Path) -> None:
    _synthetic(tmp_path)
    write_jsonl(tmp_path / "other.jsonl", [])
    with pytest.raises(FileNotFoundError, match="bench.jsonl, other.jsonl"):
        get_task("synthetic").load(tmp_path)
    assert len(get_task("synthetic").load(tmp_path, split="bench")) == 3
