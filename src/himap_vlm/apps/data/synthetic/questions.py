"""Questions about scenes (five families) and the question records of a split (:func:`load_synthetic`)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .config import _SPLIT_CODES, SceneQAConfig, _check_int, _resolve_split
from .scenes import _make_scene, render_scene
from .vocab import (
    CHOICE_INSTRUCTION,
    FAMILIES,
    LETTERS,
    NUMBER_WORDS,
    SHAPE_PLURALS,
    YES_NO,
)

__all__ = ["generate_questions", "load_synthetic"]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _descriptions(objects: Sequence[Mapping[str, Any]]) -> list[str | None]:
    """Shortest unique noun phrase for each object ('red circle' or 'small red circle'), or None."""
    out: list[str | None] = []
    for o in objects:
        same_cs = [p for p in objects if p["color"] == o["color"] and p["shape"] == o["shape"]]
        if len(same_cs) == 1:
            out.append(f"{o['color']} {o['shape']}")
        elif sum(p["size"] == o["size"] for p in same_cs) == 1:
            out.append(f"{o['size']} {o['color']} {o['shape']}")
        else:
            out.append(None)
    return out


def _q(family: str, qtype: str, question: str, answer: str, options: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "family": family,
        "qtype": qtype,
        "question": question,
        "answer": answer,
        "options": list(options),
    }


def _exists(objs, rng, target, config) -> dict[str, Any] | None:
    present = {(o["color"], o["shape"]) for o in objs}
    if target is None:
        target = _pick(rng, YES_NO)
    if target == "yes":
        color, shape = _pick(rng, sorted(present))
        qtype = "exists_positive"
    else:
        colors_in = {c for c, _ in present}
        shapes_in = {s for _, s in present}
        absent = [(c, s) for c in config.colors for s in config.shapes if (c, s) not in present]
        candidates = {
            "exists_color_swap": [(c, s) for c, s in absent if s in shapes_in],
            "exists_shape_swap": [(c, s) for c, s in absent if c in colors_in],
            "exists_absent": [(c, s) for c, s in absent if c not in colors_in and s not in shapes_in],
        }
        kinds = [k for k, v in candidates.items() if v]
        if not kinds:
            return None
        qtype = _pick(rng, kinds)
        color, shape = _pick(rng, candidates[qtype])
    return _q("exists", qtype, f"Is there {_article(color)} {color} {shape} in the image?", target)


def _unique_attribute_questions(objs) -> list[tuple[str, str, str]]:
    """(qtype, question, answer) for every attribute question with a unique referent."""
    out = []
    for o in objs:
        if sum(p["shape"] == o["shape"] for p in objs) == 1:
            out.append(("color_of_shape", f"What color is the {o['shape']}?", o["color"]))
        if sum(p["color"] == o["color"] for p in objs) == 1:
            out.append(("shape_of_color", f"What shape is the {o['color']} object?", o["shape"]))
    return out


def _attribute(objs, rng, target, config) -> dict[str, Any] | None:
    cands = _unique_attribute_questions(objs)
    for o in objs:
        if sum(p["color"] == o["color"] and p["shape"] == o["shape"] for p in objs) == 1:
            cands.append(("size_of_object", f"What size is the {o['color']} {o['shape']}?", o["size"]))
    if not cands:
        return None
    qtype, question, answer = _pick(rng, cands)
    return _q("attribute", qtype, question, answer)


def _count(objs, rng, target, config) -> dict[str, Any] | None:
    kinds = ["count_total", "count_color", "count_shape"]
    qtype = _pick(rng, kinds)
    if qtype == "count_total":
        return _q("count", qtype, "How many objects are there?", NUMBER_WORDS[len(objs) - 1])
    if qtype == "count_color":
        color = _pick(rng, sorted({o["color"] for o in objs}))
        n = sum(o["color"] == color for o in objs)
        return _q("count", qtype, f"How many {color} objects are there?", NUMBER_WORDS[n - 1])
    shape = _pick(rng, sorted({o["shape"] for o in objs}))
    n = sum(o["shape"] == shape for o in objs)
    return _q("count", qtype, f"How many {SHAPE_PLURALS[shape]} are there?", NUMBER_WORDS[n - 1])


def _relations(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Relations of ``a`` to ``b`` that hold, by grid cell."""
    rel = []
    if a["col"] < b["col"]:
        rel.append("left of")
    if a["col"] > b["col"]:
        rel.append("right of")
    if a["row"] < b["row"]:
        rel.append("above")
    if a["row"] > b["row"]:
        rel.append("below")
    return rel


_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _spatial(objs, rng, target, config) -> dict[str, Any] | None:
    desc = _descriptions(objs)
    pairs = [
        (i, j)
        for i, j in itertools.permutations(range(len(objs)), 2)
        if desc[i] is not None and desc[j] is not None
    ]
    if not pairs:
        return None
    if target is None:
        target = _pick(rng, YES_NO)
    i, j = _pick(rng, pairs)
    true_rel = _pick(rng, _relations(objs[i], objs[j]))  # distinct cells: never empty
    rel = true_rel if target == "yes" else _OPPOSITE[true_rel]
    return _q("spatial", f"spatial_{rel.split()[0]}", f"Is the {desc[i]} {rel} the {desc[j]}?", target)


def _choice(objs, rng, target, config) -> dict[str, Any] | None:
    cands = [
        (qt, q, a, config.colors if qt == "color_of_shape" else config.shapes)
        for qt, q, a in _unique_attribute_questions(objs)
    ]
    numbers = NUMBER_WORDS[: max(4, config.max_objects)]
    cands.append(("count_total", "How many objects are there?", NUMBER_WORDS[len(objs) - 1], numbers))
    if target is not None:  # keep the letter balance: only questions with enough options for it
        cands = [c for c in cands if min(config.choice_options, len(c[3])) > LETTERS.index(target)] or cands
    qtype, question, answer, pool = _pick(rng, cands)
    k = min(config.choice_options, len(pool))
    letter_index = LETTERS.index(target) % k if target is not None else int(rng.integers(k))
    distractors = [v for v in pool if v != answer]
    picked = [distractors[int(t)] for t in rng.permutation(len(distractors))[: k - 1]]
    options = list(picked)
    options.insert(letter_index, answer)
    lines = [question] + [f"{LETTERS[t]}. {opt}" for t, opt in enumerate(options)] + [CHOICE_INSTRUCTION]
    return _q("choice", f"choice_{qtype}", "\n".join(lines), LETTERS[letter_index], options)


_MAKERS = {
    "exists": _exists,
    "attribute": _attribute,
    "count": _count,
    "spatial": _spatial,
    "choice": _choice,
}


def _make_question(
    family: str,
    scene: Mapping[str, Any],
    rng: np.random.Generator,
    target: str | None,
    config: SceneQAConfig,
) -> dict[str, Any] | None:
    if family not in _MAKERS:
        raise ValueError(f"unknown question family {family!r}; choose from {list(FAMILIES)}")
    return _MAKERS[family](list(scene["objects"]), rng, target, config)


def generate_questions(
    scene: Mapping[str, Any],
    rng: np.random.Generator | int,
    families: Sequence[str] = FAMILIES,
    *,
    targets: Sequence[str | None] | None = None,
    config: SceneQAConfig | None = None,
) -> list[dict[str, Any]]:
    """Ask questions about a scene.

    Parameters
    ----------
    scene : mapping
        A scene with an ``objects`` list (see :func:`generate_scenes`).
    rng : numpy.random.Generator or int
        Source of randomness (an int seeds a new generator).
    families : sequence of str, default :data:`FAMILIES`
        One question is attempted per entry (repeats allowed). Families that cannot be asked
        about this scene (e.g. ``attribute`` when no object is unique in any attribute, or
        ``spatial`` with fewer than two describable objects) are skipped.
    targets : sequence of (str or None), optional
        Desired answer per entry of ``families`` for the answer-balanced families
        (``"yes"``/``"no"`` for ``exists`` and ``spatial``, a letter for ``choice``); ignored
        for the others. ``None`` (default) draws it from ``rng``.
    config : SceneQAConfig, optional
        Shapes/colours for negatives and distractors, number of choice options.

    Returns
    -------
    list of dict
        ``{"family", "qtype", "question", "answer", "options"}`` for each question asked, in
        the order of ``families``. Duplicate questions within the call are dropped.
    """
    config = config or SceneQAConfig()
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    if targets is not None and len(targets) != len(families):
        raise ValueError(f"targets has {len(targets)} entries for {len(families)} families")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for t, family in enumerate(families):
        target = None if targets is None else targets[t]
        for _ in range(8):  # a few tries to avoid asking the same question twice
            q = _make_question(family, scene, rng, target, config)
            if q is None or q["question"] not in seen:
                break
        if q is not None and q["question"] not in seen:
            seen.add(q["question"])
            out.append(q)
    return out


class _Deck:
    """Answer targets in shuffled blocks, so that each value appears equally often."""

    def __init__(self, values: Sequence[str], rng: np.random.Generator) -> None:
        self.values = list(values)
        self.rng = rng
        self.block: list[str] = []

    def peek(self) -> str:
        if not self.block:
            self.block = [self.values[int(i)] for i in self.rng.permutation(len(self.values))]
        return self.block[0]

    def pop(self) -> None:
        self.block.pop(0)


def load_synthetic(
    split: str = "test",
    n: int = 1000,
    config: SceneQAConfig | None = None,
) -> list[dict[str, Any]]:
    """Generate ``n`` question records of one split.

    Families are cycled in ``config.families`` order (so they are equally represented),
    ``config.questions_per_scene`` at a time per scene; a family that cannot be asked about a
    scene is carried over to the next one. ``exists``/``spatial`` answers (yes/no) and
    ``choice`` letters are balanced exactly within shuffled blocks.

    Parameters
    ----------
    split : {"train", "validation", "test"}, default "test"
        Split; ``"val"`` is accepted for ``"validation"``. Splits never share a scene.
    n : int, default 1000
        Number of records (questions).
    config : SceneQAConfig, optional
        Generation parameters (default ``SceneQAConfig()``).

    Returns
    -------
    list of dict
        Records ``{"id", "scene_id", "split", "family", "qtype", "question", "answer",
        "options", "image", "objects"}``; records of the same scene share one image.
    """
    config = config or SceneQAConfig()
    split = _resolve_split(split)
    _check_int("n", n, 0)
    code = _SPLIT_CODES[split]
    decks = {
        "exists": _Deck(YES_NO, np.random.default_rng([config.seed, code, 0, 2, 0])),
        "spatial": _Deck(YES_NO, np.random.default_rng([config.seed, code, 0, 2, 1])),
        "choice": _Deck(
            LETTERS[: config.choice_options], np.random.default_rng([config.seed, code, 0, 2, 2])
        ),
    }
    cycle = itertools.cycle(config.families)
    carry: list[str] = []
    records: list[dict[str, Any]] = []
    index = 0
    misses = 0
    while len(records) < n:
        scene = _make_scene(config, split, index)
        qrng = np.random.default_rng([config.seed, code, index, 1])
        index += 1
        want, carry = carry[: config.questions_per_scene], carry[config.questions_per_scene :]
        while len(want) < config.questions_per_scene:
            want.append(next(cycle))
        image = None
        seen: set[str] = set()
        for family in want:
            if len(records) >= n:
                break
            deck = decks.get(family)
            target = deck.peek() if deck is not None else None
            q = _make_question(family, scene, qrng, target, config)
            if q is None or q["question"] in seen:
                carry.append(family)
                continue
            seen.add(q["question"])
            if deck is not None:
                deck.pop()
            if image is None:
                image = render_scene(scene, config)
            records.append(
                {
                    "id": f"{scene['scene_id']}-q{len(seen) - 1}",
                    "scene_id": scene["scene_id"],
                    "split": split,
                    "family": q["family"],
                    "qtype": q["qtype"],
                    "question": q["question"],
                    "answer": q["answer"],
                    "options": q["options"],
                    "image": image,
                    "objects": [dict(o) for o in scene["objects"]],
                }
            )
        misses = 0 if image is not None else misses + 1
        if misses > 10_000:
            raise RuntimeError(
                f"could not ask {sorted(set(carry))} questions about any scene; check the config"
            )
    return records
