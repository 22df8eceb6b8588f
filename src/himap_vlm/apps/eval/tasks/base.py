"""The task interface: a :class:`Sample` per evaluation item and the :class:`Task` base class.

A task knows four things, each from the paper/benchmark it reproduces:

1. how to read its data (:meth:`Task.load`): the LLaVA evaluation layout (a question file plus
   an image folder), the benchmark's own release files, or a Hugging Face dataset (a folder
   written by ``save_to_disk``, or a hub id for ``datasets.load_dataset``);
2. the user-turn text the papers sent to the model (:meth:`Task.prompt`), *without* chat
   template or image placeholder, which the runner adds for the model at hand, and which part of
   it is an answer-format instruction the task appends (:meth:`Task.answer_instruction`: a model
   trained on another question convention is asked without it, see
   :mod:`himap_vlm.apps.eval.prompts`);
3. how to read a prediction out of the generated text (:meth:`Task.parse`);
4. the official metric (:meth:`Task.metrics`).

Typical use::

    task = get_task("pope")
    samples = task.load("playground/data/eval/pope", limit=100)
    outputs = [generate(s.load_image(), task.prompt(s), max_new_tokens=task.max_new_tokens)
               for s in samples]
    print(task.evaluate(samples, outputs))

Metric values are on the scale the papers print: accuracies, precision, recall, F1 and the
VQA score in percent (0-100), CIDEr times 100, MME in its own points (0-2000 for perception).
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, ClassVar, TypeAlias

from PIL import Image

from ..io import DataFormatError, MissingImageError, is_saved_hf_dataset, open_hf_dataset
from ..metrics.choice import MC_INSTRUCTION

__all__ = [
    "Sample",
    "Task",
    "ImageSource",
    "DataSource",
    "SHORT_ANSWER_INSTRUCTION",
    "ANSWER_INSTRUCTIONS",
    "CAPTION_PROMPT",
    "strip_suffix",
]

#: LLaVA-1.5's instruction for short-answer VQA (VQAv2, GQA, TextVQA, POPE, MME).
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
#: Answer-format instructions of LLaVA-1.5's evaluation that tasks append to questions (what
#: :meth:`Task.answer_instruction` recognises by default).
ANSWER_INSTRUCTIONS: tuple[str, ...] = (SHORT_ANSWER_INSTRUCTION, MC_INSTRUCTION)
#: The captioning prompt of lmms-eval's NoCaps/Flickr30k tasks.
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."

#: An image, a path to one, a zero-argument callable returning one (lazy), or ``None``.
ImageSource: TypeAlias = "Image.Image | Path | Callable[[], Image.Image | None] | None"
#: What :meth:`Task.load` accepts: a path, a hub id, a ``datasets`` object, or ``None``.
DataSource: TypeAlias = "str | os.PathLike[str] | Any | None"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?$")


@dataclass
class Sample:
    """One evaluation item.

    Attributes
    ----------
    id
        Unique id within the loaded split (the benchmark's question id where it has one).
    image
        The image: a PIL image, a path, a zero-argument callable (loaded lazily) or ``None``.
        Use :meth:`load_image` rather than reading this directly.
    question
        The raw question, without answer-format instruction (empty for captioning).
    answer
        The gold answer(s) in the form the task's metric expects (a letter, ``"yes"``/``"no"``,
        a list of human answers, a list of reference captions...), or ``None`` when the split
        has no public answers (e.g. VQAv2 test-dev).
    meta
        Everything else the prompt or the metric needs (options, hint, category, group keys...).
    """

    id: str
    image: ImageSource
    question: str
    answer: Any
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image | None:
        """Return the image as an RGB PIL image (``None`` if the sample has none).

        Raises
        ------
        MissingImageError
            If the image is a path that does not exist (naming the sample and the path).
        """
        img = self.image
        if img is None:
            return None
        if isinstance(img, (str, Path)):
            path = Path(img)
            if not path.is_file():
                raise MissingImageError(f"Image of sample {self.id!r} not found: {path}")
            with Image.open(path) as opened:
                out = opened.convert("RGB")
            return out
        if isinstance(img, Image.Image):
            out = img
        elif callable(img):
            loaded = img()
            if loaded is None:
                return None
            out = loaded
        else:
            raise TypeError(f"Sample {self.id!r}: unsupported image type {type(img).__name__}")
        return out if out.mode == "RGB" else out.convert("RGB")


def strip_suffix(text: str, suffixes: Sequence[str]) -> str:
    """Remove the first matching suffix (and the whitespace before it) from ``text``."""
    stripped = text.rstrip()
    for suffix in suffixes:
        if stripped.endswith(suffix):
            return stripped[: -len(suffix)].rstrip()
    return stripped


class Task(ABC):
    """Base class of an evaluation task.

    Subclasses set the class attributes and implement :meth:`_iter_local`, :meth:`_iter_hf`,
    :meth:`prompt`, :meth:`parse` and :meth:`metrics`.

    Attributes
    ----------
    name
        Registry name (e.g. ``"pope"``).
    max_new_tokens
        Generation budget for one answer (the runner may override it).
    primary_metric
        The key of :meth:`metrics` that the papers' tables report for this task.
    hub_id, hub_split
        Hugging Face dataset used when :meth:`load` gets no ``data`` (``"owner/name:config"``
        selects a configuration), and its default split.
    """

    name: ClassVar[str] = ""
    max_new_tokens: int = 16
    primary_metric: ClassVar[str] = "accuracy"
    hub_id: ClassVar[str | None] = None
    hub_split: ClassVar[str | None] = None

    # ------------------------------------------------------------------ loading

    def load(
        self,
        data: DataSource = None,
        *,
        split: str | None = None,
        limit: int | None = None,
        image_dir: str | os.PathLike[str] | None = None,
        annotations: str | os.PathLike[str] | None = None,
        check_images: bool = True,
    ) -> list[Sample]:
        """Read the task's samples.

        Parameters
        ----------
        data
            A local file or folder in one of the layouts the task documents; a folder written
            by ``datasets``' ``save_to_disk``; a ``datasets.Dataset``/``DatasetDict``; or a hub
            id (``"owner/name"`` or ``"owner/name:config"``) for ``datasets.load_dataset``,
            used when no such local path exists. ``None`` uses :attr:`hub_id`.
        split
            Dataset split (Hugging Face data), or the split of the benchmark's own files where
            the task documents one.
        limit
            Keep only the first ``limit`` samples (after the task's own filtering).
        image_dir
            Folder that image paths in the question file are relative to (each task documents
            its default, usually a folder next to the question file).
        annotations
            Answer/annotation file for layouts that keep answers apart from questions (VQAv2,
            GQA, TextVQA, POPE, ScienceQA, MME); default: looked up next to the question file.
        check_images
            Check that every image file exists while loading (fail fast, naming the sample).

        Returns
        -------
        list of Sample

        Raises
        ------
        FileNotFoundError
            ``data`` is neither an existing path nor a hub id, or a required companion file
            (annotations, images) is missing (:class:`~himap_vlm.apps.eval.io.MissingImageError`).
        ~himap_vlm.apps.eval.io.DataFormatError
            A record is malformed (the message names the file, line and field), or two samples
            share an id.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        it = self.iter_samples(
            data, split=split, image_dir=image_dir, annotations=annotations, check_images=check_images
        )
        samples = list(islice(it, limit)) if limit is not None else list(it)
        seen: set[str] = set()
        for s in samples:
            if s.id in seen:
                raise DataFormatError(f"{self.name}: two samples have the id {s.id!r}")
            seen.add(s.id)
        return samples

    def iter_samples(
        self,
        data: DataSource = None,
        *,
        split: str | None = None,
        image_dir: str | os.PathLike[str] | None = None,
        annotations: str | os.PathLike[str] | None = None,
        check_images: bool = True,
    ) -> Iterator[Sample]:
        """Iterate over samples lazily; same arguments as :meth:`load` (without ``limit``)."""
        if data is None:
            if self.hub_id is None:
                raise ValueError(f"Task {self.name!r} needs a data path")
            data = self.hub_id
        img_dir = Path(image_dir) if image_dir is not None else None
        hf_opts = {"image_dir": img_dir, "check_images": check_images}
        if not isinstance(data, (str, os.PathLike)):  # a datasets.Dataset / DatasetDict object
            yield from self._iter_hf(
                open_hf_dataset(data, split=split, default_split=self.hub_split), **hf_opts
            )
            return
        path = Path(data)
        ann = Path(annotations) if annotations is not None else None
        if ann is not None and not ann.is_file():
            raise FileNotFoundError(f"Annotation file not found: {ann}")
        if path.exists():
            if is_saved_hf_dataset(path):
                yield from self._iter_hf(
                    open_hf_dataset(path, split=split, default_split=self.hub_split), **hf_opts
                )
            else:
                yield from self._iter_local(
                    path, split=split, image_dir=img_dir, annotations=ann, check_images=check_images
                )
            return
        if isinstance(data, str) and _HUB_ID.match(data) and not data.startswith((".", "/", "~")):
            yield from self._iter_hf(
                open_hf_dataset(data, split=split, default_split=self.hub_split), **hf_opts
            )
            return
        raise FileNotFoundError(f"{self.name}: data path does not exist: {path}")

    @abstractmethod
    def _iter_local(
        self,
        path: Path,
        *,
        split: str | None,
        image_dir: Path | None,
        annotations: Path | None,
        check_images: bool,
    ) -> Iterator[Sample]:
        """Yield samples from local files (``path`` exists and is not a saved HF dataset)."""

    @abstractmethod
    def _iter_hf(self, ds: Any, *, image_dir: Path | None, check_images: bool) -> Iterator[Sample]:
        """Yield samples from one split of a Hugging Face dataset.

        ``image_dir`` serves datasets that name image files instead of embedding images.
        """

    # ------------------------------------------------------------------ prompting and scoring

    @abstractmethod
    def prompt(self, sample: Sample) -> str:
        """The user-turn text of the papers' evaluation, without chat template or image token."""

    def answer_instruction(self, sample: Sample) -> str | None:
        """The answer-format instruction :meth:`prompt` appends to this sample's question, or ``None``.

        An instruction the *task* adds by the papers' protocol (LLaVA-1.5's "Answer the question
        using a single word or phrase."), not text of the data. The runner leaves it out for a
        model with another question convention (:mod:`himap_vlm.apps.eval.prompts`). Default:
        the prompt's last line when it is one of :data:`ANSWER_INSTRUCTIONS` and follows a
        question.
        """
        prompt = self.prompt(sample).rstrip()
        for instruction in ANSWER_INSTRUCTIONS:
            if prompt.endswith("\n" + instruction) and prompt[: -len(instruction)].strip():
                return instruction
        return None

    def prompt_without_instruction(self, sample: Sample) -> str:
        """:meth:`prompt` without its :meth:`answer_instruction` (the question as the data has it)."""
        prompt = self.prompt(sample)
        instruction = self.answer_instruction(sample)
        stripped = prompt.rstrip()
        if instruction and stripped.endswith(instruction):
            return stripped[: -len(instruction)].rstrip()
        return prompt

    @abstractmethod
    def parse(self, sample: Sample, generated_text: str) -> Any:
        """Extract the prediction from the generated text (the input of :meth:`metrics`)."""

    @abstractmethod
    def metrics(self, samples: Sequence[Sample], predictions: Sequence[Any]) -> dict[str, float]:
        """Official metrics of parsed predictions, keyed by name (see :attr:`primary_metric`).

        Samples whose ``answer`` is ``None`` are not scored (``n_unscored`` counts them).
        """

    def score_sample(self, sample: Sample, prediction: Any) -> float | None:
        """Score of one parsed prediction in ``[0, 1]`` (``None`` for corpus-level metrics)."""
        return None

    def evaluate(self, samples: Sequence[Sample], generated_texts: Sequence[str]) -> dict[str, float]:
        """Parse the generated texts and compute :meth:`metrics`."""
        self._check_lengths(samples, generated_texts)
        return self.metrics(
            samples, [self.parse(s, t) for s, t in zip(samples, generated_texts, strict=False)]
        )

    # ------------------------------------------------------------------ helpers for subclasses

    @staticmethod
    def _check_lengths(samples: Sequence[Sample], predictions: Sequence[Any]) -> None:
        if len(samples) != len(predictions):
            raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")

    @staticmethod
    def _scored(samples: Sequence[Sample], predictions: Sequence[Any]) -> tuple[list[Sample], list[Any], int]:
        """Samples with a gold answer, their predictions, and the number left out."""
        Task._check_lengths(samples, predictions)
        keep = [(s, p) for s, p in zip(samples, predictions, strict=False) if s.answer is not None]
        return [s for s, _ in keep], [p for _, p in keep], len(samples) - len(keep)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
