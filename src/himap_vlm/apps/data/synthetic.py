"""Synthetic scene-QA benchmark: procedural shapes on a grid, with closed-vocabulary questions.

Every scene is a small image (default 48 x 48 px) of 1-4 coloured shapes, each in its own cell
of a ``grid x grid`` layout on a plain background. Questions come in five families that mirror
the benchmarks used in the token-pruning papers:

``exists``
    POPE-like yes/no ("Is there a red circle in the image?"). Answers are balanced exactly
    (yes/no alternate within shuffled blocks) and negatives are plausible: same shape with
    another colour, same colour with another shape, or an object absent in both respects.
``attribute``
    GQA-like ("What color is the square?" -> ``red``; "What shape is the blue object?" ->
    ``circle``; "What size is the red star?" -> ``small``). Only asked when the object referred
    to is unique in the scene.
``count``
    "How many objects are there?", "How many red objects are there?", "How many circles are
    there?". **Convention: answers are number words** (``one`` ... ``nine``), never digits;
    :func:`score` accepts digits in predictions.
``spatial``
    yes/no ("Is the red circle left of the blue square?") with left/right/above/below decided
    by grid cell. Only pairs of uniquely describable objects whose cells differ along the asked
    axis are used, so the answer is never ambiguous. Answers are balanced like ``exists``.
``choice``
    ScienceQA-like lettered multiple choice (colour, shape or object count), answered with a
    letter; the correct letter is balanced over ``A``-``D``.

Determinism and splits
----------------------
Scene ``i`` of split ``s`` is drawn from its own NumPy stream seeded by ``(seed, s, i)``, so the
same seed gives byte-identical images and identical questions, and ``load_synthetic(n=100)``
is a prefix of ``load_synthetic(n=1000)``. On top of the distinct streams, each scene
*content* (the sorted list of ``(shape, color, size, row, col)``) is assigned to exactly one
split by a seed-independent hash (80% train, 10% validation, 10% test), and a stream only keeps
candidates that hash to its split: no scene -- not even one with identical content -- is
shared between train, validation and test, whatever seeds the splits were generated with.

Records
-------
A record is a plain ``dict``::

    {"id", "scene_id", "split", "family", "qtype", "question", "answer", "options",
     "image" (PIL.Image.Image, RGB), "objects" (list of {shape, color, size, row, col})}

``options`` is the list of option texts for ``choice`` questions (empty otherwise) and
``qtype`` the question template (e.g. ``exists_color_swap``), for per-type breakdowns.
Questions of one scene share the same ``PIL.Image`` object. :func:`write_jsonl` /
:func:`read_jsonl` give a serialisable form (PNG files plus a JSONL file) and
:func:`to_hf_dataset` a :class:`datasets.Dataset`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = [
    "CHOICE_INSTRUCTION",
    "COLORS",
    "FAMILIES",
    "LETTERS",
    "NUMBER_WORDS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "VOCABULARY",
    "SceneQAConfig",
    "generate_questions",
    "generate_scenes",
    "load_synthetic",
    "read_jsonl",
    "render_scene",
    "score",
    "split_words",
    "to_hf_dataset",
    "write_jsonl",
]

# ----------------------------------------------------------------------------------------------
# Closed vocabularies
# ----------------------------------------------------------------------------------------------

FAMILIES: tuple[str, ...] = ("exists", "attribute", "count", "spatial", "choice")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
# Saturated, well separated hues (checked by eye at 48 px on the dark background).
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 60),
    "blue": (40, 90, 240),
    "yellow": (245, 225, 30),
    "purple": (160, 50, 210),
    "orange": (250, 140, 0),
}
COLORS: tuple[str, ...] = tuple(COLOR_RGB)
SIZES: tuple[str, ...] = ("small", "large")
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
YES_NO: tuple[str, ...] = ("yes", "no")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."

_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
# Cumulative upper bounds of the content-hash buckets of each split.
_SPLIT_BOUNDS = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}

_WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+|[^\sA-Za-z\d]")


def split_words(text: str) -> list[str]:
    """Split text into the word-level tokens that :data:`VOCABULARY` is made of.

    Words (with an optional apostrophe suffix, as in ``option's``), digit runs and single
    punctuation characters are tokens; whitespace (including newlines) separates them.
    Case is kept (``A`` the option letter differs from ``a`` the article).

    Parameters
    ----------
    text : str
        Question, answer or option text.

    Returns
    -------
    list of str
        The tokens, in order.
    """
    return _WORD_RE.findall(text)


_TEMPLATE_TEXT = (
    "Is there a an in the image ? What color shape size is object objects How many are "
    "left right of above below Answer with option's letter from given choices directly . "
    "A B C D yes no"
)


def _build_vocabulary() -> tuple[str, ...]:
    words: list[str] = []
    for group in (
        split_words(_TEMPLATE_TEXT),
        list(SHAPES),
        [SHAPE_PLURALS[s] for s in SHAPES],
        list(COLORS),
        list(SIZES),
        list(NUMBER_WORDS),
        list(LETTERS),
        list(YES_NO),
    ):
        for w in group:
            if w not in words:
                words.append(w)
    return tuple(words)


VOCABULARY: tuple[str, ...] = _build_vocabulary()
"""Every token (see :func:`split_words`) that can occur in a question, answer or option, in a
fixed order -- for building a word-level tokenizer."""

# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def _check_names(name: str, values: Any, known: Sequence[str], minimum: int) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a sequence of names from {list(known)}, got {values!r}")
    out = tuple(values)
    unknown = [v for v in out if v not in known]
    if unknown:
        raise ValueError(f"{name} contains unknown value(s) {unknown}; choose from {list(known)}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} contains duplicates: {list(out)}")
    if len(out) < minimum:
        raise ValueError(f"{name} needs at least {minimum} value(s), got {list(out)}")
    return out


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {value}")


@dataclass(frozen=True)
class SceneQAConfig:
    """Parameters of the synthetic scene-QA benchmark (validated at construction).

    Parameters
    ----------
    image_size : int, default 48
        Side of the square RGB image in pixels; must leave at least 8 px per grid cell
        (``image_size >= 8 * grid``).
    grid : int, default 3
        The image is divided into ``grid x grid`` cells; each object occupies one cell.
    min_objects, max_objects : int, default 1 and 4
        Number of objects per scene, drawn uniformly in ``[min_objects, max_objects]``;
        ``max_objects <= min(grid ** 2, 9)``.
    families : sequence of str, default :data:`FAMILIES`
        Question families to generate, cycled in this order by :func:`load_synthetic`.
    seed : int, default 0
        Non-negative base seed; scenes and questions are a pure function of it.
    shapes, colors : sequence of str, default :data:`SHAPES` and :data:`COLORS`
        Subsets of the known shapes and colours to draw from (at least two of each).
    choice_options : int, default 4
        Number of options of ``choice`` questions (2-4; fewer when the attribute has fewer
        values).
    questions_per_scene : int, default 1
        Questions asked about each scene by :func:`load_synthetic` (more questions per scene
        means fewer distinct images for the same number of records).
    background : tuple of int, default (32, 32, 32)
        RGB background colour.
    supersample : int, default 4
        Shapes are drawn at ``supersample`` times the resolution and box-filtered down
        (anti-aliasing); 1 disables it.
    """

    image_size: int = 48
    grid: int = 3
    min_objects: int = 1
    max_objects: int = 4
    families: tuple[str, ...] = FAMILIES
    seed: int = 0
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLORS
    choice_options: int = 4
    questions_per_scene: int = 1
    background: tuple[int, int, int] = (32, 32, 32)
    supersample: int = 4

    def __post_init__(self) -> None:
        _check_int("grid", self.grid, 2, 16)
        _check_int("image_size", self.image_size, 8 * self.grid)
        _check_int("min_objects", self.min_objects, 1)
        _check_int("max_objects", self.max_objects, self.min_objects, min(self.grid**2, len(NUMBER_WORDS)))
        _check_int("seed", self.seed, 0)
        _check_int("choice_options", self.choice_options, 2, len(LETTERS))
        _check_int("questions_per_scene", self.questions_per_scene, 1)
        _check_int("supersample", self.supersample, 1, 16)
        object.__setattr__(self, "families", _check_names("families", self.families, FAMILIES, 1))
        object.__setattr__(self, "shapes", _check_names("shapes", self.shapes, SHAPES, 2))
        object.__setattr__(self, "colors", _check_names("colors", self.colors, COLORS, 2))
        bg = self.background
        if (
            isinstance(bg, str)
            or not isinstance(bg, Sequence)
            or len(bg) != 3
            or any(
                isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c <= 255 for c in bg
            )
        ):
            raise ValueError(f"background must be three integers in [0, 255], got {bg!r}")
        object.__setattr__(self, "background", tuple(int(c) for c in bg))
        if "spatial" in self.families and self.max_objects < 2:
            raise ValueError("the 'spatial' family needs max_objects >= 2")


def _resolve_split(split: str) -> str:
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"split must be one of {list(SPLITS)} (or 'val'), got {split!r}")
    return _SPLIT_ALIASES[split]


# ----------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------


def _content_key(objects: Sequence[Mapping[str, Any]]) -> str:
    return ";".join(sorted(f"{o['shape']},{o['color']},{o['size']},{o['row']},{o['col']}" for o in objects))


def _content_split(objects: Sequence[Mapping[str, Any]]) -> str:
    """The split a scene content belongs to (seed-independent hash bucket)."""
    digest = hashlib.blake2b(_content_key(objects).encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    for name, (lo, hi) in _SPLIT_BOUNDS.items():
        if lo <= u < hi:
            return name
    return "test"  # pragma: no cover  (u < 1 always)


def _make_scene(config: SceneQAConfig, split: str, index: int) -> dict[str, Any]:
    rng = np.random.default_rng([config.seed, _SPLIT_CODES[split], index, 0])
    cells = config.grid**2
    for _ in range(100_000):
        k = int(rng.integers(config.min_objects, config.max_objects + 1))
        chosen = rng.choice(cells, size=k, replace=False)
        shapes = rng.integers(0, len(config.shapes), size=k)
        colors = rng.integers(0, len(config.colors), size=k)
        sizes = rng.integers(0, len(SIZES), size=k)
        offsets = rng.uniform(-1.0, 1.0, size=(k, 2))
        objects = [
            {
                "shape": config.shapes[int(shapes[j])],
                "color": config.colors[int(colors[j])],
                "size": SIZES[int(sizes[j])],
                "row": int(chosen[j]) // config.grid,
                "col": int(chosen[j]) % config.grid,
            }
            for j in range(k)
        ]
        if _content_split(objects) == split:
            order = sorted(range(k), key=lambda j: (objects[j]["row"], objects[j]["col"]))
            return {
                "scene_id": f"{split}-s{config.seed}-{index:06d}",
                "split": split,
                "index": index,
                "objects": [objects[j] for j in order],
                "offsets": [(round(float(offsets[j, 0]), 6), round(float(offsets[j, 1]), 6)) for j in order],
            }
    raise RuntimeError(f"could not draw a scene for split {split!r}")  # pragma: no cover


def _star_points(cx: float, cy: float, r: float, inner: float = 0.48) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * inner
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def render_scene(scene: Mapping[str, Any], config: SceneQAConfig | None = None) -> Image.Image:
    """Draw a scene.

    Parameters
    ----------
    scene : mapping
        A scene as returned by :func:`generate_scenes` (``objects`` and, optionally,
        ``offsets``: per-object jitter in ``[-1, 1]^2``, a fraction of the free space in the cell).
    config : SceneQAConfig, optional
        Image size, grid, background and supersampling (default ``SceneQAConfig()``).

    Returns
    -------
    PIL.Image.Image
        An RGB image of side ``config.image_size``.
    """
    config = config or SceneQAConfig()
    ss = config.supersample
    size = config.image_size
    canvas = Image.new("RGB", (size * ss, size * ss), config.background)
    draw = ImageDraw.Draw(canvas)
    offsets = scene.get("offsets") or [(0.0, 0.0)] * len(scene["objects"])
    g = config.grid
    for obj, (ox, oy) in zip(scene["objects"], offsets, strict=True):
        r, c = int(obj["row"]), int(obj["col"])
        if not (0 <= r < g and 0 <= c < g):
            raise ValueError(f"object {obj} lies outside the {g}x{g} grid")
        x0, x1 = c * size * ss // g, (c + 1) * size * ss // g
        y0, y1 = r * size * ss // g, (r + 1) * size * ss // g
        cell = min(x1 - x0, y1 - y0)
        d = cell * (0.86 if obj["size"] == "large" else 0.5)
        slack = (cell - d) / 2 * 0.8
        cx = (x0 + x1) / 2 + float(ox) * slack
        cy = (y0 + y1) / 2 + float(oy) * slack
        h = d / 2
        rgb = COLOR_RGB[obj["color"]]
        shape = obj["shape"]
        if shape == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=rgb)
        elif shape == "square":
            s = h * 0.86
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=rgb)
        elif shape == "triangle":
            draw.polygon([(cx, cy - h), (cx + h, cy + h * 0.8), (cx - h, cy + h * 0.8)], fill=rgb)
        elif shape == "star":
            draw.polygon(_star_points(cx, cy + h * 0.08, h * 1.05), fill=rgb)
        elif shape == "cross":
            t = h * 0.36
            draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=rgb)
            draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=rgb)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    return canvas.reduce(ss) if ss > 1 else canvas


def generate_scenes(
    n: int, split: str = "train", config: SceneQAConfig | None = None
) -> list[dict[str, Any]]:
    """Generate the first ``n`` scenes of a split.

    Parameters
    ----------
    n : int
        Number of scenes (>= 0).
    split : {"train", "validation", "test"}
        Split; ``"val"`` is accepted for ``"validation"``.
    config : SceneQAConfig, optional
        Generation parameters (default ``SceneQAConfig()``).

    Returns
    -------
    list of dict
        Scenes ``{"scene_id", "split", "index", "objects", "offsets", "image"}``, where
        ``objects`` is a list of ``{"shape", "color", "size", "row", "col"}`` sorted by cell.
        Scene ``i`` depends only on ``(config.seed, split, i)`` and the scene parameters.
    """
    config = config or SceneQAConfig()
    split = _resolve_split(split)
    _check_int("n", n, 0)
    scenes = []
    for i in range(n):
        scene = _make_scene(config, split, i)
        scene["image"] = render_scene(scene, config)
        scenes.append(scene)
    return scenes


# ----------------------------------------------------------------------------------------------
# Questions
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

_DIGITS = {str(i + 1): w for i, w in enumerate(NUMBER_WORDS)}
_LETTER_RE = re.compile(r"^\s*[\(\[]?\s*([A-Da-d])\s*(?:[\)\]\.:,]|\s|$)")


def _normalise(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(text.split())


def score(prediction: str, answer: str, family: str) -> bool:
    """Whether a model's prediction matches the reference answer.

    Both strings are lowercased and stripped of punctuation and extra whitespace. For
    ``choice`` the leading option letter is compared (``"A"``, ``"A."``, ``"(A)"``, ``"A. red"``
    all match ``"A"``). For the other families the prediction matches if it equals the answer
    or its first word does (``"Yes, there is."`` matches ``"yes"``); digits count as their
    number words (``"2"`` matches ``"two"``).

    Parameters
    ----------
    prediction : str
        Generated text.
    answer : str
        Reference answer of the record.
    family : str
        Question family of the record (one of :data:`FAMILIES`).

    Returns
    -------
    bool
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown question family {family!r}; choose from {list(FAMILIES)}")
    if family == "choice":
        m = _LETTER_RE.match(prediction)
        return bool(m) and m.group(1).upper() == answer.strip().strip("().").upper()
    pred = [_DIGITS.get(w, w) for w in _normalise(prediction).split()]
    ref = " ".join(_DIGITS.get(w, w) for w in _normalise(answer).split())
    if not pred:
        return False
    return " ".join(pred) == ref or pred[0] == ref


# ----------------------------------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------------------------------

_SAFE_RE = re.compile(r"[^A-Za-z0-9_.-]")


def write_jsonl(
    records: Sequence[Mapping[str, Any]], out_dir: str | Path, filename: str | None = None
) -> Path:
    """Write records as PNG images plus a JSONL file.

    Each line holds ``{"id", "image" (path relative to the JSONL file), "question", "answer",
    "family"}`` plus the optional fields present in the record (``scene_id``, ``split``,
    ``qtype``, ``options``, ``objects``). Records sharing a ``scene_id`` share one PNG
    (``images/<scene_id>.png``).

    Parameters
    ----------
    records : sequence of mapping
        Records as returned by :func:`load_synthetic` (``image`` a PIL image).
    out_dir : str or Path
        Output directory (created if needed).
    filename : str, optional
        Name of the JSONL file; default ``"<split>.jsonl"`` when all records share one split,
        else ``"data.jsonl"``.

    Returns
    -------
    Path
        Path of the JSONL file.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if filename is None:
        splits = {r.get("split") for r in records}
        filename = f"{splits.pop()}.jsonl" if len(splits) == 1 and None not in splits else "data.jsonl"
    path = out / filename
    written: set[str] = set()
    with path.open("w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            for key in ("id", "image", "question", "answer"):
                if key not in r:
                    raise ValueError(f"record {i} has no {key!r} field")
            stem = _SAFE_RE.sub("_", str(r.get("scene_id") or r["id"]))
            rel = f"images/{stem}.png"
            if rel not in written:
                image = r["image"]
                if not isinstance(image, Image.Image):
                    raise ValueError(f"record {i}: 'image' must be a PIL image, got {type(image).__name__}")
                image.save(out / rel, format="PNG")
                written.add(rel)
            line: dict[str, Any] = {
                "id": r["id"],
                "image": rel,
                "question": r["question"],
                "answer": r["answer"],
                "family": r.get("family"),
            }
            for key in ("scene_id", "split", "qtype", "options", "objects"):
                if key in r:
                    line[key] = r[key]
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read records written by :func:`write_jsonl` (or any JSON/JSONL list of such records).

    Parameters
    ----------
    path : str or Path
        A ``.jsonl`` file (one JSON object per line; blank lines are skipped) or a ``.json``
        file holding a list of objects. Each object needs string ``image``, ``question`` and
        ``answer`` fields; ``image`` is resolved relative to the file's directory.

    Returns
    -------
    list of dict
        The records, with ``image`` loaded as an RGB PIL image and ``image_path`` the
        resolved path. Records pointing at the same file share one image.

    Raises
    ------
    FileNotFoundError
        If the file, or an image it references, does not exist (the message names the line).
    ValueError
        If a line is not valid JSON or a record lacks a required field (naming the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    entries: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
        entries = [(f"{path}: record {i}", item) for i, item in enumerate(items)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
    cache: dict[Path, Image.Image] = {}
    records = []
    for where, item in entries:
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
        missing = [k for k in ("image", "question", "answer") if not isinstance(item.get(k), str)]
        if missing:
            raise ValueError(f"{where}: malformed record, missing or non-string field(s) {missing}")
        image_path = Path(item["image"])
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        if image_path not in cache:
            if not image_path.is_file():
                raise FileNotFoundError(f"{where}: image not found: {image_path}")
            try:
                with Image.open(image_path) as im:
                    cache[image_path] = im.convert("RGB")
            except OSError as e:
                raise ValueError(f"{where}: cannot read image {image_path}: {e}") from e
        record = dict(item)
        record["image"] = cache[image_path]
        record["image_path"] = str(image_path)
        records.append(record)
    return records


def to_hf_dataset(records: Sequence[Mapping[str, Any]]) -> datasets.Dataset:
    """Convert records to a :class:`datasets.Dataset` (needs the ``datasets`` extra).

    Parameters
    ----------
    records : sequence of mapping
        Records as returned by :func:`load_synthetic` or :func:`read_jsonl`.

    Returns
    -------
    datasets.Dataset
        Columns ``id, scene_id, split, family, qtype, question, answer, options, objects`` and
        ``image`` (a ``datasets.Image()`` feature, decoded back to PIL images).
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise ImportError("to_hf_dataset needs the 'datasets' package: pip install 'himap[data]'") from e
    obj_feature = {
        "shape": datasets.Value("string"),
        "color": datasets.Value("string"),
        "size": datasets.Value("string"),
        "row": datasets.Value("int32"),
        "col": datasets.Value("int32"),
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "scene_id": datasets.Value("string"),
            "split": datasets.Value("string"),
            "family": datasets.Value("string"),
            "qtype": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "options": datasets.List(datasets.Value("string")),
            "objects": datasets.List(obj_feature),
            "image": datasets.Image(),
        }
    )
    rows = [
        {
            "id": str(r["id"]),
            "scene_id": r.get("scene_id"),
            "split": r.get("split"),
            "family": r.get("family"),
            "qtype": r.get("qtype"),
            "question": r["question"],
            "answer": r["answer"],
            "options": list(r.get("options") or []),
            "objects": [dict(o) for o in r.get("objects") or []],
            "image": r["image"],
        }
        for r in records
    ]
    return datasets.Dataset.from_list(rows, features=features)
