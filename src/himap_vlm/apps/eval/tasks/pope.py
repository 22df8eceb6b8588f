"""POPE: yes/no object-hallucination probes; accuracy, precision, recall, F1 and yes-ratio.

Prompt (LLaVA-1.5)::

    {question}
    Answer the question using a single word or phrase.

Parsing follows LLaVA's ``eval_pope.py``: keep the text before the first period, drop commas,
split on spaces; the answer is "no" if one of the words is ``No``, ``no`` or ``not``, else
"yes". "yes" is the positive class.

Metrics (percent) for each split found in the data (``random``, ``popular``, ``adversarial``,
from the ``category`` field) as ``<split>/accuracy``, ``<split>/precision``, ``<split>/recall``,
``<split>/f1``, ``<split>/yes_ratio``; the same pooled over all samples without prefix; and
``f1_mean``/``accuracy_mean``, the unweighted means over the splits (the single POPE number
of the LLaVA-1.5 and token-pruning tables is the F1 averaged over the three splits).

Layouts read
------------
1. **LLaVA** (``playground/data/eval/pope``): ``llava_pope_test.jsonl``, lines
   ``{"question_id", "image", "text", "category"}`` (``text`` may end with the instruction).
   Images: ``image`` relative to ``image_dir`` (default ``<folder>/val2014``, then
   ``<folder>``). Labels: a ``label``/``answer`` field if present, else the POPE annotation
   files ``coco_pope_<category>.json`` (JSON lines ``{"question_id", "image", "text",
   "label"}``) in ``annotations`` (a file or folder) or ``<folder>/coco``; as in
   ``eval_pope.py`` the k-th question of a category gets the k-th label of its file (checked
   against the question text).
2. **POPE annotation files**: a folder holding only ``coco_pope_*.json`` files (or one such
   file); the category is taken from the file name.
3. **Hugging Face** ``lmms-lab/POPE`` (split ``test``): columns ``question_id``, ``question``,
   ``answer``, ``category``, ``image``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..io import DataFormatError, first_present, iter_hf_rows, iter_jsonl, require, resolve_image
from ..metrics.classification import BinaryStats, binary_stats, mean
from .base import SHORT_ANSWER_INSTRUCTION, Sample, Task, strip_suffix

POPE_SPLITS = ("random", "popular", "adversarial")


def _yes_no(value: Any, where: object) -> str:
    v = str(value).strip().lower().rstrip(".")
    if v not in ("yes", "no"):
        raise DataFormatError(f"Malformed record at {where}: label {value!r} is not yes/no")
    return v


def parse_pope_answer(text: str) -> str:
    """LLaVA's ``eval_pope.py`` rule: ``"no"`` if the first sentence contains No/no/not, else ``"yes"``."""
    text = text.strip()  # LLaVA strips the decoded output before evaluation
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


class POPE(Task):
    """POPE (see module docstring for layouts)."""

    name = "pope"
    primary_metric = "f1_mean"
    hub_id = "lmms-lab/POPE"
    hub_split = "test"

    def _iter_local(
        self,
        path: Path,
        *,
        split: str | None,
        image_dir: Path | None,
        annotations: Path | None,
        check_images: bool,
    ) -> Iterator[Sample]:
        folder = path if path.is_dir() else path.parent
        roots = [image_dir] if image_dir is not None else [folder / "val2014", folder]
        if path.is_dir():
            qfile = folder / "llava_pope_test.jsonl"
            if not qfile.is_file():
                files = sorted(folder.glob("coco_pope_*.json"))
                if not files:
                    raise FileNotFoundError(
                        f"No POPE data in {folder}: looked for llava_pope_test.jsonl, coco_pope_*.json"
                    )
                for f in files:
                    yield from self._iter_annotation_file(f, roots, check_images)
                return
        else:
            qfile = path
            if qfile.name.startswith("coco_pope_"):
                yield from self._iter_annotation_file(qfile, roots, check_images)
                return
        labels = _LabelFiles(annotations if annotations is not None else folder / "coco")
        position: dict[str, int] = defaultdict(int)
        for where, rec in iter_jsonl(qfile):
            sid = str(require(rec, "question_id", where))
            text = str(require(rec, ("text", "question"), where))
            question = strip_suffix(text, (SHORT_ANSWER_INSTRUCTION,))
            category = rec.get("category")
            gold = first_present(rec, ("label", "answer"))
            if gold is None:
                if category is None:
                    raise DataFormatError(f"Malformed record at {where}: missing field 'label' or 'category'")
                k = position[category]
                position[category] += 1
                gold = labels.get(str(category), k, question, where)
            yield Sample(
                id=sid,
                image=resolve_image(require(rec, "image", where), roots, sample_id=sid, check=check_images),
                question=question,
                answer=_yes_no(gold, where),
                meta={"category": category},
            )

    def _iter_annotation_file(
        self, file: Path, roots: list[Path | None], check_images: bool
    ) -> Iterator[Sample]:
        category = file.stem[len("coco_pope_") :] if file.stem.startswith("coco_pope_") else None
        for where, rec in iter_jsonl(file):
            qid = str(require(rec, "question_id", where))
            sid = f"{category}/{qid}" if category else qid
            yield Sample(
                id=sid,
                image=resolve_image(require(rec, "image", where), roots, sample_id=sid, check=check_images),
                question=strip_suffix(
                    str(require(rec, ("text", "question"), where)), (SHORT_ANSWER_INSTRUCTION,)
                ),
                answer=_yes_no(require(rec, ("label", "answer"), where), where),
                meta={"category": category or rec.get("category")},
            )

    def _iter_hf(self, ds: Any, *, image_dir: Path | None, check_images: bool) -> Iterator[Sample]:
        for i, row, ref, _ in iter_hf_rows(ds, image_column="image"):
            where = f"dataset row {i}"
            category = row.get("category")
            qid = first_present(row, ("question_id", "id"), i)
            gold = row.get("answer")
            yield Sample(
                id=f"{category}/{qid}" if category else str(qid),
                image=ref,
                question=str(require(row, "question", where)),
                answer=None if gold is None else _yes_no(gold, where),
                meta={"category": category},
            )

    def prompt(self, sample: Sample) -> str:
        """Question plus LLaVA's short-answer instruction."""
        return f"{sample.question}\n{SHORT_ANSWER_INSTRUCTION}"

    def parse(self, sample: Sample, generated_text: str) -> str:
        """``"yes"`` or ``"no"`` (LLaVA's rule, see :func:`parse_pope_answer`)."""
        return parse_pope_answer(generated_text)

    def score_sample(self, sample: Sample, prediction: Any) -> float | None:
        """1 if the yes/no prediction equals the label."""
        if sample.answer is None:
            return None
        return 1.0 if prediction == sample.answer else 0.0

    def metrics(self, samples: Sequence[Sample], predictions: Sequence[Any]) -> dict[str, float]:
        """Pooled and per-split accuracy, precision, recall, F1, yes-ratio (percent)."""
        scored, preds, unscored = self._scored(samples, predictions)
        out: dict[str, float] = {}
        if scored:
            out.update(_stats(binary_stats(preds, [s.answer for s in scored])))
        out["n"] = len(scored)
        if unscored:
            out["n_unscored"] = unscored
        by: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for s, p in zip(scored, preds, strict=True):
            cat = s.meta.get("category")
            if cat is not None:
                by[str(cat)][0].append(p)
                by[str(cat)][1].append(s.answer)
        order = [c for c in POPE_SPLITS if c in by] + sorted(c for c in by if c not in POPE_SPLITS)
        per_split = {}
        for cat in order:
            st = binary_stats(*by[cat])
            per_split[cat] = st
            for k, v in _stats(st).items():
                out[f"{cat}/{k}"] = v
            out[f"{cat}/n"] = st.total
        if per_split:
            out["f1_mean"] = 100.0 * mean([st.f1 for st in per_split.values()])
            out["accuracy_mean"] = 100.0 * mean([st.accuracy for st in per_split.values()])
        elif scored:
            out["f1_mean"] = out["f1"]
            out["accuracy_mean"] = out["accuracy"]
        return out


def _stats(st: BinaryStats) -> dict[str, float]:
    return {
        "accuracy": 100.0 * st.accuracy,
        "precision": 100.0 * st.precision,
        "recall": 100.0 * st.recall,
        "f1": 100.0 * st.f1,
        "yes_ratio": 100.0 * st.yes_ratio,
    }


class _LabelFiles:
    """Labels of ``coco_pope_<category>.json`` files, read on first use."""

    def __init__(self, location: Path) -> None:
        self.location = location
        self._cache: dict[str, list[tuple[str, str]]] = {}

    def get(self, category: str, k: int, question: str, where: object) -> str:
        if category not in self._cache:
            folder = self.location.parent if self.location.is_file() else self.location
            file = folder / f"coco_pope_{category}.json"
            if not file.is_file():
                raise FileNotFoundError(
                    f"No label for {where}: the record has no 'label' and the annotation file {file} does not exist "
                    "(pass annotations=<folder with coco_pope_*.json>)"
                )
            self._cache[category] = [
                (
                    str(require(r, "label", w)),
                    strip_suffix(str(r.get("text", "")), (SHORT_ANSWER_INSTRUCTION,)),
                )
                for w, r in iter_jsonl(file)
            ]
        labels = self._cache[category]
        if k >= len(labels):
            raise DataFormatError(
                f"{where}: question {k + 1} of category {category!r} has no label in its annotation file"
            )
        label, text = labels[k]
        if text and text != question:
            raise DataFormatError(
                f"{where}: question {question!r} does not match the {k + 1}-th label's question {text!r} "
                f"of category {category!r}"
            )
        return label
