"""What the two training scripts (``train_tiny_llava.py``, ``train_smol_llava.py``) share: the log
line, atomic checkpoints and the validation record (``history.jsonl`` plus one log line).

Imported as a sibling module (the scripts run as ``python scripts/<name>.py``, which puts this
folder on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch


def log(msg: str) -> None:
    """Print a timestamped line and flush."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically write a checkpoint (temporary file + rename)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def record_validation(out_dir: Path, history: list[dict[str, Any]], entry: dict[str, Any], seconds: float) -> None:
    """Append one validation (``{"step", "train_minutes", "val", ["val_blank"]}``) to ``history`` and
    ``out_dir/history.jsonl``, and log it."""
    history.append(entry)
    with open(Path(out_dir) / "history.jsonl", "a") as fh:
        fh.write(json.dumps(entry) + "\n")
    fam = " ".join(f"{k}={v:.3f}" for k, v in entry["val"].items())
    blank = f" | blank all={entry['val_blank']['all']:.3f}" if "val_blank" in entry else ""
    log(f"VAL step {entry['step']}: {fam}{blank} ({seconds:.0f} s)")
