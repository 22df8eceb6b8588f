"""Multiple-choice helpers: option formatting and extraction of the chosen letter."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

__all__ = ["LETTERS", "MC_INSTRUCTION", "format_options", "parse_option_letter", "split_options"]

LETTERS = string.ascii_uppercase
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."

# "A", "A.", "A)", "A:", "A,", "A\n...", "(A)", "[A]", "A. red", "(A) red" -- a capital letter that is not
# the start of a word ("A dog" is not an option letter).
_LEADING = re.compile(r"^(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])(?:[.:),\n]|$))")
# "The answer is A.", "Answer: (B)", "the correct option is C"
_PHRASE = re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*)?:?\s*[\(\[]?([A-Z])(?![A-Za-z])")
_OPTION_LINE = re.compile(r"^([A-Z])\. (.*)$")


def format_options(choices: Sequence[str]) -> str:
    """``"A. first\\nB. second..."``, the option block of LLaVA-1.5's multiple-choice prompts."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def split_options(text: str) -> tuple[str, list[str]]:
    """Split a formatted question into its stem and the trailing ``"A. ..."`` option lines.

    Returns
    -------
    stem : str
        The text before the option block (the whole text if there is none).
    choices : list of str
        Option texts in order (empty if the text does not end with an A, B, ... block).
    """
    lines = text.split("\n")
    start = len(lines)
    while start > 0 and _OPTION_LINE.match(lines[start - 1]):
        start -= 1
    block = lines[start:]
    letters = [_OPTION_LINE.match(line).group(1) for line in block]  # type: ignore[union-attr]
    if not block or letters != list(LETTERS[: len(block)]):
        return text, []
    choices = [_OPTION_LINE.match(line).group(2) for line in block]  # type: ignore[union-attr]
    return "\n".join(lines[:start]), choices


def _norm(text: str) -> str:
    text = text.strip().lower().rstrip(".").strip()
    return " ".join(text.split())


def parse_option_letter(
    text: str, choices: Sequence[str] | None = None, n_choices: int | None = None
) -> str | None:
    """Extract the option letter a model chose.

    Accepted, in order: a leading letter (``"A"``, ``"A."``, ``"(A)"``, ``"A. red"``,
    ``"A)"``, ``"A:"``); a phrase such as ``"The answer is A."`` or ``"Answer: (B)"`` (LLaVA's
    ScienceQA rule); the exact text of one of ``choices`` (case and a final period ignored).

    Parameters
    ----------
    text
        The generated text.
    choices
        Option texts, used for the range of valid letters and for text matching.
    n_choices
        Number of options, if ``choices`` is not given.

    Returns
    -------
    str or None
        The letter, or ``None`` if no valid letter could be extracted (counted as wrong).
    """
    n = len(choices) if choices is not None else n_choices
    valid = LETTERS[:n] if n else LETTERS
    t = text.strip()
    if not t:
        return None
    m = _LEADING.match(t)
    if m:
        letter = next(g for g in m.groups() if g)
        return letter if letter in valid else None
    m = _PHRASE.search(t)
    if m and m.group(1) in valid:
        return m.group(1)
    if choices:
        target = _norm(t)
        matches = [LETTERS[i] for i, c in enumerate(choices) if _norm(str(c)) == target]
        if len(matches) == 1:
            return matches[0]
    return None
