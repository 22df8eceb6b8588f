"""POPE and MME: loaders, prompts, LLaVA/official answer parsing and the metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from _eval_helpers import make_image, pil, save_hf, write_jsonl

from himap_vlm.apps.eval import DataFormatError, Sample, get_task
from himap_vlm.apps.eval.tasks.mme import parse_mme_answer
from himap_vlm.apps.eval.tasks.pope import parse_pope_answer

SHORT = "Answer the question using a single word or phrase."


# --------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the picture", "no"),
        ("Yes. No.", "yes"),
        (" No\n", "no"),
        ("Nope", "yes"),  # LLaVA's rule only looks for the words No/no/not
        ("", "yes"),
    ],
)
def test_pope_parsing_follows_llava(text: str, expected: str) -> None:
    assert parse_pope_answer(text) == expected


def _pope_samples(category: str, preds_labels: list[tuple[str, str]]) -> tuple[list[Sample], list[str]]:
    samples = [
        Sample(f"{category}/{i}", None, "q", y, {"category": category})
        for i, (_, y) in enumerate(preds_labels)
    ]
    return samples, [p for p, _ in preds_labels]


def test_pope_metrics_per_split_and_pooled() -> None:
    task = get_task("pope")
    # random: TP=3 FP=1 TN=4 FN=2 ; adversarial: TP=1 FP=1 TN=1 FN=1
    r = [("yes", "yes")] * 3 + [("yes", "no")] + [("no", "no")] * 4 + [("no", "yes")] * 2
    a = [("yes", "yes"), ("yes", "no"), ("no", "no"), ("no", "yes")]
    s1, p1 = _pope_samples("random", r)
    s2, p2 = _pope_samples("adversarial", a)
    m = task.metrics(s1 + s2, p1 + p2)
    assert m["random/accuracy"] == pytest.approx(70.0)
    assert m["random/precision"] == pytest.approx(75.0)
    assert m["random/recall"] == pytest.approx(60.0)
    assert m["random/f1"] == pytest.approx(100 * 0.9 / 1.35)
    assert m["random/yes_ratio"] == pytest.approx(40.0)
    assert m["random/n"] == 10
    assert m["adversarial/f1"] == pytest.approx(50.0)
    assert m["f1_mean"] == pytest.approx((100 * 0.9 / 1.35 + 50.0) / 2)
    assert m["accuracy_mean"] == pytest.approx((70.0 + 50.0) / 2)
    # pooled: TP=4 FP=2 TN=5 FN=3 over 14
    assert m["accuracy"] == pytest.approx(100 * 9 / 14)
    assert m["precision"] == pytest.approx(100 * 4 / 6)
    assert m["recall"] == pytest.approx(100 * 4 / 7)
    assert m["n"] == 14
    assert task.primary_metric in m


def _pope_llava(root: Path) -> None:
    make_image(root / "val2014" / "COCO_val2014_000000000001.jpg")
    make_image(root / "val2014" / "COCO_val2014_000000000002.jpg")
    write_jsonl(
        root / "llava_pope_test.jsonl",
        [
            {"question_id": 1, "image": "COCO_val2014_000000000001.jpg",
             "text": f"Is there a dog in the image?\n{SHORT}", "category": "random"},
            {"question_id": 2, "image": "COCO_val2014_000000000002.jpg",
             "text": "Is there a cat in the image?", "category": "adversarial"},
            {"question_id": 3, "image": "COCO_val2014_000000000001.jpg",
             "text": "Is there a car in the image?", "category": "random"},
        ],
    )  # fmt: skip
    write_jsonl(
        root / "coco" / "coco_pope_random.json",
        [
            {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog in the image?",
             "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a car in the image?",
             "label": "no"},
        ],
    )  # fmt: skip
    write_jsonl(
        root / "coco" / "coco_pope_adversarial.json",
        [{"question_id": 1, "image": "COCO_val2014_000000000002.jpg", "text": "Is there a cat in the image?",
          "label": "no"}],
    )  # fmt: skip


def test_pope_llava_layout(tmp_path: Path) -> None:
    _pope_llava(tmp_path)
    task = get_task("pope")
    samples = task.load(tmp_path)
    assert [(s.id, s.answer, s.meta["category"]) for s in samples] == [
        ("1", "yes", "random"),
        ("2", "no", "adversarial"),
        ("3", "no", "random"),
    ]
    assert samples[0].question == "Is there a dog in the image?"
    assert task.prompt(samples[0]) == f"Is there a dog in the image?\n{SHORT}"
    m = task.evaluate(samples, ["Yes", "No", "Yes, there is."])
    assert m["accuracy"] == pytest.approx(200 / 3)
    assert m["random/f1"] == pytest.approx(100 * 2 * 0.5 / 1.5)


def test_pope_label_mismatch_is_an_error(tmp_path: Path) -> None:
    _pope_llava(tmp_path)
    write_jsonl(
        tmp_path / "coco" / "coco_pope_adversarial.json",
        [{"question_id": 1, "image": "x.jpg", "text": "Is there a horse in the image?", "label": "no"}],
    )
    with pytest.raises(DataFormatError, match="horse"):
        get_task("pope").load(tmp_path)


def test_pope_annotation_files_and_hf(tmp_path: Path) -> None:
    _pope_llava(tmp_path)
    samples = get_task("pope").load(tmp_path / "coco", image_dir=tmp_path / "val2014")
    assert [s.id for s in samples] == ["adversarial/1", "random/1", "random/2"]
    src = save_hf(
        tmp_path / "hf",
        {"image": [pil(0), pil(1)], "question_id": ["1", "1"], "question": ["Is there a dog?", "Is there a cat?"],
         "answer": ["yes", "NO"], "category": ["random", "popular"]},
    )  # fmt: skip
    hf = get_task("pope").load(src)
    assert [(s.id, s.answer) for s in hf] == [("random/1", "yes"), ("popular/1", "no")]


# --------------------------------------------------------------------------- MME


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("Yes, it is.", "yes"),
        ("No.", "no"),
        ("Not sure", "no"),
        ("Maybe", "other"),
    ],
)
def test_mme_parsing_follows_official_rule(text: str, expected: str) -> None:
    assert parse_mme_answer(text) == expected


def test_mme_acc_plus_and_totals() -> None:
    task = get_task("mme")

    def pair(cat: str, img: str, golds: tuple[str, str]) -> list[Sample]:
        return [
            Sample(f"{cat}/{img}/{k}", None, "q", g, {"category": cat, "pair": f"{cat}/{img}"})
            for k, g in enumerate(golds)
        ]

    samples = (
        pair("existence", "1", ("yes", "no"))  # both right
        + pair("existence", "2", ("yes", "no"))  # one right
        + pair("OCR", "1", ("yes", "no"))  # both wrong
        + pair("code_reasoning", "1", ("yes", "no"))  # both right
    )
    preds = ["yes", "no", "yes", "yes", "no", "other", "yes", "no"]
    m = task.metrics(samples, preds)
    assert m["existence/acc"] == pytest.approx(75.0)
    assert m["existence/acc_plus"] == pytest.approx(50.0)
    assert m["existence/score"] == pytest.approx(125.0)
    assert m["OCR/score"] == 0.0
    assert m["code_reasoning/score"] == pytest.approx(200.0)
    assert m["perception"] == pytest.approx(125.0)
    assert m["cognition"] == pytest.approx(200.0)
    assert m["total"] == pytest.approx(325.0)
    assert m["n"] == 8


def _mme_release(root: Path) -> Path:
    rel = root / "MME_Benchmark_release_version"
    # SPLIT layout
    make_image(rel / "artwork" / "images" / "10002.jpg")
    (rel / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (rel / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork painted by Monet? Please answer yes or no.\tYes\n"
        "Is this artwork painted by Dali? Please answer yes or no.\tNo\n",
        encoding="utf-8",
    )
    # FLAT layout
    make_image(rel / "count" / "0001.png")
    (rel / "count" / "0001.txt").write_text(
        "Are there two dogs? Please answer yes or no.\tNo\nAre there three dogs? Please answer yes or no.\tYes\n\n",
        encoding="utf-8",
    )
    return rel


def test_mme_release_layout(tmp_path: Path) -> None:
    _mme_release(tmp_path)
    task = get_task("mme")
    samples = task.load(tmp_path)
    assert [(s.id, s.answer) for s in samples] == [
        ("artwork/10002/0", "yes"),
        ("artwork/10002/1", "no"),
        ("count/0001/0", "no"),
        ("count/0001/1", "yes"),
    ]
    assert task.prompt(samples[0]) == f"Is this artwork painted by Monet?\n{SHORT}"
    m = task.evaluate(samples, ["Yes", "No", "No", "No"])
    assert m["artwork/score"] == 200.0 and m["count/score"] == pytest.approx(50.0)
    assert m["perception"] == pytest.approx(250.0) and m["cognition"] == 0.0


def test_mme_llava_layout_answers_from_release(tmp_path: Path) -> None:
    _mme_release(tmp_path)
    write_jsonl(
        tmp_path / "llava_mme.jsonl",
        [
            {"question_id": "artwork/10002.jpg", "image": "artwork/10002.jpg",
             "text": f"Is this artwork painted by Dali?\n{SHORT}", "category": "artwork"},
            {"question_id": "count/0001.png", "image": "count/0001.png",
             "text": f"Are there three dogs?\n{SHORT}", "category": "count"},
        ],
    )  # fmt: skip
    task = get_task("mme")
    samples = task.load(tmp_path)
    assert [(s.id, s.answer) for s in samples] == [("artwork/10002/0", "no"), ("count/0001/0", "yes")]
    assert task.prompt(samples[0]) == f"Is this artwork painted by Dali?\n{SHORT}"
    assert samples[0].load_image() is not None
    write_jsonl(
        tmp_path / "llava_mme.jsonl",
        [
            {
                "question_id": "count/0001.png",
                "image": "count/0001.png",
                "text": "Are there nine dogs?",
                "category": "count",
            }
        ],
    )
    with pytest.raises(DataFormatError, match="nine dogs"):
        task.load(tmp_path)


def test_mme_hf_layout(tmp_path: Path) -> None:
    src = save_hf(
        tmp_path / "hf",
        {"question_id": ["code_reasoning/0020.png"] * 2, "image": [pil(0), pil(0)],
         "question": ["Is the output 3? Please answer yes or no.", "Is the output 4? Please answer yes or no."],
         "answer": ["Yes", "No"], "category": ["code_reasoning"] * 2},
    )  # fmt: skip
    task = get_task("mme")
    samples = task.load(src)
    assert [s.id for s in samples] == ["code_reasoning/0020.png/0", "code_reasoning/0020.png/1"]
    assert task.prompt(samples[1]) == f"Is the output 4?\n{SHORT}"
    m = task.evaluate(samples, ["Yes", "Yes"])
    assert m["code_reasoning/acc"] == 50.0 and m["code_reasoning/acc_plus"] == 0.0 and m["cognition"] == 50.0
