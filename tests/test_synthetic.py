"""Tests of the synthetic scene-QA benchmark (fast, deterministic, CPU only)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from himap_vlm.apps.data import synthetic as syn
from himap_vlm.apps.data.synthetic import (
    FAMILIES,
    VOCABULARY,
    SceneQAConfig,
    generate_questions,
    generate_scenes,
    load_synthetic,
    read_jsonl,
    score,
    split_words,
    to_hf_dataset,
    write_jsonl,
)

N = 400  # records per split in the shared fixture


@pytest.fixture(scope="module")
def test_records() -> list[dict]:
    return load_synthetic("test", N)


def _content(objects) -> tuple:
    return tuple(sorted((o["shape"], o["color"], o["size"], o["row"], o["col"]) for o in objects))


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_records(test_records):
    again = load_synthetic("test", N)
    assert [r["question"] for r in again] == [r["question"] for r in test_records]
    assert [r["answer"] for r in again] == [r["answer"] for r in test_records]
    assert [r["id"] for r in again] == [r["id"] for r in test_records]
    for a, b in zip(again, test_records, strict=True):
        assert a["image"].tobytes() == b["image"].tobytes()
        assert a["objects"] == b["objects"]


def test_different_seeds_differ(test_records):
    other = load_synthetic("test", N, SceneQAConfig(seed=1))
    assert [r["question"] for r in other] != [r["question"] for r in test_records]
    assert (
        sum(a["image"].tobytes() != b["image"].tobytes() for a, b in zip(other, test_records, strict=True))
        > N // 2
    )


def test_prefix_property_and_scene_determinism():
    short = load_synthetic("train", 30)
    long = load_synthetic("train", 60)
    assert [r["question"] for r in short] == [r["question"] for r in long[:30]]
    s1 = generate_scenes(5, "validation")
    s2 = generate_scenes(5, "val")
    assert [s["objects"] for s in s1] == [s["objects"] for s in s2]
    assert all(a["image"].tobytes() == b["image"].tobytes() for a, b in zip(s1, s2, strict=True))


@pytest.mark.parametrize("size", [48, 72, 96])
def test_image_sizes(size):
    cfg = SceneQAConfig(image_size=size)
    scenes = generate_scenes(4, "train", cfg)
    for s in scenes:
        assert s["image"].size == (size, size)
        assert s["image"].mode == "RGB"
        assert 1 <= len(s["objects"]) <= 4
        cells = [(o["row"], o["col"]) for o in s["objects"]]
        assert len(set(cells)) == len(cells)
        # something other than background is drawn
        assert len(np.unique(np.asarray(s["image"]).reshape(-1, 3), axis=0)) > 1


# ---------------------------------------------------------------- splits


def test_splits_never_share_a_scene():
    cfg = SceneQAConfig()
    by_split = {sp: generate_scenes(300, sp, cfg) for sp in ("train", "validation", "test")}
    ids = {sp: {s["scene_id"] for s in scenes} for sp, scenes in by_split.items()}
    contents = {sp: {_content(s["objects"]) for s in scenes} for sp, scenes in by_split.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not ids[a] & ids[b]
        assert not contents[a] & contents[b], f"{a} and {b} share scene contents"
        for sa in by_split[a]:
            assert sa["split"] == a
    # even across seeds a test scene never appears in train
    other_train = {_content(s["objects"]) for s in generate_scenes(300, "train", SceneQAConfig(seed=7))}
    assert not other_train & contents["test"]


# ---------------------------------------------------------------- families and vocabulary


def test_all_families_and_vocabulary(test_records):
    fams = Counter(r["family"] for r in test_records)
    assert set(fams) == set(FAMILIES)
    assert max(fams.values()) - min(fams.values()) <= 1  # cycled in order
    vocab = set(VOCABULARY)
    assert len(vocab) == len(VOCABULARY)
    for r in test_records:
        assert set(split_words(r["question"])) <= vocab, r["question"]
        assert set(split_words(r["answer"])) <= vocab, r["answer"]
        assert r["answer"] in vocab  # answers are single words
        for opt in r["options"]:
            assert set(split_words(opt)) <= vocab
        assert set(r) >= {"id", "scene_id", "split", "family", "question", "answer", "image", "objects"}
        assert r["split"] == "test"
        for o in r["objects"]:
            assert set(o) == {"shape", "color", "size", "row", "col"}
    assert len({r["id"] for r in test_records}) == len(test_records)


def test_exists_balanced_and_consistent(test_records):
    rows = [r for r in test_records if r["family"] == "exists"]
    answers = Counter(r["answer"] for r in rows)
    assert set(answers) == {"yes", "no"}
    assert abs(answers["yes"] - answers["no"]) <= 2
    negative_kinds = Counter(r["qtype"] for r in rows if r["answer"] == "no")
    assert len(negative_kinds) >= 2  # plausible negatives of several kinds
    for r in rows:
        m = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", r["question"])
        assert m, r["question"]
        color, shape = m.groups()
        present = any(o["color"] == color and o["shape"] == shape for o in r["objects"])
        assert r["answer"] == ("yes" if present else "no")
        if r["qtype"] == "exists_color_swap":
            assert any(o["shape"] == shape for o in r["objects"])
        if r["qtype"] == "exists_shape_swap":
            assert any(o["color"] == color for o in r["objects"])


def test_attribute_answers_match_objects(test_records):
    rows = [r for r in test_records if r["family"] == "attribute"]
    assert rows
    for r in rows:
        objs, q = r["objects"], r["question"]
        if m := re.fullmatch(r"What color is the (\w+)\?", q):
            match = [o for o in objs if o["shape"] == m.group(1)]
            key = "color"
        elif m := re.fullmatch(r"What shape is the (\w+) object\?", q):
            match = [o for o in objs if o["color"] == m.group(1)]
            key = "shape"
        elif m := re.fullmatch(r"What size is the (\w+) (\w+)\?", q):
            match = [o for o in objs if o["color"] == m.group(1) and o["shape"] == m.group(2)]
            key = "size"
        else:
            raise AssertionError(f"unexpected attribute question {q!r}")
        assert len(match) == 1, q
        assert r["answer"] == match[0][key]


def test_count_answers_match_objects(test_records):
    words = syn.NUMBER_WORDS
    for r in (r for r in test_records if r["family"] == "count"):
        objs, q = r["objects"], r["question"]
        if q == "How many objects are there?":
            n = len(objs)
        elif m := re.fullmatch(r"How many (\w+) objects are there\?", q):
            n = sum(o["color"] == m.group(1) for o in objs)
        else:
            m = re.fullmatch(r"How many (\w+) are there\?", q)
            assert m, q
            n = sum(syn.SHAPE_PLURALS[o["shape"]] == m.group(1) for o in objs)
        assert r["answer"] == words[n - 1]


def test_spatial_answers_unambiguous(test_records):
    rows = [r for r in test_records if r["family"] == "spatial"]
    answers = Counter(r["answer"] for r in rows)
    assert abs(answers["yes"] - answers["no"]) <= 2
    np_ = r"((?:small |large )?\w+ \w+)"
    for r in rows:
        m = re.fullmatch(rf"Is the {np_} (left of|right of|above|below) the {np_}\?", r["question"])
        assert m, r["question"]

        def find(phrase, objs=r["objects"]):
            parts = phrase.split()
            hits = [
                o
                for o in objs
                if [o["color"], o["shape"]] == parts[-2:] and (len(parts) == 2 or o["size"] == parts[0])
            ]
            assert len(hits) == 1, phrase
            return hits[0]

        a, rel, b = find(m.group(1)), m.group(2), find(m.group(3))
        axis, sign = {
            "left of": ("col", -1),
            "right of": ("col", 1),
            "above": ("row", -1),
            "below": ("row", 1),
        }[rel]
        diff = a[axis] - b[axis]
        assert diff != 0  # never asked along an axis where the cells are aligned
        assert r["answer"] == ("yes" if np.sign(diff) == sign else "no")


def test_choice_letters_balanced_and_correct(test_records):
    rows = [r for r in test_records if r["family"] == "choice"]
    letters = Counter(r["answer"] for r in rows)
    assert set(letters) == {"A", "B", "C", "D"}
    assert max(letters.values()) - min(letters.values()) <= 1
    for r in rows:
        lines = r["question"].split("\n")
        assert lines[-1] == syn.CHOICE_INSTRUCTION
        opts = [line.split(". ", 1)[1] for line in lines[1:-1]]
        assert opts == r["options"] and 3 <= len(opts) <= 4 and len(set(opts)) == len(opts)
        truth = opts["ABCD".index(r["answer"])]
        objs, q = r["objects"], lines[0]
        if m := re.fullmatch(r"What color is the (\w+)\?", q):
            assert truth == next(o["color"] for o in objs if o["shape"] == m.group(1))
        elif m := re.fullmatch(r"What shape is the (\w+) object\?", q):
            assert truth == next(o["shape"] for o in objs if o["color"] == m.group(1))
        else:
            assert q == "How many objects are there?"
            assert truth == syn.NUMBER_WORDS[len(objs) - 1]


def test_generate_questions_direct():
    scene = generate_scenes(1, "train")[0]
    qs = generate_questions(scene, np.random.default_rng(0), FAMILIES)
    assert {q["family"] for q in qs} <= set(FAMILIES)
    assert [q["question"] for q in qs] == [q["question"] for q in generate_questions(scene, 0, FAMILIES)]
    one = {"objects": [{"shape": "circle", "color": "red", "size": "small", "row": 0, "col": 0}]}
    qs = generate_questions(one, 0, ["exists", "exists", "spatial"], targets=["yes", "no", None])
    assert [q["answer"] for q in qs] == ["yes", "no"]  # spatial impossible with one object
    q = generate_questions(one, 0, ["choice"], targets=["C"])[0]
    assert q["answer"] == "C" and q["options"][2] in ("red", "circle", "one")


# ---------------------------------------------------------------- scoring


def test_score():
    assert score("A", "A", "choice")
    assert score("A.", "A", "choice")
    assert score("(A)", "A", "choice")
    assert score("A. red", "A", "choice")
    assert score(" b ", "B", "choice")
    assert not score("B", "A", "choice")
    assert not score("", "A", "choice")
    assert score("Yes.", "yes", "exists")
    assert score("yes, there is", "yes", "spatial")
    assert not score("no", "yes", "exists")
    assert score("2", "two", "count")
    assert score("Two.", "two", "count")
    assert score(" RED ", "red", "attribute")
    assert not score("", "red", "attribute")
    with pytest.raises(ValueError, match="family"):
        score("a", "a", "bogus")


# ---------------------------------------------------------------- serialisation


def test_hf_dataset_round_trip(test_records):
    import datasets

    recs = test_records[:12]
    ds = to_hf_dataset(recs)
    assert isinstance(ds.features["image"], datasets.Image)
    assert len(ds) == len(recs)
    for row, r in zip(ds, recs, strict=True):
        assert row["question"] == r["question"] and row["answer"] == r["answer"]
        assert row["family"] == r["family"] and row["options"] == r["options"]
        assert row["objects"] == r["objects"]
        assert row["image"].convert("RGB").tobytes() == r["image"].tobytes()


def test_jsonl_round_trip(test_records, tmp_path):
    recs = test_records[:15]
    path = write_jsonl(recs, tmp_path)
    assert path == tmp_path / "test.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(not Path(line["image"]).is_absolute() for line in lines)
    assert {"image", "question", "answer", "family", "id"} <= set(lines[0])
    back = read_jsonl(path)
    for a, b in zip(back, recs, strict=True):
        for key in ("id", "scene_id", "split", "family", "question", "answer", "options", "objects"):
            assert a[key] == b[key]
        assert a["image"].tobytes() == b["image"].tobytes()
    # a plain JSON list of {image, question, answer} is accepted too
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"image": lines[0]["image"], "question": "q?", "answer": "yes"}]))
    assert read_jsonl(plain)[0]["image"].size == recs[0]["image"].size


def test_read_jsonl_errors(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    good = {"image": "a.png", "question": "q?", "answer": "yes"}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "image": "missing.png"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"d\.jsonl:2: image not found"):
        read_jsonl(f)
    f.write_text(json.dumps(good) + "\n\n" + json.dumps({"image": "a.png", "question": "q?"}) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:3: .*'answer'"):
        read_jsonl(f)
    f.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:1: invalid JSON"):
        read_jsonl(f)
    f.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_jsonl(f)
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 16}, "image_size"),
        ({"image_size": 48.0}, "image_size"),
        ({"grid": 1}, "grid"),
        ({"max_objects": 10}, "max_objects"),
        ({"min_objects": 3, "max_objects": 2}, "max_objects"),
        ({"min_objects": 0}, "min_objects"),
        ({"families": ("exists", "bogus")}, "families"),
        ({"families": ()}, "families"),
        ({"families": "exists"}, "families"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"colors": ("red",)}, "colors"),
        ({"shapes": ("circle", "hexagon")}, "shapes"),
        ({"choice_options": 5}, "choice_options"),
        ({"background": (0, 0)}, "background"),
        ({"max_objects": 1}, "spatial"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SceneQAConfig(**kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        load_synthetic("dev", 5)
    with pytest.raises(ValueError, match="n must be"):
        generate_scenes(-1, "train")
    cfg = SceneQAConfig(families=["exists", "count"], questions_per_scene=2, choice_options=3)
    assert cfg.families == ("exists", "count")
    recs = load_synthetic("train", 20, cfg)
    assert len(recs) == 20 and len({r["scene_id"] for r in recs}) == 10


def test_choice_balance_with_few_attribute_values():
    cfg = SceneQAConfig(colors=("red", "green", "blue"), shapes=("circle", "square"), families=("choice",))
    letters = Counter(r["answer"] for r in load_synthetic("train", 80, cfg))
    assert letters == {"A": 20, "B": 20, "C": 20, "D": 20}
