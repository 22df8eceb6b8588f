"""Reading evaluation data: JSON/JSONL/TSV records, image paths and Hugging Face datasets.

Everything here is shared by the task loaders in :mod:`himap_vlm.apps.eval.tasks`. The helpers raise
two kinds of errors, both with messages that say exactly what to fix:

* :class:`DataFormatError` (a :class:`ValueError`): a record is malformed; the message names
  the file and the line (JSONL/TSV) or entry (JSON list/dict) and the missing field.
* :class:`MissingImageError` (a :class:`FileNotFoundError`): the image of a sample does not
  exist; the message names the sample id and the path(s) that were tried.

Hugging Face ``datasets`` is imported lazily: it is only needed when a task reads a dataset
saved with ``save_to_disk`` or a hub id.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = [
    "DataFormatError",
    "MissingImageError",
    "RecordLocation",
    "HFImageRef",
    "Base64ImageRef",
    "is_missing",
    "read_json",
    "iter_json_records",
    "iter_jsonl",
    "iter_tsv",
    "require",
    "first_present",
    "resolve_image",
    "find_file",
    "is_saved_hf_dataset",
    "open_hf_dataset",
    "iter_hf_rows",
    "hf_image_columns",
]


class DataFormatError(ValueError):
    """A data file or one of its records does not have the expected shape."""


class MissingImageError(FileNotFoundError):
    """The image file of a sample does not exist."""


@dataclass(frozen=True)
class RecordLocation:
    """Where a record comes from, for error messages.

    Parameters
    ----------
    path
        The file the record was read from.
    line
        1-based line number (JSONL, TSV), or ``None``.
    entry
        0-based index or key of the record inside a JSON list/dict, or ``None``.
    """

    path: Path | str
    line: int | None = None
    entry: int | str | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.path}, line {self.line}"
        if self.entry is not None:
            return f"{self.path}, entry {self.entry!r}"
        return str(self.path)


def is_missing(value: Any) -> bool:
    """Whether a cell is empty: ``None``, NaN, ``""``, ``"nan"`` or ``"none"`` (any case).

    This mirrors LLaVA's ``is_none`` used on MMBench's pandas-read TSV cells.
    """
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and value.strip().lower() in ("", "nan", "none"):
        return True
    return False


def require(record: Mapping[str, Any], field: str | Sequence[str], where: RecordLocation | str) -> Any:
    """Return ``record[field]`` (the first present of several names), or raise a clear error.

    Parameters
    ----------
    record
        The parsed record.
    field
        A field name, or alternative names tried in order (e.g. ``("question", "text")``).
    where
        The record's location, named in the error.

    Raises
    ------
    DataFormatError
        If none of the names is present (or the record is not a JSON object).
    """
    names = [field] if isinstance(field, str) else list(field)
    if not isinstance(record, Mapping):
        raise DataFormatError(
            f"Malformed record at {where}: expected a JSON object, got {type(record).__name__}"
        )
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    wanted = " or ".join(repr(n) for n in names)
    present = ", ".join(sorted(map(str, record))) or "none"
    raise DataFormatError(f"Malformed record at {where}: missing field {wanted} (fields present: {present})")


def first_present(record: Mapping[str, Any], names: Sequence[str], default: Any = None) -> Any:
    """Return the value of the first of ``names`` present (and not missing) in ``record``."""
    for name in names:
        if name in record and not is_missing(record[name]):
            return record[name]
    return default


def read_json(path: Path | str) -> Any:
    """Load a JSON file, naming the file (and position) on a syntax error."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e


def iter_jsonl(path: Path | str) -> Iterator[tuple[RecordLocation, dict[str, Any]]]:
    """Yield ``(location, record)`` for each non-blank line of a JSONL file.

    Raises
    ------
    DataFormatError
        On a line that is not valid JSON or not a JSON object (naming file and line).
    """
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = RecordLocation(path, line=lineno)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"Malformed record at {where}: invalid JSON ({e.msg})") from e
            if not isinstance(record, dict):
                raise DataFormatError(
                    f"Malformed record at {where}: expected a JSON object, got {type(record).__name__}"
                )
            yield where, record


def iter_json_records(
    path: Path | str, key: str | None = None
) -> Iterator[tuple[RecordLocation, dict[str, Any]]]:
    """Yield ``(location, record)`` from a ``.jsonl`` file or a ``.json`` list/dict of objects.

    Parameters
    ----------
    path
        A ``.jsonl`` file (one object a line) or a ``.json`` file holding a list of objects,
        a dict of objects (the key is then added to the record as ``"_key"``), or a dict with
        the list under ``key`` (e.g. ``"questions"``, ``"data"``).
    key
        Name of the list inside a top-level JSON object, if any.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from iter_jsonl(path)
        return
    data = read_json(path)
    if key is not None and isinstance(data, dict) and key in data:
        data = data[key]
    if isinstance(data, list):
        for i, record in enumerate(data):
            where = RecordLocation(path, entry=i)
            if not isinstance(record, dict):
                raise DataFormatError(
                    f"Malformed record at {where}: expected a JSON object, got {type(record).__name__}"
                )
            yield where, record
    elif isinstance(data, dict):
        for k, record in data.items():
            where = RecordLocation(path, entry=k)
            if not isinstance(record, dict):
                raise DataFormatError(
                    f"Malformed record at {where}: expected a JSON object, got {type(record).__name__}"
                )
            yield where, {"_key": k, **record}
    else:
        raise DataFormatError(f"{path}: expected a JSON list or object of records, got {type(data).__name__}")


def iter_tsv(path: Path | str) -> Iterator[tuple[RecordLocation, dict[str, str]]]:
    """Yield ``(location, row)`` for each data row of a tab-separated file with a header.

    Very large cells (base64 images) are allowed.
    """
    path = Path(path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for row in reader:
            where = RecordLocation(path, line=reader.line_num)
            if None in row:  # more cells than header columns
                raise DataFormatError(f"Malformed record at {where}: more cells than header columns")
            yield where, row


def resolve_image(
    relative: str | Path,
    roots: Iterable[Path | None],
    *,
    sample_id: str,
    check: bool = True,
) -> Path:
    """Find an image file under one of several root folders.

    Parameters
    ----------
    relative
        The path stored in the record (absolute, or relative to one of ``roots``).
    roots
        Folders tried in order (``None`` entries are skipped).
    sample_id
        Named in the error message.
    check
        If false, return the first candidate without checking that it exists.

    Raises
    ------
    MissingImageError
        If no candidate exists; the message names the sample and every path tried.
    """
    rel = Path(relative)
    if rel.is_absolute():
        candidates = [rel]
    else:
        candidates = []
        for root in roots:
            if root is None:
                continue
            cand = Path(root) / rel
            if cand not in candidates:
                candidates.append(cand)
        if not candidates:
            candidates = [rel]
    if not check:
        return candidates[0]
    for cand in candidates:
        if cand.is_file():
            return cand
    tried = ", ".join(str(c) for c in candidates)
    raise MissingImageError(f"Image of sample {sample_id!r} not found: {str(relative)!r} (tried: {tried})")


def find_file(folder: Path, names: Sequence[str], *, what: str) -> Path:
    """Return the first of ``names`` (file names or glob patterns) present in ``folder``.

    Raises
    ------
    FileNotFoundError
        Naming the folder and the names that were looked for.
    """
    for name in names:
        if any(ch in name for ch in "*?["):
            matches = sorted(p for p in folder.glob(name) if p.is_file())
            if matches:
                return matches[0]
        elif (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"No {what} found in {folder}: looked for {', '.join(names)}")


# --------------------------------------------------------------------------- images held lazily


class HFImageRef:
    """Decode one image of a Hugging Face dataset on demand.

    The dataset is memory-mapped Arrow, so holding a reference costs nothing; the image bytes
    are only read and decoded when the reference is called.

    Parameters
    ----------
    dataset
        A ``datasets.Dataset`` whose ``column`` is an ``Image(decode=False)`` feature.
    index
        Row index.
    column
        Image column name.
    """

    def __init__(self, dataset: Any, index: int, column: str) -> None:
        self.dataset = dataset
        self.index = index
        self.column = column

    def __call__(self) -> Image.Image | None:
        cell = self.dataset[self.index][self.column]
        return _decode_image_cell(cell)

    def __repr__(self) -> str:
        return f"HFImageRef(row={self.index}, column={self.column!r})"


class Base64ImageRef:
    """Decode a base64-encoded image (MMBench TSV) on demand."""

    def __init__(self, data: str) -> None:
        self.data = data

    def __call__(self) -> Image.Image:
        import base64

        return Image.open(io.BytesIO(base64.b64decode(self.data)))

    def __repr__(self) -> str:
        return f"Base64ImageRef({len(self.data)} chars)"


def _decode_image_cell(cell: Any) -> Image.Image | None:
    if cell is None:
        return None
    if isinstance(cell, Image.Image):
        return cell
    if isinstance(cell, Mapping):
        if cell.get("bytes"):
            return Image.open(io.BytesIO(cell["bytes"]))
        if cell.get("path"):
            return Image.open(cell["path"])
        return None
    if isinstance(cell, (bytes, bytearray)):
        return Image.open(io.BytesIO(cell))
    if isinstance(cell, str):
        return Image.open(cell)
    raise TypeError(f"Cannot decode an image from a {type(cell).__name__}")


# --------------------------------------------------------------------------- Hugging Face datasets


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Reading Hugging Face datasets needs the `datasets` package: pip install 'himap[data]'"
        ) from e
    return datasets


def is_saved_hf_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def _pick_split(ds: Any, split: str | None, default_split: str | None, source: str) -> Any:
    datasets = _import_datasets()
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(ds.keys())
        if split is not None:
            if split not in ds:
                raise ValueError(f"Split {split!r} not in {source}; available splits: {', '.join(names)}")
            return ds[split]
        if default_split is not None and default_split in ds:
            return ds[default_split]
        if len(names) == 1:
            return ds[names[0]]
        raise ValueError(f"{source} has several splits ({', '.join(names)}); pass split=...")
    return ds


def open_hf_dataset(data: Any, *, split: str | None, default_split: str | None) -> Any:
    """Open a Hugging Face dataset and select one split.

    Parameters
    ----------
    data
        A ``datasets.Dataset``/``DatasetDict`` object, a folder written by ``save_to_disk``
        (opened with ``datasets.load_from_disk``), or a hub id passed to
        ``datasets.load_dataset``; ``"owner/name:config"`` selects a configuration.
    split
        Split to use; ``None`` picks ``default_split`` if the dataset has it, else the only
        split.
    default_split
        The task's usual split.

    Returns
    -------
    datasets.Dataset
    """
    datasets = _import_datasets()
    if isinstance(data, (datasets.Dataset, datasets.DatasetDict)):
        return _pick_split(data, split, default_split, "the dataset")
    path = Path(data)
    if is_saved_hf_dataset(path):
        return _pick_split(datasets.load_from_disk(str(path)), split, default_split, str(path))
    hub_id, _, config = str(data).partition(":")
    kwargs: dict[str, Any] = {}
    if config:
        kwargs["name"] = config
    chosen = split if split is not None else default_split
    if chosen is not None:
        kwargs["split"] = chosen
    return _pick_split(datasets.load_dataset(hub_id, **kwargs), split, default_split, hub_id)


def hf_image_columns(ds: Any) -> list[str]:
    """Names of the ``Image`` feature columns of a dataset."""
    datasets = _import_datasets()
    return [name for name, feat in ds.features.items() if isinstance(feat, datasets.Image)]


def _non_null(ds: Any, column: str, batch_size: int) -> list[bool]:
    """Which cells of ``column`` are non-null, without decoding or copying the whole column."""
    if getattr(ds, "_indices", None) is None:
        return [not v for v in ds.data.column(column).is_null().to_pylist()]
    out: list[bool] = []
    for batch in ds.select_columns([column]).with_format("arrow").iter(batch_size=batch_size):
        out.extend(not v for v in batch.column(0).is_null().to_pylist())
    return out


def iter_hf_rows(
    ds: Any, *, image_column: str | None = "image", check_presence: bool = False, batch_size: int = 512
) -> Iterator[tuple[int, dict[str, Any], Callable[[], Image.Image | None] | None, bool]]:
    """Iterate over a dataset's rows without decoding images.

    Yields
    ------
    index : int
        Row index.
    row : dict
        The row without its image columns.
    image : HFImageRef or None
        A lazy reference to the row's image (``None`` unless ``image_column`` is an ``Image``
        feature; a string column, e.g. a file name, stays in ``row``).
    has_image : bool
        With ``check_presence``, whether the row's image cell is non-null (read from the Arrow
        validity bitmap, nothing decoded); otherwise whether ``image_column`` is an image feature.
    """
    datasets = _import_datasets()
    image_cols = hf_image_columns(ds)
    text_ds = ds.remove_columns(image_cols) if image_cols else ds
    lazy = None
    present: list[bool] | None = None
    if image_column is not None and image_column in image_cols:
        lazy = ds.select_columns([image_column]).cast_column(image_column, datasets.Image(decode=False))
        if check_presence:
            present = _non_null(ds, image_column, batch_size)
    index = 0
    for batch in text_ds.iter(batch_size=batch_size):
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        for j in range(n):
            row = {k: batch[k][j] for k in keys}
            ref = HFImageRef(lazy, index, image_column) if lazy is not None and image_column else None
            has = present[index] if present is not None else lazy is not None
            yield index, row, ref, has
            index += 1
