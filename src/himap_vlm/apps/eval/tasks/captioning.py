"""Image captioning: NoCaps (``nocaps``) and Flickr30k (``flickr30k``), CIDEr.

Prompt (lmms-eval's ``nocaps``/``flickr30k`` tasks)::

    Provide a one-sentence caption for the provided image.

Metric: ``cider`` = CIDEr-D as in pycocoevalcap (:mod:`himap_vlm.apps.eval.metrics.cider`), document
frequencies over the references of the evaluated samples, times 100 as in the papers' tables.
For NoCaps, ``cider/<domain>`` (``in-domain``, ``near-domain``, ``out-domain``) scores each
domain's subset on its own, as the NoCaps evaluation does, when the data gives the domain.

Layouts read (both tasks)
-------------------------
1. **COCO caption format**: a ``.json`` with ``{"images": [{"id", "file_name", "domain"?}],
   "annotations": [{"image_id", "caption"}]}``, e.g. NoCaps' ``nocaps_val_4500_captions.json``
   (no ``annotations`` for the test split: references ``None``, unscored). Images:
   ``file_name`` relative to ``image_dir`` (default ``<folder>/images``, ``<folder>/<split>``,
   ``<folder>``).
2. **Karpathy split format**: ``dataset_flickr30k.json`` with ``{"images": [{"filename",
   "imgid", "split", "sentences": [{"raw"}]}]}``; ``split`` selects the images (default
   ``test``); images in ``image_dir`` (default ``<folder>/flickr30k-images``,
   ``<folder>/images``, ``<folder>``).
3. **JSONL**: one ``{"id", "image", "captions": [...]}`` per line (``image_id`` for ``id``,
   ``references`` for ``captions`` also work); images relative to ``image_dir`` or the file.

A folder is searched for ``nocaps_<split>*captions.json`` / ``dataset_flickr30k.json`` (per
task), then any ``*captions*.json``, ``*.json`` or ``*.jsonl``.

4. **Hugging Face**: ``lmms-lab/NoCaps`` (split ``validation``; columns ``image``,
   ``image_id``, ``annotations_captions``, and ``domain`` when present) and
   ``lmms-lab/flickr30k`` (split ``test``; columns ``image``, ``img_id``, ``caption`` (list)).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..io import (
    DataFormatError,
    find_file,
    first_present,
    iter_hf_rows,
    iter_jsonl,
    read_json,
    require,
    resolve_image,
)
from ..metrics.cider import cider_d
from .base import CAPTION_PROMPT, Sample, Task

NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


class CaptioningTask(Task):
    """Captioning with CIDEr-D; ``sample.answer`` is the list of reference captions."""

    max_new_tokens = 64
    primary_metric = "cider"
    default_split: ClassVar[str] = "test"
    file_patterns: ClassVar[tuple[str, ...]] = ()
    image_folders: ClassVar[tuple[str, ...]] = ("images",)
    caption_columns: ClassVar[tuple[str, ...]] = ("captions", "caption", "references", "annotations_captions")
    id_columns: ClassVar[tuple[str, ...]] = ("id", "image_id", "img_id", "question_id")

    def _iter_local(
        self,
        path: Path,
        *,
        split: str | None,
        image_dir: Path | None,
        annotations: Path | None,
        check_images: bool,
    ) -> Iterator[Sample]:
        split = split or self.default_split
        if path.is_dir():
            patterns = tuple(p.format(split=split) for p in self.file_patterns)
            file = find_file(path, (*patterns, "*captions*.json", "*.json", "*.jsonl"), what="caption file")
        else:
            file = path
        folder = file.parent
        roots: list[Path | None] = (
            [image_dir]
            if image_dir is not None
            else [*(folder / f for f in self.image_folders), folder / split, folder]
        )
        if file.suffix == ".jsonl":
            yield from self._iter_jsonl(
                file, roots if image_dir is not None else [folder, *roots], check_images
            )
            return
        data = read_json(file)
        if not isinstance(data, dict) or "images" not in data:
            raise DataFormatError(f"{file}: expected a JSON object with an 'images' list")
        images = data["images"]
        if images and isinstance(images[0], dict) and "sentences" in images[0]:
            yield from self._iter_karpathy(file, images, split, roots, check_images)
        else:
            yield from self._iter_coco(file, data, roots, check_images)

    def _iter_coco(
        self, file: Path, data: dict[str, Any], roots: list[Path | None], check_images: bool
    ) -> Iterator[Sample]:
        refs: dict[str, list[str]] = defaultdict(list)
        has_annotations = "annotations" in data
        for i, a in enumerate(data.get("annotations") or []):
            where = f"{file}, annotations entry {i}"
            refs[str(require(a, "image_id", where))].append(str(require(a, "caption", where)))
        for i, img in enumerate(data["images"]):
            where = f"{file}, images entry {i}"
            sid = str(require(img, "id", where))
            gold = refs.get(sid)
            if has_annotations and not gold:
                raise DataFormatError(
                    f"Malformed record at {where}: image {sid!r} has no caption in 'annotations'"
                )
            yield Sample(
                id=sid,
                image=resolve_image(
                    require(img, "file_name", where), roots, sample_id=sid, check=check_images
                ),
                question="",
                answer=gold,
                meta={"domain": img.get("domain")},
            )

    def _iter_karpathy(
        self, file: Path, images: list[Any], split: str, roots: list[Path | None], check_images: bool
    ) -> Iterator[Sample]:
        for i, img in enumerate(images):
            where = f"{file}, images entry {i}"
            if img.get("split") != split:
                continue
            name = str(require(img, "filename", where))
            sid = str(img.get("imgid", Path(name).stem))
            sentences = require(img, "sentences", where)
            gold = [str(s["raw"]) if isinstance(s, dict) else str(s) for s in sentences]
            yield Sample(
                id=sid,
                image=resolve_image(name, roots, sample_id=sid, check=check_images),
                question="",
                answer=gold,
                meta={},
            )

    def _iter_jsonl(self, file: Path, roots: list[Path | None], check_images: bool) -> Iterator[Sample]:
        for where, rec in iter_jsonl(file):
            sid = str(require(rec, ("id", "image_id"), where))
            caps = first_present(rec, ("captions", "references"))
            yield Sample(
                id=sid,
                image=resolve_image(require(rec, "image", where), roots, sample_id=sid, check=check_images),
                question="",
                answer=[str(c) for c in caps] if caps is not None else None,
                meta={"domain": rec.get("domain")},
            )

    def _iter_hf(self, ds: Any, *, image_dir: Path | None, check_images: bool) -> Iterator[Sample]:
        for i, row, ref, _ in iter_hf_rows(ds, image_column="image"):
            caps = first_present(row, self.caption_columns)
            if isinstance(caps, str):
                caps = [caps]
            yield Sample(
                id=str(first_present(row, self.id_columns, i)),
                image=ref,
                question="",
                answer=[str(c) for c in caps] if caps else None,
                meta={"domain": row.get("domain")},
            )

    def prompt(self, sample: Sample) -> str:
        """The captioning instruction."""
        return CAPTION_PROMPT

    def parse(self, sample: Sample, generated_text: str) -> str:
        """The caption, stripped."""
        return generated_text.strip()

    def metrics(self, samples: Sequence[Sample], predictions: Sequence[Any]) -> dict[str, float]:
        """CIDEr (x100) over all scored samples, and per NoCaps domain when known."""
        scored, preds, unscored = self._scored(samples, predictions)
        out: dict[str, float] = {}
        if scored:
            score, _ = cider_d([str(p) for p in preds], [list(s.answer) for s in scored])
            out["cider"] = 100.0 * score
            domains: dict[str, list[int]] = defaultdict(list)
            for k, s in enumerate(scored):
                if s.meta.get("domain"):
                    domains[str(s.meta["domain"])].append(k)
            for dom in sorted(
                domains, key=lambda d: (NOCAPS_DOMAINS.index(d) if d in NOCAPS_DOMAINS else 9, d)
            ):
                idx = domains[dom]
                dscore, _ = cider_d([str(preds[k]) for k in idx], [list(scored[k].answer) for k in idx])
                out[f"cider/{dom}"] = 100.0 * dscore
        out["n"] = len(scored)
        if unscored:
            out["n_unscored"] = unscored
        return out


class NoCaps(CaptioningTask):
    """NoCaps validation (see module docstring for layouts)."""

    name = "nocaps"
    hub_id = "lmms-lab/NoCaps"
    hub_split = "validation"
    default_split = "val"
    file_patterns = ("nocaps_{split}*captions.json", "nocaps_{split}*.json")
    image_folders = ("images", "validation")


class Flickr30k(CaptioningTask):
    """Flickr30k test (Karpathy split; see module docstring for layouts)."""

    name = "flickr30k"
    hub_id = "lmms-lab/flickr30k"
    hub_split = "test"
    default_split = "test"
    file_patterns = ("dataset_flickr30k.json", "flickr30k_{split}*.json")
    image_folders = ("flickr30k-images", "images")
