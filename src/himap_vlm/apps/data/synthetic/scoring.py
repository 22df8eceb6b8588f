"""Scoring a generated answer against a record's reference answer."""

from __future__ import annotations

import re

from .vocab import FAMILIES, NUMBER_WORDS

__all__ = ["score"]

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
