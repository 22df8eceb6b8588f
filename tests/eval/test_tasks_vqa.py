"""GQA, VQAv2 and TextVQA: loaders, prompts and scoring."""

from __future__ import annotations

from pathlib import Path

import pytest
from _eval_helpers import make_image, pil, save_hf, write_json, write_jsonl

from himap_vlm.apps.eval import DataFormatError, get_task

SHORT = "Answer the question using a single word or phrase."
TEN_DOGS = ["dog"] * 10


# --------------------------------------------------------------------------- GQA


def test_gqa_llava_layout_with_release_answers(tmp_path: Path) -> None:
    make_image(tmp_path / "data" / "images" / "n1.jpg")
    make_image(tmp_path / "data" / "images" / "n2.jpg")
    write_jsonl(
        tmp_path / "llava_gqa_testdev_balanced.jsonl",
        [
            {"question_id": "201", "image": "n1.jpg", "text": f"Is the sky dark?\n{SHORT}"},
            {"question_id": "202", "image": "n2.jpg", "text": "What is on the table?"},
        ],
    )
    write_json(
        tmp_path / "data" / "testdev_balanced_questions.json",
        {"201": {"imageId": "n1", "question": "Is the sky dark?", "answer": "no"},
         "202": {"imageId": "n2", "question": "What is on the table?", "answer": "laptop"}},
    )  # fmt: skip
    task = get_task("gqa")
    samples = task.load(tmp_path)
    assert [(s.id, s.answer) for s in samples] == [("201", "no"), ("202", "laptop")]
    assert task.prompt(samples[0]) == f"Is the sky dark?\n{SHORT}"
    assert task.evaluate(samples, ["No.", " Laptop "]) == {"accuracy": 100.0, "n": 2}
    assert task.evaluate(samples, ["no", "a laptop"])["accuracy"] == 50.0  # exact match, no article removal


def test_gqa_release_file_and_hf(tmp_path: Path) -> None:
    make_image(tmp_path / "images" / "n7.jpg")
    f = write_json(
        tmp_path / "testdev_balanced_questions.json",
        {"9": {"imageId": "n7", "question": "Q?", "answer": "yes"}},
    )
    task = get_task("gqa")
    (s,) = task.load(f)
    assert (s.id, s.answer, s.question) == ("9", "yes", "Q?")
    # a HF dataset that names images by imageId needs image_dir
    src = save_hf(
        tmp_path / "hf",
        {"id": ["9"], "imageId": ["n7"], "question": ["Q?"], "answer": ["yes"]},
        image_column=None,
    )
    with pytest.raises(ValueError, match="image_dir"):
        task.load(src)
    (h,) = task.load(src, image_dir=tmp_path / "images")
    assert h.load_image() is not None


# --------------------------------------------------------------------------- VQAv2


def test_vqav2_llava_layout_with_annotations(tmp_path: Path) -> None:
    make_image(tmp_path / "val2014" / "COCO_val2014_000000000009.jpg")
    write_jsonl(
        tmp_path / "llava_vqav2_mscoco_val2014.jsonl",
        [
            {"question_id": 91, "image": "COCO_val2014_000000000009.jpg", "text": f"How many dogs?\n{SHORT}"},
            {"question_id": 92, "image": "COCO_val2014_000000000009.jpg", "text": f"What animal?\n{SHORT}"},
        ],
    )
    write_json(
        tmp_path / "annotations.json",
        {"annotations": [
            {"question_id": 91, "answers": [{"answer": "2"}] * 3 + [{"answer": "3"}] * 7, "answer_type": "number"},
            {"question_id": 92, "answers": [{"answer": "dog"}] * 10, "answer_type": "other"},
        ]},
    )  # fmt: skip
    task = get_task("vqav2")
    samples = task.load(tmp_path, annotations=tmp_path / "annotations.json")
    assert task.prompt(samples[0]) == f"How many dogs?\n{SHORT}"
    m = task.evaluate(samples, ["Two", "A dog."])
    assert m["accuracy/number"] == pytest.approx(90.0)
    assert m["accuracy/other"] == pytest.approx(100.0)
    assert m["accuracy"] == pytest.approx(95.0)
    # without answers (test-dev): loaded, not scored
    unscored = task.load(tmp_path)
    assert all(s.answer is None for s in unscored)
    assert task.evaluate(unscored, ["2", "dog"]) == {"n": 0, "n_unscored": 2}
    with pytest.raises(FileNotFoundError, match="Annotation file not found"):
        task.load(tmp_path, annotations=tmp_path / "nope.json")


def test_vqav2_release_layout_and_hf(tmp_path: Path) -> None:
    make_image(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    write_json(
        tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
        {
            "data_subtype": "val2014",
            "questions": [{"image_id": 42, "question": "Is it sunny?", "question_id": 420}],
        },
    )
    write_json(
        tmp_path / "v2_mscoco_val2014_annotations.json",
        {"annotations": [{"question_id": 420, "answers": [{"answer": "yes"}] * 10, "answer_type": "yes/no"}]},
    )
    task = get_task("vqav2")
    (s,) = task.load(tmp_path)
    assert (s.id, s.answer, s.meta["answer_type"]) == ("420", ["yes"] * 10, "yes/no")
    assert s.load_image() is not None
    src = save_hf(
        tmp_path / "hf",
        {"image": [pil(0)], "question_id": [5], "question": ["What?"], "answer_type": ["other"],
         "answers": [[{"answer": "cat", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)]]},
    )  # fmt: skip
    (h,) = task.load(src)
    assert (
        h.answer == ["cat"] * 10
        and task.score_sample(h, "Cats") == 0.0
        and task.score_sample(h, "cat") == 1.0
    )


def test_vqav2_malformed_answers(tmp_path: Path) -> None:
    make_image(tmp_path / "a.jpg")
    f = write_jsonl(
        tmp_path / "llava_vqav2_x.jsonl",
        [{"question_id": 1, "image": "a.jpg", "text": "q", "answers": "dog"}],
    )
    with pytest.raises(DataFormatError, match=r"line 1.*must be a list"):
        get_task("vqav2").load(f, image_dir=tmp_path)


# --------------------------------------------------------------------------- TextVQA


def test_textvqa_llava_layout(tmp_path: Path) -> None:
    make_image(tmp_path / "train_images" / "abc123.jpg")
    text = f"what brand is the phone?\nReference OCR token: NOKIA, 3310\n{SHORT}"
    write_jsonl(
        tmp_path / "llava_textvqa_val_v051_ocr.jsonl",
        [
            {"question_id": "abc123", "image": "abc123.jpg", "text": text},
            {"question_id": "abc123", "image": "abc123.jpg", "text": f"what number is shown?\n{SHORT}"},
        ],
    )
    write_json(
        tmp_path / "TextVQA_0.5.1_val.json",
        {"data": [
            {"question_id": 1, "image_id": "abc123", "question": "What brand is the phone?", "answers": ["nokia"] * 10},
            {"question_id": 2, "image_id": "abc123", "question": "what number is shown?",
             "answers": ["3310"] * 2 + ["3210"] * 8},
        ]},
    )  # fmt: skip
    task = get_task("textvqa")
    samples = task.load(tmp_path)
    assert [s.id for s in samples] == ["abc123", "abc123#1"]
    assert task.prompt(samples[0]) == text  # LLaVA's prompt is reproduced exactly
    assert task.prompt(samples[1]) == f"what number is shown?\n{SHORT}"
    m = task.evaluate(samples, ["Nokia", "3310"])
    assert m["accuracy"] == pytest.approx((100.0 + 60.0) / 2)


def test_textvqa_release_and_hf(tmp_path: Path) -> None:
    make_image(tmp_path / "train_images" / "img1.jpg")
    write_json(
        tmp_path / "TextVQA_0.5.1_val.json",
        {"data": [{"question_id": 7, "image_id": "img1", "question": "what time is it?",
                   "answers": ["10:30"] * 10, "ocr_tokens": ["10:30", "clock"]}]},
    )  # fmt: skip
    task = get_task("textvqa")
    (s,) = task.load(tmp_path)
    assert task.prompt(s) == f"what time is it?\nReference OCR token: 10:30, clock\n{SHORT}"
    assert task.score_sample(s, "10:30") == 1.0
    src = save_hf(
        tmp_path / "hf",
        {
            "image": [pil(1)],
            "question_id": [3],
            "question": ["what?"],
            "answers": [["stop"] * 10],
            "ocr_tokens": [[]],
        },
    )
    (h,) = task.load(src)
    assert task.prompt(h) == f"what?\nReference OCR token: \n{SHORT}"
    assert get_task("textvqa", use_ocr_tokens=False).prompt(h) == f"what?\n{SHORT}"
