"""VQAv2: open-ended, the official VQA accuracy (see :mod:`himap_vlm.apps.eval.metrics.vqa`).

Prompt (LLaVA-1.5)::

    {question}
    Answer the question using a single word or phrase.

Metrics: ``accuracy`` (percent) and ``accuracy/<answer type>`` (``yes/no``, ``number``,
``other``) when the annotations give it. Test-dev has no public answers: its samples load
with ``answer=None`` and are not scored (submit the raw predictions to EvalAI instead).

Layouts read
------------
1. **LLaVA** (``playground/data/eval/vqav2``): ``llava_vqav2_mscoco_test-dev2015.jsonl`` (or any
   ``llava_vqav2*.jsonl``), lines ``{"question_id", "image", "text"}``. Images: ``image``
   relative to ``image_dir`` (default ``<folder>/test2015``, ``<folder>/val2014``,
   ``<folder>``). Answers: an ``answers`` field (list of strings or of ``{"answer": ...}``), else
   the official annotation file (``annotations``, or ``v2_mscoco_val2014_annotations.json`` in
   ``<folder>``) matched on ``question_id``, else none.
2. **VQA release**: ``v2_OpenEnded_mscoco_<subset>_questions.json`` (``{"data_subtype",
   "questions": [{"image_id", "question", "question_id"}]}``) with
   ``v2_mscoco_<subset>_annotations.json`` next to it (or ``annotations``); ``split`` picks the
   subset in a folder (default ``val2014``). Images ``COCO_<subset>_<image_id:012d>.jpg`` in
   ``image_dir`` (default ``<folder>/<subset>``, ``<folder>``).
3. **Hugging Face** ``lmms-lab/VQAv2`` (split ``validation``): columns ``question_id``,
   ``question``, ``answers`` (list of ``{"answer", ...}``), ``answer_type``, ``image``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
from ..metrics.vqa import vqa_accuracy
from ._common import ShortAnswerTask, accuracy_metrics
from .base import SHORT_ANSWER_INSTRUCTION, Sample, strip_suffix


def human_answers(value: Any, where: object) -> list[str]:
    """Answers as a list of strings, from strings or ``{"answer": ...}`` dicts."""
    if isinstance(value, str):
        raise DataFormatError(f"Malformed record at {where}: 'answers' must be a list, got a string")
    out = []
    for a in value:
        if isinstance(a, dict):
            out.append(str(require(a, "answer", where)))
        else:
            out.append(str(a))
    if not out:
        raise DataFormatError(f"Malformed record at {where}: empty 'answers'")
    return out


def _annotation_index(file: Path) -> dict[str, dict[str, Any]]:
    data = read_json(file)
    anns = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(anns, list):
        raise DataFormatError(f"{file}: expected {{'annotations': [...]}}")
    out = {}
    for i, a in enumerate(anns):
        where = f"{file}, entry {i}"
        out[str(require(a, "question_id", where))] = {
            "answers": human_answers(require(a, "answers", where), where),
            "answer_type": a.get("answer_type"),
        }
    return out


class VQAv2(ShortAnswerTask):
    """VQAv2 (see module docstring for layouts)."""

    name = "vqav2"
    hub_id = "lmms-lab/VQAv2"
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
        if path.is_dir():
            qfile = find_file(
                path,
                ("llava_vqav2*.jsonl", f"v2_OpenEnded_mscoco_{split or 'val2014'}_questions.json",
                 "*OpenEnded*questions.json"),
                what="VQAv2 question file",
            )  # fmt: skip
        else:
            qfile = path
        folder = qfile.parent
        if qfile.suffix == ".json":
            yield from self._iter_release(qfile, image_dir, annotations, check_images)
            return
        roots = [image_dir] if image_dir is not None else [folder / "test2015", folder / "val2014", folder]
        ann_file = annotations
        if ann_file is None and (folder / "v2_mscoco_val2014_annotations.json").is_file():
            ann_file = folder / "v2_mscoco_val2014_annotations.json"
        index = _annotation_index(ann_file) if ann_file is not None else {}
        for where, rec in iter_json_records(qfile):
            sid = str(require(rec, "question_id", where))
            ann = index.get(sid)
            gold = human_answers(rec["answers"], where) if rec.get("answers") is not None else None
            if gold is None and ann is not None:
                gold = ann["answers"]
            yield Sample(
                id=sid,
                image=resolve_image(require(rec, "image", where), roots, sample_id=sid, check=check_images),
                question=strip_suffix(
                    str(require(rec, ("text", "question"), where)), (SHORT_ANSWER_INSTRUCTION,)
                ),
                answer=gold,
                meta={"answer_type": rec.get("answer_type") or (ann or {}).get("answer_type")},
            )

    def _iter_release(
        self, qfile: Path, image_dir: Path | None, annotations: Path | None, check_images: bool
    ) -> Iterator[Sample]:
        data = read_json(qfile)
        if not isinstance(data, dict) or "questions" not in data:
            raise DataFormatError(f"{qfile}: expected {{'data_subtype', 'questions': [...]}}")
        subset = str(data.get("data_subtype") or "val2014")
        ann_file = annotations
        if ann_file is None:
            cand = qfile.parent / qfile.name.replace("OpenEnded_", "").replace("_questions", "_annotations")
            ann_file = cand if cand.is_file() else None
        index = _annotation_index(ann_file) if ann_file is not None else {}
        roots = [image_dir] if image_dir is not None else [qfile.parent / subset, qfile.parent]
        for where, rec in iter_json_records(qfile, key="questions"):
            sid = str(require(rec, "question_id", where))
            image_id = int(require(rec, "image_id", where))
            ann = index.get(sid)
            yield Sample(
                id=sid,
                image=resolve_image(
                    f"COCO_{subset}_{image_id:012d}.jpg", roots, sample_id=sid, check=check_images
                ),
                question=str(require(rec, "question", where)),
                answer=ann["answers"] if ann else None,
                meta={"answer_type": ann["answer_type"] if ann else None, "image_id": image_id},
            )

    def _iter_hf(self, ds: Any, *, image_dir: Path | None, check_images: bool) -> Iterator[Sample]:
        for i, row, ref, _ in iter_hf_rows(ds, image_column="image"):
            where = f"dataset row {i}"
            answers = row.get("answers")
            yield Sample(
                id=str(first_present(row, ("question_id", "id"), i)),
                image=ref,
                question=str(require(row, "question", where)),
                answer=human_answers(answers, where) if answers else None,
                meta={"answer_type": row.get("answer_type")},
            )

    def score_sample(self, sample: Sample, prediction: Any) -> float | None:
        """Official VQA accuracy in [0, 1]."""
        if sample.answer is None:
            return None
        return vqa_accuracy(str(prediction), sample.answer)

    def metrics(self, samples: Sequence[Sample], predictions: Sequence[Any]) -> dict[str, float]:
        """VQA accuracy (percent), overall and per answer type."""
        return accuracy_metrics(self, samples, predictions, group=lambda s: s.meta.get("answer_type"))
