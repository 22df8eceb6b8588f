"""Helpers that write tiny evaluation fixtures (images, JSON/JSONL files, HF datasets) into tmp_path."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def make_image(path: Path, color: int = 0, size: int = 8) -> Path:
    """Write a small solid-colour image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), COLORS[color % len(COLORS)]).save(path)
    return path


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def save_hf(path: Path, columns: dict[str, list[Any]], image_column: str | None = "image") -> Path:
    """Save a ``datasets.Dataset`` (with an ``Image`` feature) to ``path`` with ``save_to_disk``."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(columns)
    if image_column is not None:
        ds = ds.cast_column(image_column, datasets.Image())
    ds.save_to_disk(str(path))
    return path


def pil(color: int = 0, size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), COLORS[color % len(COLORS)])
