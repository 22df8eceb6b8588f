"""Merging part files, computing metrics and FLOPs ratios, and the run summary (:func:`finalize`)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from himap_vlm.core.methods.spec import MethodSpec, resolve_methods

from .results import ConfigResult, EvalResults
from .store import (
    CONFIG,
    METRICS,
    PREDICTIONS,
    SUMMARY_CSV,
    SUMMARY_JSON,
    _finished_records,
    _json_line,
    _json_safe,
    _part_files,
    _write_atomic,
)

if TYPE_CHECKING:
    from himap_vlm.apps.eval.tasks.base import Sample, Task
    from himap_vlm.core.methods.base import PruningMethod


def _merge(directory: Path, order: Sequence[str]) -> list[dict[str, Any]]:
    """Merge the part files into ``predictions.jsonl`` (idempotent) and return its records."""
    records = _finished_records(directory)
    position = {sid: i for i, sid in enumerate(order)}
    known = sorted((sid for sid in records if sid in position), key=position.__getitem__)
    others = [sid for sid in records if sid not in position]
    merged = [records[sid] for sid in known + others]
    _write_atomic(directory / PREDICTIONS, "".join(_json_line(r) for r in merged))
    for part in _part_files(directory):
        part.unlink(missing_ok=True)
    return merged


def flops_ratios(
    records: Iterable[Mapping[str, Any]], dims: Mapping[str, Any] | None
) -> tuple[float | None, float | None]:
    """Prefill FLOPs over dense's, ``(exact, paper)`` conventions, summed over ``records``.

    Each record needs ``layout`` (``[before, image, after]``) and ``image_tokens_per_layer``;
    ``dims`` are :class:`himap_vlm.apps.flops.TextDims` fields. ``(None, None)`` when a record
    lacks them, when ``dims`` is empty, or when there are no records.
    """
    from himap_vlm.apps.flops import Layout, TextDims, prefill_flops

    if not dims:
        return None, None
    text_dims = TextDims(**dims)
    totals = {"exact": [0.0, 0.0], "paper": [0.0, 0.0]}
    cache: dict[tuple[Any, ...], tuple[float, float, float, float]] = {}
    any_record = False
    for rec in records:
        layout, counts = rec.get("layout"), rec.get("image_tokens_per_layer")
        if not layout or counts is None or len(counts) != text_dims.num_layers:
            return None, None
        key = (tuple(layout), tuple(counts))
        if key not in cache:
            lay = Layout(*[int(v) for v in layout])
            exact = prefill_flops(text_dims, lay, list(counts), "exact")
            paper = prefill_flops(text_dims, lay, list(counts), "paper")
            cache[key] = (exact.total, exact.dense_total, paper.total, paper.dense_total)
        e, ed, p, pd = cache[key]
        totals["exact"][0] += e
        totals["exact"][1] += ed
        totals["paper"][0] += p
        totals["paper"][1] += pd
        any_record = True
    if not any_record:
        return None, None
    exact_ratio = totals["exact"][0] / totals["exact"][1] if totals["exact"][1] else 1.0
    paper_ratio = totals["paper"][0] / totals["paper"][1] if totals["paper"][1] else 1.0
    return exact_ratio, paper_ratio


def _config_result(
    directory: Path,
    task: Task,
    samples: Sequence[Sample],
    spec: MethodSpec,
    records: Mapping[str, Mapping[str, Any]],
    throughput: float | None,
) -> ConfigResult:
    config = (
        json.loads((directory / CONFIG).read_text(encoding="utf-8")) if (directory / CONFIG).is_file() else {}
    )
    have = [s for s in samples if str(s.id) in records]
    outputs = [records[str(s.id)] for s in have]
    metrics = task.metrics(
        have, [task.parse(s, str(r.get("output", ""))) for s, r in zip(have, outputs, strict=True)]
    )
    metrics = _json_safe(metrics)
    primary = task.primary_metric
    score = metrics.get(primary)
    exact, paper = flops_ratios(outputs, config.get("text_dims"))
    mean_counts: list[float] = []
    rows = [r.get("image_tokens_per_layer") or [] for r in outputs]
    if rows and all(len(r) == len(rows[0]) for r in rows):
        mean_counts = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
    return ConfigResult(
        slug=spec.slug,
        label=spec.label,
        method=spec.name,
        config=_json_safe(spec.config),
        directory=directory,
        metrics=metrics,
        primary_metric=primary,
        score=float(score) if isinstance(score, (int, float)) and math.isfinite(score) else None,
        n_samples=len(have),
        n_missing=len(samples) - len(have),
        flops_ratio=exact,
        flops_ratio_paper=paper,
        mean_image_tokens_per_layer=mean_counts,
        samples_per_second=throughput,
    )


def _throughput(timings: Mapping[str, tuple[int, float]] | None, slug: str) -> float | None:
    if not timings or slug not in timings:
        return None
    n, seconds = timings[slug]
    return n / seconds if n and seconds > 0 else None


def finalize(
    out_dir: str | os.PathLike[str],
    task: Task | str,
    samples: Sequence[Sample],
    methods: str | MethodSpec | PruningMethod | Sequence[str | MethodSpec | PruningMethod],
    model_name: str,
    *,
    timings: Mapping[str, tuple[int, float]] | None = None,
    num_layers: int | None = None,
    prompting: Mapping[str, Any] | None = None,
) -> EvalResults:
    """Merge the part files of every configuration, compute metrics and write the summary.

    Call it once all processes of a run are done (``evaluate`` does, on rank 0, when it can
    synchronise the processes). Idempotent.

    Parameters
    ----------
    out_dir, task, samples, methods
        As given to :func:`evaluate`.
    model_name : str
        The model's folder name (:func:`model_label`).
    timings : mapping, optional
        ``{slug: (samples generated, seconds)}`` for the throughput column.
    num_layers : int, optional
        The model's depth, for method names given without parameters (``defaults_for(L)``, as
        :func:`evaluate` reads them); not needed for :class:`MethodSpec` objects that carry it.
    prompting : mapping, optional
        The prompt rule of the run (:meth:`himap_vlm.apps.eval.prompts.PromptPolicy.to_dict`),
        recorded in ``summary.json``.

    Returns
    -------
    EvalResults
    """
    from himap_vlm.apps.eval.tasks import get_task

    task_obj = get_task(task) if isinstance(task, str) else task
    specs = resolve_methods(methods, num_layers=num_layers)
    root = Path(out_dir) / task_obj.name / model_name
    order = [str(s.id) for s in samples]
    configs = []
    for spec in specs:
        directory = root / spec.slug
        merged = _merge(directory, order) if directory.is_dir() else []
        records = {str(r["id"]): r for r in merged}
        result = _config_result(directory, task_obj, samples, spec, records, _throughput(timings, spec.slug))
        if directory.is_dir():
            _write_atomic(
                directory / METRICS, json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n"
            )
        configs.append(result)
    results = EvalResults(
        task=task_obj.name,
        model=model_name,
        directory=root,
        configs=configs,
        prompting=None if prompting is None else dict(prompting),
    )
    root.mkdir(parents=True, exist_ok=True)
    rows = results.rows()
    csv_path = root / SUMMARY_CSV
    tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["task"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    os.replace(tmp, csv_path)
    results.summary_csv = csv_path
    _write_atomic(root / SUMMARY_JSON, json.dumps(results.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return results


def _collect(
    root: Path,
    task: Task,
    samples: Sequence[Sample],
    specs: Sequence[MethodSpec],
    model_name: str,
    *,
    merged: bool,
    timings: Mapping[str, tuple[int, float]] | None,
) -> EvalResults:
    """Results as the files stand (merged metrics when present, else this process's records)."""
    configs = []
    for spec in specs:
        directory = root / spec.slug
        metrics_path = directory / METRICS
        if merged and metrics_path.is_file():
            configs.append(ConfigResult.from_dict(json.loads(metrics_path.read_text(encoding="utf-8"))))
            continue
        records = _finished_records(directory)
        configs.append(
            _config_result(directory, task, samples, spec, records, _throughput(timings, spec.slug))
        )
    summary = root / SUMMARY_CSV
    return EvalResults(
        task=task.name,
        model=model_name,
        directory=root,
        configs=configs,
        summary_csv=summary if merged and summary.is_file() else None,
    )
