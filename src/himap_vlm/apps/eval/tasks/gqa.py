"""GQA (test-dev balanced): open-ended, exact match.

Prompt (LLaVA-1.5)::

    {question}
    Answer the question using a single word or phrase.

Scoring: exact match after normalising prediction and gold answer the way LLaVA's
``convert_gqa_for_eval.py`` feeds the official GQA script: surrounding whitespace removed,
trailing periods removed, lowercased (and runs of whitespace collapsed).

Layouts read
------------
1. **LLaVA** (``playground/data/eval/gqa``): ``llava_gqa_testdev_balanced.jsonl``, lines
   ``{"question_id", "image", "text"}`` (``text`` may end with the instruction). Images:
   ``image`` relative to ``image_dir`` (default ``<folder>/data/images``, ``<folder>/images``,
   ``<folder>``). Answers: an ``answer`` field, else the GQA release file
   ``testdev_balanced_questions.json`` (``annotations``, or in ``<folder>/data`` or
   ``<folder>``), matched on question id.
2. **GQA release**: ``testdev_balanced_questions.json`` (``{question_id: {"imageId",
   "question", "answer", ...}}``); images ``<imageId>.jpg`` in ``image_dir`` (default
   ``<folder>/images``, ``<folder>``).
3. **Hugging Face**: a dataset with ``question``, ``answer``, an id (``question_id`` or ``id``)
   and either an ``image`` column or ``imageId`` (e.g. ``lmms-lab/GQA`` config
   ``testdev_balanced_instructions``, whose images live in another config: pass
   ``image_dir`` holding ``<imageId>.jpg``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..io import (
    DataFormatError,
    find_file,
    first_present,
    iter_hf_rows,
    iter_json_records,
    read_json,
    require,
    resolve_image,
)
from ._common import ShortAnswerTask
from .base import SHORT_ANSWER_INSTRUCTION, Sample, strip_suffix

RELEASE_FILE = "testdev_balanced_questions.json"


def normalize_gqa_answer(text: str) -> str:
    """``text.strip().rstrip('.').lower()`` with whitespace runs collapsed."""
    return " ".join(text.strip().rstrip(".").lower().split())


class GQA(ShortAnswerTask):
    """GQA test-dev balanced (see module docstring for layouts)."""

    name = "gqa"
    hub_id = "lmms-lab/GQA:testdev_balanced_instructions"
    hub_split = "testdev"

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
            qfile = find_file(
                path,
                (
                    "llava_gqa_testdev_balanced.jsonl",
                    "llava_gqa*.jsonl",
                    RELEASE_FILE,
                    "data/" + RELEASE_FILE,
                ),
                what="GQA question file",
            )
        else:
            qfile = path
        folder = qfile.parent
        if qfile.suffix == ".json":
            roots = [image_dir] if image_dir is not None else [folder / "images", folder]
            for where, rec in iter_json_records(qfile):
                sid = str(first_present(rec, ("question_id", "_key")))
                image_id = require(rec, "imageId", where)
                yield Sample(
                    id=sid,
                    image=resolve_image(f"{image_id}.jpg", roots, sample_id=sid, check=check_images),
                    question=str(require(rec, "question", where)),
                    answer=rec.get("answer"),
                    meta={"image_id": image_id},
                )
            return
        roots = (
            [image_dir] if image_dir is not None else [folder / "data" / "images", folder / "images", folder]
        )
        answers: dict[str, Any] | None = None
        for where, rec in iter_json_records(qfile):
            sid = str(require(rec, "question_id", where))
            gold = rec.get("answer")
            if gold is None:
                if answers is None:
                    answers = self._release_answers(folder, annotations)
                if answers:
                    if sid not in answers:
                        raise DataFormatError(
                            f"{where}: question {sid!r} has no answer in the GQA release file"
                        )
                    gold = answers[sid]
            yield Sample(
                id=sid,
                image=resolve_image(require(rec, "image", where), roots, sample_id=sid, check=check_images),
                question=strip_suffix(
                    str(require(rec, ("text", "question"), where)), (SHORT_ANSWER_INSTRUCTION,)
                ),
                answer=gold,
                meta={},
            )

    @staticmethod
    def _release_answers(folder: Path, annotations: Path | None) -> dict[str, Any]:
        file = annotations
        if file is None:
            for cand in (folder / "data" / RELEASE_FILE, folder / RELEASE_FILE):
                if cand.is_file():
                    file = cand
                    break
        if file is None:
            return {}
        data = read_json(file)
        if not isinstance(data, dict):
            raise DataFormatError(f"{file}: expected a JSON object {{question_id: question}}")
        return {str(k): v.get("answer") for k, v in data.items() if isinstance(v, dict)}

    def _iter_hf(self, ds: Any, *, image_dir: Path | None, check_images: bool) -> Iterator[Sample]:
        for i, row, ref, _ in iter_hf_rows(ds, image_column="image"):
            where = f"dataset row {i}"
            sid = str(first_present(row, ("question_id", "id"), i))
            image: Any = ref
            if ref is None:
                if "imageId" not in row:
                    raise DataFormatError(f"Malformed record at {where}: no 'image' column and no 'imageId'")
                if image_dir is None:
                    raise ValueError(
                        "This GQA dataset names images by imageId: pass image_dir=<folder of <imageId>.jpg>"
                    )
                image = resolve_image(f"{row['imageId']}.jpg", [image_dir], sample_id=sid, check=check_images)
            yield Sample(
                id=sid,
                image=image,
                question=str(require(row, "question", where)),
                answer=row.get("answer"),
                meta={"image_id": row.get("imageId")},
            )

    def score_sample(self, sample: Sample, prediction: Any) -> float | None:
        """1 if the normalised prediction equals the normalised answer."""
        if sample.answer is None:
            return None
        return (
            1.0 if normalize_gqa_answer(str(prediction)) == normalize_gqa_answer(str(sample.answer)) else 0.0
        )
