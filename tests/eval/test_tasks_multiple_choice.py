"""ScienceQA-IMG, A-OKVQA (MC) and MMBench: loaders, prompts, parsing and accuracy."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from _eval_helpers import make_image, pil, save_hf, write_json

from himap_vlm.apps.eval import DataFormatError, MissingImageError, get_task

INSTR = "Answer with the option's letter from the given choices directly."


# --------------------------------------------------------------------------- ScienceQA


def _sqa_llava(root: Path) -> Path:
    conv = [
        {
            "id": "10",
            "image": "10/image.png",
            "conversations": [
                {
                    "from": "human",
                    "value": "<image>\nContext: Look at the map.\nWhich state is highlighted?\nA. Ohio\nB. Utah",
                },
                {"from": "gpt", "value": "B"},
            ],
        },
        {
            "id": "11",
            "conversations": [
                {"from": "human", "value": "Which word is a noun?\nA. run\nB. cat\nC. blue"},
                {"from": "gpt", "value": "The answer is B."},
            ],
        },
        {
            "id": "12",
            "image": "12/image.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is the temperature?\nA. 10°C\nB. 30°C\nC. 50°C"},
                {"from": "gpt", "value": "The answer is C."},
            ],
        },
    ]
    write_json(root / "llava_test_CQM-A.json", conv)
    make_image(root / "images" / "test" / "10" / "image.png")
    make_image(root / "images" / "test" / "12" / "image.png")
    return root


def test_scienceqa_llava_layout(tmp_path: Path) -> None:
    root = _sqa_llava(tmp_path)
    task = get_task("scienceqa_img")
    samples = task.load(root)
    assert [s.id for s in samples] == ["10", "12"]  # the text-only question is skipped
    s10, s12 = samples
    assert (
        task.prompt(s10)
        == f"Context: Look at the map.\nWhich state is highlighted?\nA. Ohio\nB. Utah\n{INSTR}"
    )
    assert s10.meta["hint"] == "Look at the map." and s10.question == "Which state is highlighted?"
    assert s10.meta["choices"] == ["Ohio", "Utah"]
    assert (s10.answer, s12.answer) == ("B", "C")  # from the gpt turn
    assert task.prompt(s12) == f"What is the temperature?\nA. 10°C\nB. 30°C\nC. 50°C\n{INSTR}"
    assert s10.load_image() is not None
    # gold answers from problems.json win over the gpt turn
    write_json(
        root / "problems.json",
        {"10": {"answer": 0, "choices": ["Ohio", "Utah"], "subject": "social science"}},
    )
    assert task.load(root)[0].answer == "A"
    m = task.evaluate(samples, ["B", "The answer is A."])
    assert m["accuracy"] == pytest.approx(50.0) and m["n"] == 2


def test_scienceqa_release_layout(tmp_path: Path) -> None:
    problems = {
        "1": {"question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1, "hint": "",
              "image": "image.png", "split": "test", "subject": "natural science"},
        "2": {"question": "Pick one.", "choices": ["x", "y", "z"], "answer": 2, "hint": "A hint.",
              "image": None, "split": "test", "subject": "language science"},
        "3": {"question": "Which is hot?", "choices": ["ice", "fire"], "answer": 1, "hint": "Think.",
              "image": "image.png", "split": "test", "subject": "natural science"},
        "4": {"question": "Train q", "choices": ["a", "b"], "answer": 0, "hint": "",
              "image": "image.png", "split": "train", "subject": "natural science"},
    }  # fmt: skip
    write_json(tmp_path / "problems.json", problems)
    write_json(tmp_path / "pid_splits.json", {"test": ["1", "2", "3"], "train": ["4"]})
    make_image(tmp_path / "images" / "test" / "1" / "image.png")
    make_image(tmp_path / "images" / "test" / "3" / "image.png")
    task = get_task("scienceqa_img")
    samples = task.load(tmp_path)
    assert [s.id for s in samples] == ["1", "3"]
    assert task.prompt(samples[0]) == f"Which is a mammal?\nA. shark\nB. whale\n{INSTR}"
    assert task.prompt(samples[1]) == f"Context: Think.\nWhich is hot?\nA. ice\nB. fire\n{INSTR}"
    m = task.evaluate(samples, ["B", "A"])
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["accuracy/natural science"] == pytest.approx(50.0)
    with pytest.raises(MissingImageError, match=r"'4'"):
        task.load(tmp_path, split="train")


def test_scienceqa_hf_layout(tmp_path: Path) -> None:
    src = save_hf(
        tmp_path / "sqa",
        {
            "image": [pil(0), None, pil(1)],
            "question": ["Which is a mammal?", "No image here?", "Which is hot?"],
            "choices": [["shark", "whale"], ["a", "b"], ["ice", "fire", "snow"]],
            "answer": [1, 0, 1],
            "hint": ["", "hint", "It is summer."],
            "subject": ["natural science"] * 3,
        },
    )
    task = get_task("scienceqa_img")
    samples = task.load(src)
    assert [s.id for s in samples] == ["0", "2"]  # the row without image is dropped
    assert [s.answer for s in samples] == ["B", "B"]
    assert (
        task.prompt(samples[1]) == f"Context: It is summer.\nWhich is hot?\nA. ice\nB. fire\nC. snow\n{INSTR}"
    )
    assert samples[1].load_image().getpixel((0, 0)) == (0, 255, 0)
    assert task.evaluate(samples, ["B. whale", "(A)"])["accuracy"] == pytest.approx(50.0)
    assert len(task.load(src, limit=1)) == 1
    # a dataset object with an indices mapping (after .select) is filtered the same way
    datasets = pytest.importorskip("datasets")
    subset = datasets.load_from_disk(str(src)).select([2, 1])
    assert [s.question for s in task.load(subset)] == ["Which is hot?"]


# --------------------------------------------------------------------------- A-OKVQA


def test_aokvqa_release_and_hf(tmp_path: Path) -> None:
    recs = [
        {"question_id": "q1", "image_id": 42, "question": "What is the man holding?",
         "choices": ["bat", "ball", "glove", "hat"], "correct_choice_idx": 2, "direct_answers": ["glove"] * 10},
        {"question_id": "q2", "image_id": 7, "question": "Why is it wet?",
         "choices": ["rain", "sun", "snow", "wind"], "correct_choice_idx": 0},
    ]  # fmt: skip
    write_json(tmp_path / "aokvqa_v1p0_val.json", recs)
    make_image(tmp_path / "val2017" / "000000000042.jpg")
    make_image(tmp_path / "val2017" / "000000000007.jpg")
    task = get_task("aokvqa_mc")
    samples = task.load(tmp_path)
    assert [s.answer for s in samples] == ["C", "A"]
    assert task.prompt(samples[0]) == f"What is the man holding?\nA. bat\nB. ball\nC. glove\nD. hat\n{INSTR}"
    assert task.evaluate(samples, ["C", "glove"]) == {"accuracy": 50.0, "n": 2}

    src = save_hf(
        tmp_path / "hf",
        {"image": [pil(0)], "question_id": ["q9"], "question": ["Q?"], "choices": [["a", "b", "c", "d"]],
         "correct_choice_idx": [3]},
    )  # fmt: skip
    (s,) = task.load(src)
    assert (s.id, s.answer, task.parse(s, "D.")) == ("q9", "D", "D")


def test_aokvqa_bad_answer_index(tmp_path: Path) -> None:
    make_image(tmp_path / "val2017" / "000000000001.jpg")
    write_json(
        tmp_path / "aokvqa_v1p0_val.json",
        [
            {
                "question_id": "q",
                "image_id": 1,
                "question": "Q",
                "choices": ["a", "b"],
                "correct_choice_idx": 5,
            }
        ],
    )
    with pytest.raises(DataFormatError, match=r"entry 0.*out of range"):
        get_task("aokvqa_mc").load(tmp_path)


# --------------------------------------------------------------------------- MMBench


def _b64(color: int) -> str:
    buf = io.BytesIO()
    pil(color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_mmbench_tsv_layout(tmp_path: Path) -> None:
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [
        ["0", "What colour is it?", "nan", "red", "green", "blue", "nan", "A", "color", _b64(0)],
        ["1", "How many?", "Count carefully.", "one", "two", "three", "four", "D", "count", _b64(1)],
        ["1000000", "How many?", "Count carefully.", "two", "three", "four", "one", "C", "count", "1"],
    ]
    tsv = tmp_path / "mmbench_dev_20230712.tsv"
    tsv.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    task = get_task("mmbench")
    samples = task.load(tmp_path)
    assert [s.id for s in samples] == ["0", "1", "1000000"]
    assert samples[0].meta["choices"] == ["red", "green", "blue"]  # stops at the empty D
    assert task.prompt(samples[0]) == f"What colour is it?\nA. red\nB. green\nC. blue\n{INSTR}"
    assert (
        task.prompt(samples[1]) == f"Count carefully.\nHow many?\nA. one\nB. two\nC. three\nD. four\n{INSTR}"
    )
    # the third row's image refers to the row with index 1
    assert samples[2].load_image().getpixel((0, 0)) == (0, 255, 0)
    m = task.evaluate(samples, ["A", "D", "B"])
    assert m["accuracy"] == pytest.approx(200 / 3)
    assert m["accuracy/color"] == 100.0 and m["accuracy/count"] == 50.0
    # circular groups: {0} right, {1, 1000000} half right -> 1 of 2 groups
    assert m["circular_accuracy"] == 50.0 and m["n_circular_groups"] == 2


def test_mmbench_hf_layout(tmp_path: Path) -> None:
    src = save_hf(
        tmp_path / "hf",
        {"index": [5], "question": ["Q?"], "hint": [None], "A": ["x"], "B": ["y"], "C": [None], "D": [None],
         "answer": ["B"], "category": ["ocr"], "image": [pil(2)]},
    )  # fmt: skip
    task = get_task("mmbench")
    (s,) = task.load(src)
    assert task.prompt(s) == f"Q?\nA. x\nB. y\n{INSTR}"
    assert task.metrics([s], [task.parse(s, "y")]) == {"accuracy": 100.0, "n": 1, "accuracy/ocr": 100.0}
