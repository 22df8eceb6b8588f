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

Modules
-------
:mod:`.vocab` (closed vocabularies, :func:`split_words`), :mod:`.config` (:class:`SceneQAConfig`),
:mod:`.scenes` (drawing and rendering scenes), :mod:`.questions` (question families and
:func:`load_synthetic`), :mod:`.scoring` (:func:`score`) and :mod:`.files` (JSONL, ``datasets``).
Everything is importable from this package, as it always was.
"""

from __future__ import annotations

from .config import SceneQAConfig
from .files import read_jsonl, to_hf_dataset, write_jsonl
from .questions import generate_questions, load_synthetic
from .scenes import generate_scenes, render_scene
from .scoring import score
from .vocab import (
    CHOICE_INSTRUCTION,
    COLOR_RGB,
    COLORS,
    FAMILIES,
    LETTERS,
    NUMBER_WORDS,
    RELATIONS,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
    SPLITS,
    VOCABULARY,
    YES_NO,
    split_words,
)

__all__ = [
    "CHOICE_INSTRUCTION",
    "COLORS",
    "COLOR_RGB",
    "FAMILIES",
    "LETTERS",
    "NUMBER_WORDS",
    "RELATIONS",
    "SHAPES",
    "SHAPE_PLURALS",
    "SIZES",
    "SPLITS",
    "VOCABULARY",
    "YES_NO",
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
