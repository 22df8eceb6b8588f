"""ScienceQA, image subset (``scienceqa_img``): lettered multiple choice, accuracy.

Prompt (LLaVA-1.5 / lmms-eval ``scienceqa_img``)::

    Context: {hint}            <- only when the hint is not empty
    {question}
    A. {choice 0}
    B. {choice 1}
    Answer with the option's letter from the given choices directly.

Only questions with an image are kept (the "IMG" column of the papers).

Layouts read
------------
1. **LLaVA** (``playground/data/eval/scienceqa``): ``llava_test_CQM-A.json``, a JSON list (or a
   ``.jsonl``) of ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n
   Context: ...\\n...\\nA. ...\\nB. ..."}, {"from": "gpt", "value": ...}]}``. The human turn is
   the prompt body, used verbatim (``<image>`` removed). Images: ``image`` relative to
   ``image_dir`` (default ``<folder>/images/test``, then ``<folder>``). Gold: ``problems.json``
   of the ScienceQA release (``annotations`` or next to the file; ``answer`` is the option
   index), else an ``answer`` field, else the gpt turn (``"C"`` / ``"The answer is C."``).
   Records without ``image`` are skipped.
2. **ScienceQA release**: ``problems.json`` (``{pid: {"question", "choices", "answer", "hint",
   "image", "split", "subject", ...}}``) with optional ``pid_splits.json``; ``split`` defaults to
   ``"test"``. Images: ``images/<split>/<pid>/<image>`` (``image_dir`` = ``images/<split>``).
3. **Hugging Face** ``derek-thomas/ScienceQA`` (split ``test``): columns ``image``,
   ``question``, ``choices`` (list), ``answer`` (int index), ``hint``, ``subject``; rows whose
   image is null are skipped; ids are row indices.

A folder is read as layout 1 if it holds ``llava_test_CQM-A.json`` (or
``llava_scienceqa_test.json``), else as layout 2.
"""

from __future__ import annotations

import re
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
from ..metrics.choice import MC_INSTRUCTION, split_options
from ._common import MultipleChoiceTask, accuracy_metrics, letter_of
from .base import Sample, strip_suffix

LLAVA_FILES = ("llava_test_CQM-A.json", "llava_scienceqa_test.json", "llava_test_CQM-A.jsonl", "*.jsonl")
_ANSWER_IS = re.compile(r"The answer is \(?([A-Z])\)?")


class ScienceQAImg(MultipleChoiceTask):
    """ScienceQA-IMG (see module docstring for layouts)."""

    name = "scienceqa_img"
    hint_prefix = "Context: "
    hub_id = "derek-thomas/ScienceQA"
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
        if path.is_dir():
            try:
                qfile = find_file(path, LLAVA_FILES[:3], what="LLaVA ScienceQA question file")
            except FileNotFoundError:
                qfile = find_file(path, ("problems.json", *LLAVA_FILES[3:]), what="ScienceQA question file")
        else:
            qfile = path
        if qfile.name == "problems.json":
            yield from self._iter_release(qfile, split or "test", image_dir, check_images)
        else:
            yield from self._iter_llava(qfile, image_dir, annotations, check_images)

    def _iter_llava(
        self, qfile: Path, image_dir: Path | None, annotations: Path | None, check_images: bool
    ) -> Iterator[Sample]:
        folder = qfile.parent
        ann_file = annotations or (folder / "problems.json" if (folder / "problems.json").is_file() else None)
        problems = read_json(ann_file) if ann_file is not None else {}
        roots = [image_dir] if image_dir is not None else [folder / "images" / "test", folder]
        for where, rec in iter_json_records(qfile):
            sid = str(require(rec, ("id", "question_id"), where))
            if not rec.get("image"):
                continue
            if "conversations" in rec:
                convs = rec["conversations"]
                if not isinstance(convs, list) or not convs or "value" not in convs[0]:
                    raise DataFormatError(f"Malformed record at {where}: 'conversations' has no human turn")
                text = str(convs[0]["value"])
                gpt = str(convs[1]["value"]) if len(convs) > 1 and "value" in convs[1] else None
            else:
                text = str(require(rec, ("text", "question"), where))
                gpt = None
            body = strip_suffix(text.replace("<image>", "").strip(), (MC_INSTRUCTION,))
            stem, choices = split_options(body)
            hint = None
            question = stem
            if stem.startswith("Context: "):
                hint, _, question = stem[len("Context: ") :].partition("\n")
            answer: str | None
            if sid in problems:
                prob = problems[sid]
                answer = letter_of(
                    require(prob, "answer", f"{ann_file}, entry {sid!r}"), len(prob.get("choices", [])), where
                )
            elif rec.get("answer") is not None:
                answer = letter_of(rec["answer"], len(choices) or 26, where)
            elif gpt is not None:
                m = _ANSWER_IS.search(gpt)
                try:
                    answer = m.group(1) if m else letter_of(gpt, len(choices) or 26, where)
                except DataFormatError as e:
                    raise DataFormatError(
                        f"{e}; put ScienceQA's problems.json next to the question file or pass annotations="
                    ) from e
            else:
                answer = None
            image = resolve_image(rec["image"], roots, sample_id=sid, check=check_images)
            yield Sample(
                id=sid,
                image=image,
                question=question,
                answer=answer,
                meta={
                    "choices": choices,
                    "hint": hint,
                    "prompt_text": body,
                    "subject": problems.get(sid, {}).get("subject"),
                },
            )

    def _iter_release(
        self, pfile: Path, split: str, image_dir: Path | None, check_images: bool
    ) -> Iterator[Sample]:
        folder = pfile.parent
        problems = read_json(pfile)
        if not isinstance(problems, dict):
            raise DataFormatError(f"{pfile}: expected a JSON object {{pid: problem}}")
        splits_file = folder / "pid_splits.json"
        if splits_file.is_file():
            splits = read_json(splits_file)
            if split not in splits:
                raise ValueError(f"Split {split!r} not in {splits_file}; available: {', '.join(splits)}")
            pids = [str(p) for p in splits[split]]
        else:
            pids = [pid for pid, p in problems.items() if p.get("split") == split]
        root = image_dir if image_dir is not None else folder / "images" / split
        for pid in pids:
            where = f"{pfile}, entry {pid!r}"
            if pid not in problems:
                raise DataFormatError(f"{splits_file}: problem {pid!r} is not in {pfile}")
            prob = problems[pid]
            if not prob.get("image"):
                continue
            choices = [str(c) for c in require(prob, "choices", where)]
            question = str(require(prob, "question", where))
            answer = letter_of(require(prob, "answer", where), len(choices), where)
            image = resolve_image(Path(pid) / str(prob["image"]), [root], sample_id=pid, check=check_images)
            yield Sample(
                id=pid,
                image=image,
                question=question,
                answer=answer,
                meta={"choices": choices, "hint": prob.get("hint") or None, "subject": prob.get("subject")},
            )

    def _iter_hf(self, ds: Any, *, image_dir: Path | None, check_images: bool) -> Iterator[Sample]:
        for i, row, ref, has_image in iter_hf_rows(ds, image_column="image", check_presence=True):
            if not has_image:
                continue
            where = f"dataset row {i}"
            choices = [str(c) for c in require(row, "choices", where)]
            yield Sample(
                id=str(first_present(row, ("id", "question_id"), i)),
                image=ref,
                question=str(require(row, "question", where)),
                answer=letter_of(require(row, "answer", where), len(choices), where),
                meta={
                    "choices": choices,
                    "hint": first_present(row, ("hint",)),
                    "subject": row.get("subject"),
                },
            )

    def metrics(self, samples: Sequence[Sample], predictions: Sequence[Any]) -> dict[str, float]:
        """Accuracy (percent), overall and per subject when known."""
        return accuracy_metrics(self, samples, predictions, group=lambda s: s.meta.get("subject"))
