"""Closed vocabularies of the synthetic scene-QA benchmark and its word-level tokenisation."""

from __future__ import annotations

import re

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
    "split_words",
]


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
