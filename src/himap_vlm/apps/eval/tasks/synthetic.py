"""The himap synthetic scene-QA benchmark (``synthetic``): accuracy overall and per question family.

Data: without ``data``, the questions are generated in memory
(:func:`himap_vlm.apps.data.synthetic.load_synthetic`): the ``test`` split (or ``split``), the
first ``limit`` questions (default :data:`DEFAULT_N`), drawn with the task options ``seed``
(default 0) and ``image_size`` (default 48 px, the shipped tiny LLaVA's input size) -- the
questions ``himap demo`` asks. Otherwise a JSONL file, one ``{"id", "image", "question",
"answer", "family"}`` per line (what :func:`~himap_vlm.apps.data.synthetic.write_jsonl` writes),
with ``image`` relative to the file's folder (or to ``image_dir``). A folder is searched for a
single ``*.jsonl``. An optional ``"prompt"`` field is used verbatim as the prompt. A Hugging
Face dataset with the same columns (``image`` an image feature) works too.

Prompt: the question, then ``"Answer with the option's letter from the given choices
directly."`` if the question lists lettered options (lines ``"A. ..."``), otherwise
``"Answer the question using a single word or phrase."`` (LLaVA-1.5's instructions); nothing
is appended to a question that already ends with an ``"Answer ..."`` instruction (the
generated ``choice`` questions carry their own). The appended line is the task's
:meth:`~Synthetic.answer_instruction`: a model trained on the bare questions (the shipped tiny
LLaVA, whose tokenizer cannot even spell the short-answer instruction) is asked without it,
see :mod:`himap_vlm.apps.eval.prompts`.

Scoring: exact match after normalisation (lowercase, punctuation removed, number words
zero..twenty as digits, articles removed, whitespace collapsed). A gold answer that is a
single letter A-Z is an option letter: the prediction's letter is read with
:func:`~himap_vlm.apps.eval.metrics.choice.parse_option_letter`, so ``"A"``, ``"A."``, ``"(A)"`` and
``"A. red"`` all count as A (and so does the exact text of option A when the question lists it).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..io import DataFormatError, find_file, first_present, iter_hf_rows, iter_jsonl, require, resolve_image
from ..metrics.choice import LETTERS, MC_INSTRUCTION, parse_option_letter, split_options
from ._common import accuracy_metrics
from .base import SHORT_ANSWER_INSTRUCTION, Sample, Task

_NUMBERS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
NUMBER_WORDS = {w: str(i) for i, w in enumerate(_NUMBERS)}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_INSTRUCTION_END = re.compile(r"\n\s*Answer\b[^\n]*$")

DEFAULT_N = 1000
"""Questions generated when the task gets no ``data`` and no ``limit``."""


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, number words to digits, drop articles, collapse spaces."""
    words = _PUNCT.sub(" ", text.lower()).split()
    words = [NUMBER_WORDS.get(w, w) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def _is_letter(answer: Any) -> bool:
    return isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip() in LETTERS


class Synthetic(Task):
    """The himap synthetic scene-QA benchmark (see module docstring)."""

    name = "synthetic"
    max_new_tokens = 16

    def __init__(self, seed: int = 0, image_size: int = 48) -> None:
        for key, value, low in (("seed", seed, 0), ("image_size", image_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"synthetic: task option {key} must be an integer >= {low}; got {value!r}")
        self.seed = seed
        self.image_size = image_size

    def load(self, data: Any = None, *, split: str | None = None, limit: int | None = None, **kwargs: Any) -> list[Sample]:
        """Read ``data`` like every task, or without ``data`` generate the questions (module docstring)."""
        if data is not None:
            return super().load(data, split=split, limit=limit, **kwargs)
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        return self.generate(DEFAULT_N if limit is None else limit, split or "test")

    def generate(self, n: int, split: str = "test") -> list[Sample]:
        """The first ``n`` generated questions of ``split`` as samples (``meta``: ``family``, ``qtype``).

        The image side is ``max(image_size, 24)`` px (the smallest the 3 x 3 scene grid allows).
        """
        from himap_vlm.apps.data.synthetic import SceneQAConfig, load_synthetic

        config = SceneQAConfig(image_size=max(self.image_size, 8 * SceneQAConfig.grid), seed=self.seed)
        return [
            Sample(
                id=str(r["id"]),
                image=r["image"],
                question=r["question"],
                answer=r["answer"],
                meta={"family": r["family"], "qtype": r["qtype"]},
            )
            for r in load_synthetic(split, n, config)
        ]

    def _iter_local(
        self,
        path: Path,
        *,
        split: str | None,
        image_dir: Path | None,
        annotations: Path | None,
        check_images: bool,
    ) -> Iterator[Sample]:
        if path.is_dir():
            files = sorted(path.glob("*.jsonl"))
            if split is not None:
                file = find_file(
                    path, (f"{split}.jsonl", f"*{split}*.jsonl"), what=f"synthetic {split!r} file"
                )
            elif len(files) == 1:
                file = files[0]
            else:
                found = ", ".join(f.name for f in files) or "none"
                raise FileNotFoundError(
                    f"Expected one .jsonl file in {path} (found: {found}); pass the file or split="
                )
        else:
            file = path
        roots = [image_dir] if image_dir is not None else [file.parent]
        for where, rec in iter_jsonl(file):
            sid = str(require(rec, "id", where))
            answer = require(rec, "answer", where)
            if isinstance(answer, (dict, list)):
                raise DataFormatError(f"Malformed record at {where}: 'answer' must be a string or number")
            yield Sample(
                id=sid,
                image=resolve_image(require(rec, "image", where), roots, sample_id=sid, check=check_images),
                question=str(require(rec, "question", where)),
                answer=str(answer),
                meta={"family": str(require(rec, "family", where)), "prompt": rec.get("prompt")},
            )

    def _iter_hf(self, ds: Any, *, image_dir: Path | None, check_images: bool) -> Iterator[Sample]:
        for i, row, ref, _ in iter_hf_rows(ds, image_column="image"):
            where = f"dataset row {i}"
            sid = str(first_present(row, ("id",), i))
            image: Any = ref
            if ref is None:
                if image_dir is None:
                    raise ValueError("This dataset names its images by path: pass image_dir=<their folder>")
                image = resolve_image(
                    require(row, "image", where), [image_dir], sample_id=sid, check=check_images
                )
            yield Sample(
                id=sid,
                image=image,
                question=str(require(row, "question", where)),
                answer=str(require(row, "answer", where)),
                meta={"family": str(row.get("family", "all")), "prompt": row.get("prompt")},
            )

    def prompt(self, sample: Sample) -> str:
        """The record's ``prompt``, or the question plus the matching LLaVA instruction."""
        if sample.meta.get("prompt"):
            return str(sample.meta["prompt"])
        question = sample.question.rstrip()
        instruction = self.answer_instruction(sample)
        return f"{question}\n{instruction}" if instruction else question

    def answer_instruction(self, sample: Sample) -> str | None:
        """The LLaVA instruction appended to the question (``None``: a record ``prompt``, or one of its own)."""
        if sample.meta.get("prompt"):
            return None
        question = sample.question.rstrip()
        if _INSTRUCTION_END.search(question):
            return None
        _, choices = split_options(question)
        return MC_INSTRUCTION if choices else SHORT_ANSWER_INSTRUCTION

    def parse(self, sample: Sample, generated_text: str) -> str:
        """The option letter for letter questions (``""`` if none), else the normalised answer."""
        if _is_letter(sample.answer):
            _, choices = split_options(sample.question)
            return parse_option_letter(generated_text, choices or None) or ""
        return normalize_answer(generated_text)

    def score_sample(self, sample: Sample, prediction: Any) -> float | None:
        """1 if the prediction matches the gold answer after normalisation."""
        if sample.answer is None:
            return None
        if _is_letter(sample.answer):
            return 1.0 if str(prediction).strip() == sample.answer.strip() else 0.0
        return 1.0 if normalize_answer(str(prediction)) == normalize_answer(str(sample.answer)) else 0.0

    def metrics(self, samples: Sequence[Sample], predictions: Sequence[Any]) -> dict[str, float]:
        """Accuracy (percent) overall and ``accuracy/<family>``."""
        return accuracy_metrics(self, samples, predictions, group=lambda s: s.meta.get("family"))
