"""MMBench (English): lettered multiple choice with options from the A-D columns, accuracy.

Prompt (LLaVA-1.5's ``model_vqa_mmbench.py``)::

    {hint}                      <- only when the hint is not empty
    {question}
    A. {A}
    B. {B}                      <- options stop at the first empty column
    Answer with the option's letter from the given choices directly.

Metrics: ``accuracy`` (percent) and ``accuracy/<category>``; when several samples share a
circular group (``index % 1_000_000``, the convention of MMBench's circular copies),
``circular_accuracy`` counts a group correct only if all its samples are (MMBench's
CircularEval). Predictions are read locally (letter or exact option text); the official
leaderboard additionally matches free-form answers with ChatGPT.

Layouts read
------------
1. **MMBench TSV** (LLaVA's ``playground/data/eval/mmbench``): ``mmbench_dev_20230712.tsv`` /
   ``MMBench_DEV_EN.tsv``, columns ``index``, ``question``, ``hint``, ``A``..``D`` (``E`` if
   present), ``answer`` (absent in the test split), ``category``, ``l2-category``, ``image``
   (base64; a short number instead refers to the row of that ``index``). A folder is searched
   for ``*dev*.tsv`` then ``*.tsv``.
2. **Hugging Face** ``lmms-lab/MMBench`` config ``en`` (split ``dev``): the same columns, with
   ``image`` an image feature.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..io import Base64ImageRef, DataFormatError, find_file, is_missing, iter_hf_rows, iter_tsv, require
from ..metrics.classification import mean
from ._common import MultipleChoiceTask, accuracy_metrics, letter_of
from .base import Sample

OPTION_COLUMNS = ("A", "B", "C", "D", "E")


def _options(row: dict[str, Any]) -> list[str]:
    out = []
    for col in OPTION_COLUMNS:
        if col not in row or is_missing(row[col]):
            break
        out.append(str(row[col]))
    return out


def _int_or_str(value: Any) -> int | str:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return str(value)


class MMBench(MultipleChoiceTask):
    """MMBench-EN (see module docstring for layouts)."""

    name = "mmbench"
    hint_prefix = ""
    hub_id = "lmms-lab/MMBench:en"
    hub_split = "dev"

    def _sample(self, row: dict[str, Any], where: object, image: Any) -> Sample:
        index = _int_or_str(require(row, "index", where))
        choices = _options(row)
        if not choices:
            raise DataFormatError(f"Malformed record at {where}: no options (columns A, B, ...)")
        gold = row.get("answer")
        return Sample(
            id=str(index),
            image=image,
            question=str(require(row, "question", where)),
            answer=None if is_missing(gold) else letter_of(gold, len(choices), where),
            meta={
                "choices": choices,
                "hint": None if is_missing(row.get("hint")) else str(row["hint"]),
                "category": None if is_missing(row.get("category")) else str(row["category"]),
                "circular_group": index % 1_000_000 if isinstance(index, int) else index,
            },
        )

    def _iter_local(
        self,
        path: Path,
        *,
        split: str | None,
        image_dir: Path | None,
        annotations: Path | None,
        check_images: bool,
    ) -> Iterator[Sample]:
        tsv = (
            find_file(path, (f"*{split or 'dev'}*.tsv", "*.tsv"), what="MMBench TSV")
            if path.is_dir()
            else path
        )
        rows = list(iter_tsv(tsv))
        images = {str(r.get("index")): r.get("image", "") for _, r in rows}
        for where, row in rows:
            data = require(row, "image", where)
            if len(data) <= 64:  # a reference to the row that holds the image
                if data not in images or len(images[data]) <= 64:
                    raise DataFormatError(
                        f"Malformed record at {where}: image refers to unknown index {data!r}"
                    )
                data = images[data]
            yield self._sample(row, where, Base64ImageRef(data))

    def _iter_hf(self, ds: Any, *, image_dir: Path | None, check_images: bool) -> Iterator[Sample]:
        for i, row, ref, _ in iter_hf_rows(ds, image_column="image"):
            yield self._sample(row, f"dataset row {i}", ref)

    def metrics(self, samples: Sequence[Sample], predictions: Sequence[Any]) -> dict[str, float]:
        """Accuracy overall and per category, plus circular accuracy when groups exist."""
        out = accuracy_metrics(self, samples, predictions, group=lambda s: s.meta.get("category"))
        scored, preds, _ = self._scored(samples, predictions)
        groups: dict[Any, list[float]] = defaultdict(list)
        for s, p in zip(scored, preds, strict=True):
            groups[s.meta.get("circular_group", s.id)].append(float(self.score_sample(s, p) or 0.0))
        if groups and any(len(v) > 1 for v in groups.values()):
            out["circular_accuracy"] = 100.0 * mean(
                [1.0 if all(v == 1.0 for v in g) else 0.0 for g in groups.values()]
            )
            out["n_circular_groups"] = len(groups)
        return out
