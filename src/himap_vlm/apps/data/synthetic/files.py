"""Serialisation: PNG files plus JSONL (:func:`write_jsonl`, :func:`read_jsonl`) and ``datasets``."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = ["read_jsonl", "to_hf_dataset", "write_jsonl"]

_SAFE_RE = re.compile(r"[^A-Za-z0-9_.-]")


def write_jsonl(
    records: Sequence[Mapping[str, Any]], out_dir: str | Path, filename: str | None = None
) -> Path:
    """Write records as PNG images plus a JSONL file.

    Each line holds ``{"id", "image" (path relative to the JSONL file), "question", "answer",
    "family"}`` plus the optional fields present in the record (``scene_id``, ``split``,
    ``qtype``, ``options``, ``objects``). Records sharing a ``scene_id`` share one PNG
    (``images/<scene_id>.png``).

    Parameters
    ----------
    records : sequence of mapping
        Records as returned by :func:`load_synthetic` (``image`` a PIL image).
    out_dir : str or Path
        Output directory (created if needed).
    filename : str, optional
        Name of the JSONL file; default ``"<split>.jsonl"`` when all records share one split,
        else ``"data.jsonl"``.

    Returns
    -------
    Path
        Path of the JSONL file.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if filename is None:
        splits = {r.get("split") for r in records}
        filename = f"{splits.pop()}.jsonl" if len(splits) == 1 and None not in splits else "data.jsonl"
    path = out / filename
    written: set[str] = set()
    with path.open("w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            for key in ("id", "image", "question", "answer"):
                if key not in r:
                    raise ValueError(f"record {i} has no {key!r} field")
            stem = _SAFE_RE.sub("_", str(r.get("scene_id") or r["id"]))
            rel = f"images/{stem}.png"
            if rel not in written:
                image = r["image"]
                if not isinstance(image, Image.Image):
                    raise ValueError(f"record {i}: 'image' must be a PIL image, got {type(image).__name__}")
                image.save(out / rel, format="PNG")
                written.add(rel)
            line: dict[str, Any] = {
                "id": r["id"],
                "image": rel,
                "question": r["question"],
                "answer": r["answer"],
                "family": r.get("family"),
            }
            for key in ("scene_id", "split", "qtype", "options", "objects"):
                if key in r:
                    line[key] = r[key]
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read records written by :func:`write_jsonl` (or any JSON/JSONL list of such records).

    Parameters
    ----------
    path : str or Path
        A ``.jsonl`` file (one JSON object per line; blank lines are skipped) or a ``.json``
        file holding a list of objects. Each object needs string ``image``, ``question`` and
        ``answer`` fields; ``image`` is resolved relative to the file's directory.

    Returns
    -------
    list of dict
        The records, with ``image`` loaded as an RGB PIL image and ``image_path`` the
        resolved path. Records pointing at the same file share one image.

    Raises
    ------
    FileNotFoundError
        If the file, or an image it references, does not exist (the message names the line).
    ValueError
        If a line is not valid JSON or a record lacks a required field (naming the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    entries: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
        entries = [(f"{path}: record {i}", item) for i, item in enumerate(items)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e}") from e
    cache: dict[Path, Image.Image] = {}
    records = []
    for where, item in entries:
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
        missing = [k for k in ("image", "question", "answer") if not isinstance(item.get(k), str)]
        if missing:
            raise ValueError(f"{where}: malformed record, missing or non-string field(s) {missing}")
        image_path = Path(item["image"])
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        if image_path not in cache:
            if not image_path.is_file():
                raise FileNotFoundError(f"{where}: image not found: {image_path}")
            try:
                with Image.open(image_path) as im:
                    cache[image_path] = im.convert("RGB")
            except OSError as e:
                raise ValueError(f"{where}: cannot read image {image_path}: {e}") from e
        record = dict(item)
        record["image"] = cache[image_path]
        record["image_path"] = str(image_path)
        records.append(record)
    return records


def to_hf_dataset(records: Sequence[Mapping[str, Any]]) -> datasets.Dataset:
    """Convert records to a :class:`datasets.Dataset` (needs the ``datasets`` extra).

    Parameters
    ----------
    records : sequence of mapping
        Records as returned by :func:`load_synthetic` or :func:`read_jsonl`.

    Returns
    -------
    datasets.Dataset
        Columns ``id, scene_id, split, family, qtype, question, answer, options, objects`` and
        ``image`` (a ``datasets.Image()`` feature, decoded back to PIL images).
    """
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise ImportError("to_hf_dataset needs the 'datasets' package: pip install 'himap[data]'") from e
    obj_feature = {
        "shape": datasets.Value("string"),
        "color": datasets.Value("string"),
        "size": datasets.Value("string"),
        "row": datasets.Value("int32"),
        "col": datasets.Value("int32"),
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "scene_id": datasets.Value("string"),
            "split": datasets.Value("string"),
            "family": datasets.Value("string"),
            "qtype": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "options": datasets.List(datasets.Value("string")),
            "objects": datasets.List(obj_feature),
            "image": datasets.Image(),
        }
    )
    rows = [
        {
            "id": str(r["id"]),
            "scene_id": r.get("scene_id"),
            "split": r.get("split"),
            "family": r.get("family"),
            "qtype": r.get("qtype"),
            "question": r["question"],
            "answer": r["answer"],
            "options": list(r.get("options") or []),
            "objects": [dict(o) for o in r.get("objects") or []],
            "image": r["image"],
        }
        for r in records
    ]
    return datasets.Dataset.from_list(rows, features=features)
