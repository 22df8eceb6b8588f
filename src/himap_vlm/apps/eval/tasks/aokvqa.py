"""A-OKVQA, multiple-choice setting (``aokvqa_mc``): four lettered options, accuracy.

Prompt (LLaVA-1.5's A-OKVQA format)::

    {question}
    A. {choice 0}
    B. {choice 1}
    C. {choice 2}
    D. {choice 3}
    Answer with the option's letter from the given choices directly.

Layouts read
------------
1. **A-OKVQA release**: ``aokvqa_v1p0_val.json`` (a JSON list, or any ``.json``/``.jsonl`` of
   such records) with ``question_id``, ``image_id``, ``question``, ``choices``,
   ``correct_choice_idx`` (absent in the test split: answer ``None``). A folder is searched for
   ``aokvqa_v1p0_<split>.json`` (``split`` defaults to ``val``). Images are COCO 2017 files
   ``{image_id:012d}.jpg``, looked up in ``image_dir``, ``image_dir/<split>2017``,
   ``<folder>/<split>2017``, ``<folder>/coco/<split>2017`` and ``<folder>/images``; a record
   with an ``image`` field (relative path) uses that instead.
2. **Hugging Face** ``HuggingFaceM4/A-OKVQA`` (split ``validation``): columns ``image``,
   ``question_id``, ``question``, ``choices``, ``correct_choice_idx``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..io import find_file, first_present, iter_hf_rows, iter_json_records, require, resolve_image
from ._common import MultipleChoiceTask, letter_of
from .base import Sample


class AOKVQAMultipleChoice(MultipleChoiceTask):
    """A-OKVQA multiple choice (see module docstring for layouts)."""

    name = "aokvqa_mc"
    hub_id = "HuggingFaceM4/A-OKVQA"
    hub_split = "validation"

    def _iter_local(
        self,
        path: Path,
        *,
        split: str | None,
        image_dir: Path | None,
        annotations: Path | None,
        check_images: bool,
    ) -> Iterator[Sample]:
        split = split or "val"
        if path.is_dir():
            qfile = find_file(
                path, (f"aokvqa_v1p0_{split}.json", f"*{split}*.json", "*.jsonl"), what="A-OKVQA file"
            )
        else:
            qfile = path
            for s in ("train", "val", "test"):
                if f"_{s}" in qfile.stem:
                    split = s
        folder = qfile.parent
        coco = f"{split}2017"
        roots: list[Path | None] = ([image_dir, image_dir / coco] if image_dir is not None else []) + [
            folder / coco,
            folder / "coco" / coco,
            folder / "images",
            folder,
        ]
        for where, rec in iter_json_records(qfile):
            sid = str(require(rec, "question_id", where))
            choices = [str(c) for c in require(rec, "choices", where)]
            if rec.get("image"):
                rel = str(rec["image"])
            else:
                rel = f"{int(require(rec, 'image_id', where)):012d}.jpg"
            gold = rec.get("correct_choice_idx")
            yield Sample(
                id=sid,
                image=resolve_image(rel, roots, sample_id=sid, check=check_images),
                question=str(require(rec, "question", where)),
                answer=letter_of(gold, len(choices), where) if gold is not None else None,
                meta={"choices": choices, "direct_answers": rec.get("direct_answers")},
            )

    def _iter_hf(self, ds: Any, *, image_dir: Path | None, check_images: bool) -> Iterator[Sample]:
        for i, row, ref, _ in iter_hf_rows(ds, image_column="image"):
            where = f"dataset row {i}"
            choices = [str(c) for c in require(row, "choices", where)]
            gold = row.get("correct_choice_idx")
            yield Sample(
                id=str(first_present(row, ("question_id", "id"), i)),
                image=ref,
                question=str(require(row, "question", where)),
                answer=letter_of(gold, len(choices), where) if gold is not None else None,
                meta={"choices": choices},
            )
