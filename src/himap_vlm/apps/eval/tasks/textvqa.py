"""TextVQA (val): open-ended, the official VQA accuracy, with OCR tokens in the prompt.

Prompt (LLaVA-1.5's ``llava_textvqa_val_v051_ocr.jsonl``)::

    {question}
    Reference OCR token: {token}, {token}, ...     <- when OCR tokens are known
    Answer the question using a single word or phrase.

``get_task("textvqa", use_ocr_tokens=False)`` drops the OCR line. Scoring is LLaVA's
``eval_textvqa.py`` (``TextVQAAccuracyEvaluator``): VQA accuracy with the EvalAI
normalisation of prediction and human answers.

Layouts read
------------
1. **LLaVA** (``playground/data/eval/textvqa``): ``llava_textvqa_val_v051_ocr.jsonl`` (or any
   ``llava_textvqa*.jsonl``), lines ``{"question_id", "image", "text"}`` where ``text`` is the
   prompt above (its OCR line is kept verbatim) and ``question_id`` is, in LLaVA's file, the
   *image* id. Images: ``image`` relative to ``image_dir`` (default ``<folder>/train_images``,
   ``<folder>``). Answers: an ``answers`` field, else ``TextVQA_0.5.1_val.json``
   (``annotations`` or in ``<folder>``) matched like ``eval_textvqa.py`` on (image id,
   lowercased question), or on question id.
2. **TextVQA release**: ``TextVQA_0.5.1_val.json`` (``{"data": [{"question_id", "image_id",
   "question", "answers", "ocr_tokens"?}]}``); images ``<image_id>.jpg`` in ``image_dir``
   (default ``<folder>/train_images``, ``<folder>``).
3. **Hugging Face** ``lmms-lab/textvqa`` (split ``validation``): columns ``question_id``,
   ``question``, ``answers`` (list of strings), ``ocr_tokens``, ``image``.
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
    require,
    resolve_image,
)
from ..metrics.vqa import vqa_accuracy
from ._common import ShortAnswerTask
from .base import SHORT_ANSWER_INSTRUCTION, Sample, strip_suffix
from .vqav2 import human_answers

RELEASE_FILE = "TextVQA_0.5.1_val.json"
OCR_PREFIX = "Reference OCR token: "


def _ocr_line(tokens: Any) -> str | None:
    if tokens is None:
        return None
    return OCR_PREFIX + ", ".join(str(t) for t in tokens)


class TextVQA(ShortAnswerTask):
    """TextVQA val (see module docstring for layouts).

    Parameters
    ----------
    use_ocr_tokens
        Put the "Reference OCR token: ..." line in the prompt (LLaVA-1.5 does).
    """

    name = "textvqa"
    hub_id = "lmms-lab/textvqa"
    hub_split = "validation"

    def __init__(self, use_ocr_tokens: bool = True) -> None:
        self.use_ocr_tokens = use_ocr_tokens

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
                path, ("llava_textvqa*.jsonl", RELEASE_FILE, "TextVQA_*.json"), what="TextVQA file"
            )
        else:
            qfile = path
        folder = qfile.parent
        roots = [image_dir] if image_dir is not None else [folder / "train_images", folder]
        if qfile.suffix == ".json":
            for where, rec in iter_json_records(qfile, key="data"):
                sid = str(require(rec, "question_id", where))
                image_id = str(require(rec, "image_id", where))
                answers = rec.get("answers")
                yield Sample(
                    id=sid,
                    image=resolve_image(f"{image_id}.jpg", roots, sample_id=sid, check=check_images),
                    question=str(require(rec, "question", where)),
                    answer=human_answers(answers, where) if answers else None,
                    meta={"ocr_line": _ocr_line(rec.get("ocr_tokens")), "image_id": image_id},
                )
            return
        ann_file = annotations
        if ann_file is None and (folder / RELEASE_FILE).is_file():
            ann_file = folder / RELEASE_FILE
        by_image_question: dict[tuple[str, str], list[str]] = {}
        by_qid: dict[str, list[str]] = {}
        if ann_file is not None:
            for where, a in iter_json_records(ann_file, key="data"):
                if a.get("answers"):
                    answers = human_answers(a["answers"], where)
                    by_image_question[(str(a.get("image_id")), str(a.get("question", "")).lower())] = answers
                    by_qid[str(a.get("question_id"))] = answers
        counts: dict[str, int] = {}
        for where, rec in iter_json_records(qfile):
            qid = str(require(rec, "question_id", where))
            text = strip_suffix(str(require(rec, ("text", "question"), where)), (SHORT_ANSWER_INSTRUCTION,))
            lines = text.split("\n")
            ocr = next((ln for ln in lines if ln.startswith(OCR_PREFIX)), None)
            question = "\n".join(ln for ln in lines if not ln.startswith(OCR_PREFIX)).strip()
            if rec.get("ocr_tokens") is not None and ocr is None:
                ocr = _ocr_line(rec["ocr_tokens"])
            gold: list[str] | None = human_answers(rec["answers"], where) if rec.get("answers") else None
            if gold is None and ann_file is not None:
                gold = by_image_question.get((qid, question.lower())) or by_qid.get(qid)
                if gold is None:
                    raise DataFormatError(f"{where}: question {question!r} has no answers in {ann_file}")
            # LLaVA's question_id is the image id, shared by the image's questions: make ids unique.
            n = counts.get(qid, 0)
            counts[qid] = n + 1
            sid = qid if n == 0 else f"{qid}#{n}"
            yield Sample(
                id=sid,
                image=resolve_image(require(rec, "image", where), roots, sample_id=sid, check=check_images),
                question=question,
                answer=gold,
                meta={"ocr_line": ocr},
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
                meta={"ocr_line": _ocr_line(row.get("ocr_tokens")), "image_id": row.get("image_id")},
            )

    def prompt(self, sample: Sample) -> str:
        """Question, the OCR line (if enabled and known) and the short-answer instruction."""
        ocr = sample.meta.get("ocr_line")
        if self.use_ocr_tokens and ocr is not None:
            return f"{sample.question}\n{ocr}\n{SHORT_ANSWER_INSTRUCTION}"
        return f"{sample.question}\n{SHORT_ANSWER_INSTRUCTION}"

    def score_sample(self, sample: Sample, prediction: Any) -> float | None:
        """Official VQA accuracy in [0, 1]."""
        if sample.answer is None:
            return None
        return vqa_accuracy(str(prediction), sample.answer)
