"""Metrics against hand-computed cases: VQA accuracy, CIDEr-D, yes/no statistics, option letters."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from himap_vlm.apps.eval.metrics import (
    binary_stats,
    cider_d,
    format_options,
    normalize_vqa_answer,
    parse_option_letter,
    split_options,
    tokenize_caption,
    vqa_accuracy,
)

# --------------------------------------------------------------------------- VQA normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("a dog.", "dog"),
        ("The Dog", "dog"),
        ("Yes!", "yes"),
        ("none", "0"),
        ("ten", "10"),
        ("3.5", "3.5"),
        ("isnt", "isn't"),
        ("dont know", "don't know"),
        ("man's hat", "man 's hat"),
        ("t-shirt", "t shirt"),
        ("red / white", "red white"),
        ("10,000", "10000"),
        ("  black and white\n", "black and white"),
        ("an apple?", "apple"),
    ],
)
def test_normalize_vqa_answer(raw: str, expected: str) -> None:
    assert normalize_vqa_answer(raw) == expected


def test_vqa_accuracy_leave_one_out_averaging() -> None:
    others = ["cat"] * 10
    # 1 of 10 humans: 9 subsets keep that answer once (1/3), 1 subset loses it (0) -> 0.3
    assert vqa_accuracy("dog", ["dog"] + others[:9]) == pytest.approx(0.3)
    # 2 of 10: 8 subsets with 2 matches (2/3), 2 with 1 (1/3) -> (16/3 + 2/3) / 10 = 0.6
    assert vqa_accuracy("dog", ["dog"] * 2 + others[:8]) == pytest.approx(0.6)
    # 3 of 10: the official protocol gives (3 * 2/3 + 7 * 1) / 10 = 0.9, not min(3/3, 1) = 1
    assert vqa_accuracy("dog", ["dog"] * 3 + others[:7]) == pytest.approx(0.9)
    # 4 or more of 10: every subset keeps >= 3 matches -> 1.0
    assert vqa_accuracy("dog", ["dog"] * 4 + others[:6]) == pytest.approx(1.0)
    assert vqa_accuracy("dog", ["dog"] * 10) == pytest.approx(1.0)
    assert vqa_accuracy("bird", ["dog"] * 10) == 0.0


def test_vqa_accuracy_normalises_prediction_and_answers() -> None:
    assert vqa_accuracy("Two", ["2"] * 10) == pytest.approx(1.0)
    assert vqa_accuracy("a dog.", ["dog"] * 10) == pytest.approx(1.0)
    assert vqa_accuracy("dog", ["A Dog"] * 4 + ["cat"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("Two", ["2"] * 10, normalize=False) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


# --------------------------------------------------------------------------- CIDEr-D


def _reference_cider(cands: list[str], refs: list[list[str]], n: int = 4, sigma: float = 6.0) -> list[float]:
    """A straightforward re-derivation of pycocoevalcap's CIDEr-D, for cross-checking."""

    def grams(s: str) -> Counter:
        w = s.split()
        return Counter(tuple(w[i : i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))

    n_images = len(refs)
    df: Counter = Counter()
    for rs in refs:
        df.update(set().union(*(grams(r).keys() for r in rs)))

    def tfidf(c: Counter, order: int) -> dict:
        return {
            g: tf * (math.log(n_images) - math.log(max(1, df[g]))) for g, tf in c.items() if len(g) == order
        }

    scores = []
    for cand, rs in zip(cands, refs, strict=True):
        gc = grams(cand)
        len_c = max(len(cand.split()) - 1, 0)  # pycocoevalcap's "length" counts bigrams
        total = 0.0
        for r in rs:
            gr = grams(r)
            len_r = max(len(r.split()) - 1, 0)
            per_order = []
            for order in range(1, n + 1):
                vc, vr = tfidf(gc, order), tfidf(gr, order)
                num = sum(min(v, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, v in vc.items())
                den = math.sqrt(sum(v * v for v in vc.values())) * math.sqrt(sum(v * v for v in vr.values()))
                sim = num / den if den else 0.0
                per_order.append(sim * math.exp(-((len_c - len_r) ** 2) / (2 * sigma**2)))
            total += sum(per_order) / n
        scores.append(10.0 * total / len(rs))
    return scores


def test_cider_hand_computed_two_image_corpus() -> None:
    # Image 1: candidate == its only reference "a b": orders 1 and 2 have cosine 1, orders 3-4
    # have no n-grams -> mean([1, 1, 0, 0]) * 10 = 5. Image 2 shares nothing -> 0.
    corpus, per_image = cider_d(["a b", "x y"], [["a b"], ["c d"]])
    assert per_image == pytest.approx([5.0, 0.0])
    assert corpus == pytest.approx(2.5)


def test_cider_identical_caption_scores_ten() -> None:
    refs = [["a man rides a red bike"], ["two dogs play in the snow"], ["a cat sleeps on a sofa"]]
    cands = ["a man rides a red bike", "birds fly over water", "nothing in common here"]
    _, per_image = cider_d(cands, refs)
    assert per_image[0] == pytest.approx(10.0)
    assert per_image[1] == 0.0
    assert per_image[2] == 0.0


def test_cider_length_penalty_and_clipping() -> None:
    refs = [["a dog runs on the grass"], ["a bird sits on a branch"]]
    # repeating n-grams cannot raise the score above the matching caption (clipping)...
    _, exact = cider_d(["a dog runs on the grass", "x"], refs)
    _, repeated = cider_d(["a dog a dog runs on the grass grass", "x"], refs)
    assert repeated[0] < exact[0]
    # ...and a longer caption is penalised by the Gaussian length term
    _, longer = cider_d(["a dog runs on the grass in the park today", "x"], refs)
    assert longer[0] < exact[0]


def test_cider_matches_independent_reimplementation() -> None:
    refs = [
        [
            "a man riding a wave on top of a surfboard",
            "a surfer rides a large wave",
            "man surfing in the ocean",
        ],
        ["a plate of food with broccoli and rice", "rice and broccoli on a white plate"],
        ["two giraffes standing in a field", "a pair of giraffes in the grass", "giraffes near trees"],
        ["a red bus parked on the street", "a double decker bus on a city street"],
    ]
    cands = [
        "a man surfing a large wave",
        "a plate with rice and broccoli",
        "giraffes standing in the grass",
        "a bus",
    ]
    toks_c = [tokenize_caption(c) for c in cands]
    toks_r = [[tokenize_caption(r) for r in rs] for rs in refs]
    corpus, per_image = cider_d(cands, refs)
    expected = _reference_cider(toks_c, toks_r)
    assert per_image == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert corpus == pytest.approx(sum(expected) / len(expected))
    assert 0 < corpus < 10


def test_cider_input_checks() -> None:
    with pytest.raises(ValueError):
        cider_d(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        cider_d(["a"], [[]])
    with pytest.raises(ValueError):
        cider_d([], [])


def test_tokenize_caption() -> None:
    assert tokenize_caption("A Dog's ball, on the T-shirt!") == "a dog 's ball on the t-shirt"
    assert tokenize_caption("It isn't 3.5 m... (really)") == "it is n't 3.5 m really"
    assert tokenize_caption("  ") == ""


# --------------------------------------------------------------------------- yes/no statistics


def test_binary_stats_confusion_table() -> None:
    # TP=3, FP=1, TN=4, FN=2
    preds = ["yes"] * 3 + ["yes"] + ["no"] * 4 + ["no"] * 2
    labels = ["yes"] * 3 + ["no"] + ["no"] * 4 + ["yes"] * 2
    st = binary_stats(preds, labels)
    assert (st.tp, st.fp, st.tn, st.fn) == (3, 1, 4, 2)
    assert st.accuracy == pytest.approx(0.7)
    assert st.precision == pytest.approx(0.75)
    assert st.recall == pytest.approx(0.6)
    assert st.f1 == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert st.yes_ratio == pytest.approx(0.4)


def test_binary_stats_degenerate() -> None:
    st = binary_stats(["no", "no"], ["no", "no"])
    assert (st.precision, st.recall, st.f1, st.accuracy) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        binary_stats(["yes"], [])


# --------------------------------------------------------------------------- option letters


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A", "A"),
        ("B.", "B"),
        ("(C)", "C"),
        ("C) blue", "C"),
        ("A. red", "A"),
        ("D: green", "D"),
        (" b ", None),
        ("B\nBecause blue is a colour.", "B"),
        ("The answer is B.", "B"),
        ("Answer: (C)", "C"),
        ("green", "D"),
        ("Green.", "D"),
        ("A dog", None),
        ("E", None),  # out of range for 4 options
        ("", None),
        ("I don't know", None),
    ],
)
def test_parse_option_letter(text: str, expected: str | None) -> None:
    assert parse_option_letter(text, ["red", "blue", "yellow", "green"]) == expected


def test_format_and_split_options_round_trip() -> None:
    block = format_options(["red", "blue"])
    assert block == "A. red\nB. blue"
    assert split_options(f"Context: x\nWhich colour?\n{block}") == (
        "Context: x\nWhich colour?",
        ["red", "blue"],
    )
    assert split_options("No options here") == ("No options here", [])
    assert split_options("Q\nB. out of order") == ("Q\nB. out of order", [])
