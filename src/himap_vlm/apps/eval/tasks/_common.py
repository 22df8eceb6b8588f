"""Pieces shared by several tasks: accuracy aggregation and the multiple-choice task base."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from ..metrics.choice import LETTERS, MC_INSTRUCTION, format_options, parse_option_letter
from ..metrics.classification import mean
from .base import SHORT_ANSWER_INSTRUCTION, Sample, Task

__all__ = ["accuracy_metrics", "MultipleChoiceTask", "ShortAnswerTask", "letter_of"]


def accuracy_metrics(
    task: Task,
    samples: Sequence[Sample],
    predictions: Sequence[Any],
    *,
    group: Callable[[Sample], str | None] | None = None,
    group_prefix: str = "accuracy",
) -> dict[str, float]:
    """Mean of :meth:`Task.score_sample` in percent, overall and per group.

    Returns
    -------
    dict
        ``accuracy`` (omitted if nothing could be scored), ``n`` (scored samples),
        ``n_unscored`` (samples without gold answer, if any) and ``{group_prefix}/{group}``.
    """
    scored, preds, unscored = Task._scored(samples, predictions)
    scores = [float(task.score_sample(s, p) or 0.0) for s, p in zip(scored, preds, strict=True)]
    out: dict[str, float] = {}
    if scores:
        out["accuracy"] = 100.0 * mean(scores)
    out["n"] = len(scores)
    if unscored:
        out["n_unscored"] = unscored
    if group is not None:
        by: dict[str, list[float]] = defaultdict(list)
        for s, v in zip(scored, scores, strict=True):
            g = group(s)
            if g is not None:
                by[str(g)].append(v)
        for g in sorted(by):
            out[f"{group_prefix}/{g}"] = 100.0 * mean(by[g])
    return out


def letter_of(answer: Any, n_choices: int, where: object) -> str:
    """Turn a gold answer given as an index (``2``, ``"2"``) or a letter (``"C"``) into a letter."""
    from ..io import DataFormatError

    if isinstance(answer, bool):
        raise DataFormatError(f"Malformed record at {where}: answer {answer!r} is not an index or letter")
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        idx = int(answer)
        if not 0 <= idx < max(n_choices, 1):
            raise DataFormatError(
                f"Malformed record at {where}: answer index {idx} out of range ({n_choices} choices)"
            )
        return LETTERS[idx]
    if isinstance(answer, str):
        letter = answer.strip().strip("().").upper()
        if len(letter) == 1 and letter in LETTERS[: max(n_choices, 1)]:
            return letter
    raise DataFormatError(f"Malformed record at {where}: cannot read an option letter from answer {answer!r}")


class MultipleChoiceTask(Task):
    """Lettered multiple choice in LLaVA-1.5's format.

    The prompt is ``[hint_prefix + hint + "\\n"] + question + "\\n" + "A. ...\\nB. ..." + "\\n" +
    "Answer with the option's letter from the given choices directly."``; a sample whose
    ``meta["prompt_text"]`` holds an already formatted question (LLaVA's own question files)
    uses that text verbatim before the instruction. ``sample.answer`` is the gold letter and
    ``meta["choices"]`` the option texts.
    """

    hint_prefix: ClassVar[str] = ""
    instruction: ClassVar[str] = MC_INSTRUCTION

    def prompt(self, sample: Sample) -> str:
        """Question, options and the letter instruction."""
        body = sample.meta.get("prompt_text")
        if body is None:
            parts = []
            hint = sample.meta.get("hint")
            if hint:
                parts.append(f"{self.hint_prefix}{hint}")
            parts.append(sample.question)
            choices = sample.meta.get("choices") or []
            if choices:
                parts.append(format_options(choices))
            body = "\n".join(parts)
        return f"{body}\n{self.instruction}"

    def answer_instruction(self, sample: Sample) -> str | None:
        """The letter instruction (always appended)."""
        return self.instruction

    def parse(self, sample: Sample, generated_text: str) -> str | None:
        """The chosen letter (``None`` if none can be read, which scores as wrong)."""
        return parse_option_letter(generated_text, sample.meta.get("choices") or None)

    def score_sample(self, sample: Sample, prediction: Any) -> float | None:
        """1 if the letter is the gold letter, else 0."""
        if sample.answer is None:
            return None
        return 1.0 if prediction is not None and prediction == sample.answer else 0.0

    def metrics(self, samples: Sequence[Sample], predictions: Sequence[Any]) -> dict[str, float]:
        """Accuracy (percent), overall and per ``meta["category"]``."""
        return accuracy_metrics(self, samples, predictions, group=lambda s: s.meta.get("category"))


class ShortAnswerTask(Task):
    """Open-ended VQA with LLaVA-1.5's prompt ``question + "\\nAnswer the question using a single word or phrase."``.

    :meth:`parse` returns the generated text stripped of surrounding whitespace; subclasses
    normalise it in :meth:`score_sample`.
    """

    def prompt(self, sample: Sample) -> str:
        """Question plus the short-answer instruction."""
        return f"{sample.question}\n{SHORT_ANSWER_INSTRUCTION}"

    def parse(self, sample: Sample, generated_text: str) -> str:
        """The generated text, stripped."""
        return generated_text.strip()

    def metrics(self, samples: Sequence[Sample], predictions: Sequence[Any]) -> dict[str, float]:
        """Accuracy (percent) overall and per ``meta["category"]`` when present."""
        return accuracy_metrics(self, samples, predictions, group=lambda s: s.meta.get("category"))
