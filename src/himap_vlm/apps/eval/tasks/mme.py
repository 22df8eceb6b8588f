"""MME: 14 yes/no subtasks, two questions per image; acc, acc+ and the perception/cognition scores.

Prompt (LLaVA-1.5 / lmms-eval): the question with its " Please answer yes or no." removed,
then ``"\\nAnswer the question using a single word or phrase."``.

Parsing (the official ``eval_tool/calculation.py``): lowercase; ``"yes"``/``"no"`` as is;
otherwise "yes" if ``"yes"`` occurs in the first 4 characters, else "no" if ``"no"`` does,
else "other" (always wrong).

Metrics, per subtask ``c`` (as in ``calculation.py``): ``c/acc`` = percent of questions
right, ``c/acc_plus`` = percent of images with both questions right, ``c/score`` = acc +
acc_plus (0-200). ``perception`` = sum of the scores of the 10 perception subtasks (existence,
count, position, color, posters, celebrity, scene, landmark, artwork, OCR; 0-2000),
``cognition`` = sum over commonsense_reasoning, numerical_calculation, text_translation,
code_reasoning (0-800), ``total`` = both; subtasks absent from the data count 0.

Layouts read
------------
1. **MME release** (``MME_Benchmark_release_version``, or its inner ``MME_Benchmark``): one folder
   per subtask, either with ``images/`` and ``questions_answers_YN/`` sub-folders or with the
   images and their ``<image stem>.txt`` side by side; each ``.txt`` holds one
   ``question<TAB>Yes|No`` line per question. Sample ids are ``<subtask>/<stem>/<k>``.
2. **LLaVA** (``playground/data/eval/MME``): ``llava_mme.jsonl``, lines ``{"question_id",
   "image", "text", "category"}``; images relative to ``image_dir`` (default
   ``<folder>/MME_Benchmark_release_version``; ``<subtask>/images/<name>`` and
   ``<subtask>/<name>`` are tried too). Answers: an ``answer``/``label`` field, else the release
   ``.txt`` files (in ``annotations``, else the image folder), matched on subtask, image stem
   and question (the way LLaVA's ``convert_answer_to_mme.py`` does).
3. **Hugging Face** ``lmms-lab/MME`` (split ``test``): columns ``question_id`` (the image,
   shared by its two questions), ``image``, ``question``, ``answer``, ``category``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..io import (
    DataFormatError,
    RecordLocation,
    first_present,
    iter_hf_rows,
    iter_jsonl,
    require,
    resolve_image,
)
from ..metrics.classification import mean
from .base import SHORT_ANSWER_INSTRUCTION, Sample, Task, strip_suffix

PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
SUBTASKS = PERCEPTION + COGNITION
YES_NO_SUFFIX = " Please answer yes or no."
_IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def parse_mme_answer(text: str) -> str:
    """The official rule: ``"yes"``, ``"no"`` or ``"other"``."""
    pred = text.strip().lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def _question_key(question: str) -> str:
    q = strip_suffix(question, (SHORT_ANSWER_INSTRUCTION,))
    q = q.replace("Please answer yes or no.", "")
    return " ".join(q.split())


def _gold(value: Any, where: object) -> str:
    v = str(value).strip().lower()
    if v not in ("yes", "no"):
        raise DataFormatError(f"Malformed record at {where}: answer {value!r} is not Yes/No")
    return v


def _release_root(path: Path) -> Path:
    """The folder holding the subtask folders."""
    for cand in (path / "MME_Benchmark_release_version" / "MME_Benchmark", path / "MME_Benchmark_release_version",
                 path / "MME_Benchmark", path):  # fmt: skip
        if cand.is_dir() and any((cand / s).is_dir() for s in SUBTASKS):
            return cand
    raise FileNotFoundError(
        f"No MME data in {path}: expected llava_mme.jsonl or subtask folders ({', '.join(SUBTASKS[:3])}, ...)"
    )


def _iter_release_files(root: Path) -> Iterator[tuple[str, Path, Path | None]]:
    """Yield ``(subtask, qa_txt, image_or_None)`` for every image of the 14 subtask folders."""
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name in SUBTASKS):
        if (sub / "images").is_dir() and (sub / "questions_answers_YN").is_dir():
            img_dir, qa_dir = sub / "images", sub / "questions_answers_YN"
        else:
            img_dir = qa_dir = sub
        for txt in sorted(qa_dir.glob("*.txt")):
            image = next(
                (img_dir / (txt.stem + e) for e in _IMAGE_EXTS if (img_dir / (txt.stem + e)).is_file()), None
            )
            yield sub.name, txt, image


def _read_qa(txt: Path) -> list[tuple[RecordLocation, str, str]]:
    out = []
    with txt.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = RecordLocation(txt, line=lineno)
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2:
                raise DataFormatError(f"Malformed record at {where}: expected 'question<TAB>answer'")
            out.append((where, parts[0].strip(), _gold(parts[1], where)))
    return out


class MME(Task):
    """MME (see module docstring for layouts)."""

    name = "mme"
    primary_metric = "perception"
    hub_id = "lmms-lab/MME"
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
        if path.is_file():
            yield from self._iter_llava(path, image_dir, annotations, check_images)
            return
        if (path / "llava_mme.jsonl").is_file():
            yield from self._iter_llava(path / "llava_mme.jsonl", image_dir, annotations, check_images)
            return
        root = _release_root(path)
        for sub, txt, image in _iter_release_files(root):
            if image is None and check_images:
                raise FileNotFoundError(f"Image of MME sample {sub}/{txt.stem} not found next to {txt}")
            for k, (_, question, gold) in enumerate(_read_qa(txt)):
                yield Sample(
                    id=f"{sub}/{txt.stem}/{k}",
                    image=image,
                    question=question,
                    answer=gold,
                    meta={"category": sub, "pair": f"{sub}/{txt.stem}"},
                )

    def _iter_llava(
        self, qfile: Path, image_dir: Path | None, annotations: Path | None, check_images: bool
    ) -> Iterator[Sample]:
        folder = qfile.parent
        img_root = image_dir if image_dir is not None else folder / "MME_Benchmark_release_version"
        gt: dict[tuple[str, str, str], str] | None = None
        counts: dict[str, int] = defaultdict(int)
        for where, rec in iter_jsonl(qfile):
            image_rel = str(require(rec, "image", where))
            category = str(rec.get("category") or str(rec.get("question_id", image_rel)).split("/")[0])
            stem = Path(image_rel).stem
            question = strip_suffix(
                str(require(rec, ("text", "question"), where)), (SHORT_ANSWER_INSTRUCTION,)
            )
            gold = first_present(rec, ("answer", "label"))
            if gold is None:
                if gt is None:
                    gt = self._release_answers(annotations if annotations is not None else img_root)
                key = (category, stem, _question_key(question))
                if key not in gt:
                    raise DataFormatError(
                        f"{where}: no answer for subtask {category!r}, image {stem!r}, question {question!r} "
                        f"in the MME release files (pass annotations=<MME_Benchmark_release_version>)"
                    )
                gold = gt[key]
            pair = f"{category}/{stem}"
            sid = f"{pair}/{counts[pair]}"
            counts[pair] += 1
            name = Path(image_rel).name
            roots = [img_root, img_root / category / "images", img_root / category]
            try:
                image = resolve_image(image_rel, roots[:1], sample_id=sid, check=check_images)
            except FileNotFoundError:
                image = resolve_image(name, roots[1:], sample_id=sid, check=check_images)
            yield Sample(
                id=sid,
                image=image,
                question=question,
                answer=_gold(gold, where),
                meta={"category": category, "pair": pair},
            )

    @staticmethod
    def _release_answers(location: Path) -> dict[tuple[str, str, str], str]:
        if not location.is_dir():
            raise FileNotFoundError(f"MME release folder not found: {location} (pass annotations=...)")
        out: dict[tuple[str, str, str], str] = {}
        for sub, txt, _ in _iter_release_files(_release_root(location)):
            for _, question, gold in _read_qa(txt):
                out[(sub, txt.stem, _question_key(question))] = gold
        return out

    def _iter_hf(self, ds: Any, *, image_dir: Path | None, check_images: bool) -> Iterator[Sample]:
        counts: dict[str, int] = defaultdict(int)
        for i, row, ref, _ in iter_hf_rows(ds, image_column="image"):
            where = f"dataset row {i}"
            category = str(require(row, "category", where))
            pair = str(first_present(row, ("question_id",), i))
            if not pair.startswith(category + "/"):
                pair = f"{category}/{pair}"
            sid = f"{pair}/{counts[pair]}"
            counts[pair] += 1
            gold = row.get("answer")
            yield Sample(
                id=sid,
                image=ref,
                question=str(require(row, "question", where)),
                answer=None if gold is None else _gold(gold, where),
                meta={"category": category, "pair": pair},
            )

    def prompt(self, sample: Sample) -> str:
        """Question without " Please answer yes or no.", plus the short-answer instruction."""
        question = sample.question.strip().replace(YES_NO_SUFFIX, "")
        return f"{question}\n{SHORT_ANSWER_INSTRUCTION}"

    def parse(self, sample: Sample, generated_text: str) -> str:
        """``"yes"``, ``"no"`` or ``"other"`` (official rule, see :func:`parse_mme_answer`)."""
        return parse_mme_answer(generated_text)

    def score_sample(self, sample: Sample, prediction: Any) -> float | None:
        """1 if the parsed answer equals the gold one."""
        if sample.answer is None:
            return None
        return 1.0 if prediction == sample.answer else 0.0

    def metrics(self, samples: Sequence[Sample], predictions: Sequence[Any]) -> dict[str, float]:
        """Per-subtask acc/acc+/score and the perception, cognition and total scores."""
        scored, preds, unscored = self._scored(samples, predictions)
        pairs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for s, p in zip(scored, preds, strict=True):
            cat = str(s.meta.get("category"))
            pairs[cat][str(s.meta.get("pair", s.id))].append(float(self.score_sample(s, p) or 0.0))
        out: dict[str, float] = {}
        scores: dict[str, float] = {}
        all_scores: list[float] = []
        for cat in sorted(pairs, key=lambda c: (SUBTASKS.index(c) if c in SUBTASKS else len(SUBTASKS), c)):
            groups = list(pairs[cat].values())
            flat = [v for g in groups for v in g]
            all_scores.extend(flat)
            acc = 100.0 * mean(flat)
            acc_plus = 100.0 * mean([1.0 if all(v == 1.0 for v in g) else 0.0 for g in groups])
            out[f"{cat}/acc"] = acc
            out[f"{cat}/acc_plus"] = acc_plus
            out[f"{cat}/score"] = scores[cat] = acc + acc_plus
        out["perception"] = sum(scores.get(c, 0.0) for c in PERCEPTION)
        out["cognition"] = sum(scores.get(c, 0.0) for c in COGNITION)
        out["total"] = out["perception"] + out["cognition"]
        if all_scores:
            out["accuracy"] = 100.0 * mean(all_scores)
        out["n"] = len(scored)
        if unscored:
            out["n_unscored"] = unscored
        return out
