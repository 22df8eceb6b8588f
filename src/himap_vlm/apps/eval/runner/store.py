"""Result files: predictions JSONL (complete lines only), part files, atomic writes, ``config.json``, folder names."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PREDICTIONS = "predictions.jsonl"
CONFIG = "config.json"
METRICS = "metrics.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
_PART = re.compile(r"^predictions\.part(\d+)\.jsonl$")
_SAFE = re.compile(r"[^A-Za-z0-9_.+-]")
# Fields of config.json that must match for a folder to be resumed.
_RESUME_KEYS = ("task", "method", "config", "max_new_tokens")


def read_predictions(path: Path, *, truncate_partial: bool = False) -> list[dict[str, Any]]:
    """Complete records of a predictions file (JSONL); a missing file reads as empty.

    A last line without its newline (a write cut short) is ignored and, with
    ``truncate_partial``, cut off the file so that appending starts on a fresh line.

    Raises
    ------
    ValueError
        For a complete line that is not a JSON object with an ``id`` (a damaged file: delete
        it, or the line, to recompute those samples).
    """
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and truncate_partial:
        with path.open("r+b") as f:
            f.truncate(end)
    records: list[dict[str, Any]] = []
    for lineno, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}, line {lineno}: not valid JSON ({exc.msg}); delete this line (or the file) to "
                "recompute the samples it held"
            ) from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise ValueError(f"{path}, line {lineno}: expected a JSON object with an 'id'")
        records.append(rec)
    return records


def _part_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    parts = [p for p in directory.iterdir() if _PART.match(p.name)]
    return sorted(parts, key=lambda p: int(_PART.match(p.name).group(1)))  # type: ignore[union-attr]


def _finished_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Every complete record of the folder (merged file first, then part files), by id."""
    out: dict[str, dict[str, Any]] = {}
    for path in [directory / PREDICTIONS, *_part_files(directory)]:
        for rec in read_predictions(path):
            out.setdefault(str(rec["id"]), rec)
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _json_line(record: Mapping[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, default=_json_default) + "\n"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def model_label(model: Any, name: str | None = None) -> str:
    """The folder name of a model: ``name`` if given, else from ``config._name_or_path``.

    A local path gives its last component (``/ckpt/llava-1.5-7b-hf`` -> ``llava-1.5-7b-hf``);
    a hub id ``org/name`` gives ``org__name``.
    """
    if name is None:
        source = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
        path = Path(source).expanduser()
        if not source:
            name = type(model).__name__
        elif path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
            name = path.resolve().name or source
        else:
            name = source.replace("/", "__")
    clean = _SAFE.sub("_", name.strip()).strip("._")
    if not clean:
        raise ValueError(f"model name {name!r} gives an empty folder name; pass model_name=")
    return clean


def _check_config(directory: Path, config: Mapping[str, Any]) -> None:
    """Write ``config.json`` or, when resuming, check it describes the same configuration."""
    path = directory / CONFIG
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        if isinstance(old, dict):
            new = _json_safe(dict(config))
            diffs = [k for k in _RESUME_KEYS if old.get(k) != new.get(k)]
            if diffs:
                detail = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in diffs)
                raise ValueError(
                    f"{directory} holds results of another configuration ({detail}); use another output "
                    "folder or delete that one"
                )
    _write_atomic(path, json.dumps(_json_safe(dict(config)), indent=2, ensure_ascii=False) + "\n")
