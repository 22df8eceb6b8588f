"""The evaluation runner: every method configuration on the same samples, resumable, data parallel.

:func:`evaluate` is what ``himap eval`` (and ``himap demo``) call::

    from himap_vlm.apps.eval import get_task
    from himap_vlm.apps.eval.runner import evaluate

    task = get_task("scienceqa_img")
    samples = task.load("playground/data/eval/scienceqa", limit=200)
    results = evaluate(model, processor, task, samples, "dense,himap,fastv(k=2,r=0.5)", "runs/",
                       batch_size=8)
    results.print()               # rich table: score and FLOPs ratio per configuration
    results.configs[1].metrics    # the task's metrics for himap

Result folders
--------------
``<out_dir>/<task>/<model>/<configuration slug>/`` (see
:attr:`himap_vlm.core.methods.spec.MethodSpec.slug`) holds

``predictions.jsonl``
    One JSON object per sample, in sample order: ``id``, ``prompt`` (the task's user-turn
    text), ``output`` (generated text), ``prediction`` (parsed), ``answer`` (gold), ``score``
    (per-sample score or ``null``), ``layout`` (``[before, image, after]`` prompt tokens) and
    ``image_tokens_per_layer`` (measured by the engine, one count per decoder layer).
``predictions.part<rank>.jsonl``
    What a process appends, line by line (flushed), while it runs; merged into
    ``predictions.jsonl`` and removed at the end.
``config.json``
    The resolved configuration: task, model, method and every config field, generation
    settings, the text-model dimensions used for FLOPs.
``metrics.json``
    The task's metrics over the samples of the run, the primary score, and the FLOPs ratios.

and ``<out_dir>/<task>/<model>/summary.csv`` (+ ``summary.json``) lists the configurations of the
run side by side.

Resuming
--------
A sample is finished once its line (with its newline) is in ``predictions.jsonl`` or in any
``predictions.part*.jsonl`` of the folder; a re-run skips finished samples. A last line
without its newline (a run killed while writing) is dropped and recomputed. Samples are cut
into batches on a fixed grid (per process: its samples in order, ``batch_size`` at a time),
and a batch with any unfinished sample is generated whole and only its unfinished samples are
written, so a resumed run sees the same batches, and writes the same lines, as an
uninterrupted one. ``config.json`` is checked on resume: a folder that holds another
configuration (task, method parameters, ``max_new_tokens``) is refused.

Several processes
-----------------
Under ``accelerate launch`` (or any ``torch.distributed`` launcher) process ``rank`` of
``world_size`` evaluates samples ``rank, rank + world_size, ...`` with its own model copy and
writes ``predictions.part<rank>.jsonl``; after a barrier, rank 0 merges every part file into
``predictions.jsonl`` (deduplicated by sample id, sample order), computes the metrics and
removes the part files. The merge is idempotent: re-running it, or resuming after a crash in
the middle of it, yields the same files. Without a process group, pass ``rank`` and
``world_size`` explicitly to each process and call :func:`finalize` once they are all done.

FLOPs ratio
-----------
``flops_ratio`` is the prefill FLOPs of a configuration over those of the dense model on the same
prompts, in the *exact* convention of :mod:`himap_vlm.apps.flops` (every token, real shapes, LM head on the
last position), from each sample's measured ``image_tokens_per_layer`` and prompt layout, summed
over the samples (so: the ratio of the mean FLOPs per sample). ``flops_ratio_paper`` is the same
in the papers' convention (image tokens only).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from himap_vlm.core.methods.spec import MethodSpec, resolve_methods

if TYPE_CHECKING:
    import torch
    from rich.console import Console
    from rich.table import Table

    from himap_vlm.apps.eval.tasks.base import Sample, Task
    from himap_vlm.core.methods.base import PruningMethod

__all__ = [
    "ConfigResult",
    "EvalResults",
    "PREDICTIONS",
    "evaluate",
    "finalize",
    "model_label",
    "read_predictions",
]

PREDICTIONS = "predictions.jsonl"
CONFIG = "config.json"
METRICS = "metrics.json"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
_PART = re.compile(r"^predictions\.part(\d+)\.jsonl$")
_SAFE = re.compile(r"[^A-Za-z0-9_.+-]")
# Fields of config.json that must match for a folder to be resumed.
_RESUME_KEYS = ("task", "method", "config", "max_new_tokens")


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class ConfigResult:
    """The outcome of one method configuration.

    Attributes
    ----------
    slug : str
        Folder name of the configuration.
    label : str
        ``name(k=v,...)`` as given.
    method : str
        Method name.
    config : dict
        Resolved method configuration.
    directory : Path
        The configuration's result folder.
    metrics : dict
        The task's metrics (:meth:`Task.metrics`) over the samples of the run.
    primary_metric : str
        The key of :attr:`metrics` the papers report.
    score : float or None
        ``metrics[primary_metric]`` (``None`` if absent).
    n_samples : int
        Samples with a prediction.
    n_missing : int
        Samples of the run without a prediction (0 after a complete run).
    flops_ratio, flops_ratio_paper : float or None
        Prefill FLOPs relative to dense, exact and paper conventions (see module docstring).
    mean_image_tokens_per_layer : list of float
        Image tokens present in each decoder layer, averaged over samples.
    samples_per_second : float or None
        Generation throughput of rank 0 in the run that finished the configuration (``None``
        when nothing was generated in that run).
    """

    slug: str
    label: str
    method: str
    config: dict[str, Any]
    directory: Path
    metrics: dict[str, Any]
    primary_metric: str
    score: float | None
    n_samples: int
    n_missing: int = 0
    flops_ratio: float | None = None
    flops_ratio_paper: float | None = None
    mean_image_tokens_per_layer: list[float] = field(default_factory=list)
    samples_per_second: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``metrics.json`` holds)."""
        out = dataclasses.asdict(self)
        out["directory"] = str(self.directory)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfigResult:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["directory"] = Path(kwargs["directory"])
        return cls(**kwargs)


@dataclass
class EvalResults:
    """All configurations of one run (one task, one model).

    Attributes
    ----------
    task : str
    model : str
        The model's folder name under the task.
    directory : Path
        ``<out_dir>/<task>/<model>``.
    configs : list of ConfigResult
        In the order the methods were given.
    summary_csv : Path or None
        The CSV across configurations (``None`` on ranks other than 0 before merging).
    """

    task: str
    model: str
    directory: Path
    configs: list[ConfigResult]
    summary_csv: Path | None = None

    def __getitem__(self, key: int | str) -> ConfigResult:
        if isinstance(key, int):
            return self.configs[key]
        for c in self.configs:
            if key in (c.slug, c.label):
                return c
        raise KeyError(f"no configuration {key!r}; have: {', '.join(c.label for c in self.configs)}")

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per configuration: the summary CSV's rows."""
        rows = []
        extra: list[str] = []
        for c in self.configs:
            for k, v in c.metrics.items():
                if _is_scalar(v) and k not in extra:
                    extra.append(k)
        for c in self.configs:
            row: dict[str, Any] = {
                "task": self.task,
                "model": self.model,
                "method": c.method,
                "label": c.label,
                "slug": c.slug,
                "n": c.n_samples,
                "n_missing": c.n_missing,
                "primary_metric": c.primary_metric,
                "score": c.score,
                "flops_ratio": c.flops_ratio,
                "flops_ratio_paper": c.flops_ratio_paper,
                "samples_per_second": c.samples_per_second,
            }
            for k in extra:
                row[f"metric:{k}"] = c.metrics.get(k)
            rows.append(row)
        return rows

    def table(self) -> Table:
        """A rich table: configuration, samples, primary score, FLOPs ratios, throughput."""
        from rich.table import Table

        primary = {c.primary_metric for c in self.configs}
        score_name = primary.pop() if len(primary) == 1 else "score"
        table = Table(title=f"himap eval · {self.task} · {self.model}")
        table.add_column("configuration", overflow="fold")
        table.add_column("n", justify="right")
        table.add_column(score_name, justify="right")
        table.add_column("FLOPs ratio (exact)", justify="right")
        table.add_column("FLOPs ratio (paper)", justify="right")
        table.add_column("samples/s", justify="right")
        for c in self.configs:
            n = str(c.n_samples) + (f" ({c.n_missing} missing)" if c.n_missing else "")
            table.add_row(
                c.label,
                n,
                "-" if c.score is None else f"{c.score:.2f}",
                _pct(c.flops_ratio),
                _pct(c.flops_ratio_paper),
                "-" if c.samples_per_second is None else f"{c.samples_per_second:.2f}",
            )
        return table

    def print(self, console: Console | None = None) -> None:
        """Print :meth:`table` and where the results are."""
        from rich.console import Console

        console = console or Console()
        console.print(self.table())
        console.print(f"results: {self.directory}")
        if self.summary_csv is not None:
            console.print(f"summary: {self.summary_csv}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``summary.json`` holds)."""
        return {
            "task": self.task,
            "model": self.model,
            "directory": str(self.directory),
            "summary_csv": None if self.summary_csv is None else str(self.summary_csv),
            "configs": [c.to_dict() for c in self.configs],
        }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int
    world_size: int
    barrier: Callable[[], None] | None


def _dist_context(rank: int | None, world_size: int | None) -> _Dist:
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    initialised = False
    try:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
    except ImportError:  # pragma: no cover
        dist = None  # type: ignore[assignment]
    if rank is not None and world_size is not None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
        return _Dist(
            rank, world_size, dist.barrier if initialised and dist.get_world_size() == world_size else None
        )
    if initialised:
        return _Dist(dist.get_rank(), dist.get_world_size(), dist.barrier)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
        return _Dist(state.process_index, state.num_processes, state.wait_for_everyone)
    return _Dist(0, 1, None)


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
def _batches(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield list(indices[start : start + size])


def _layouts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int
) -> list[list[int]]:
    """``[before, image, after]`` real (non-padding) tokens of each row (:func:`himap_vlm.apps.flops.layout_from_inputs`)."""
    from himap_vlm.apps.flops import layout_from_inputs

    out = []
    for b in range(input_ids.shape[0]):
        lay = layout_from_inputs(input_ids, image_token_id, attention_mask, sample=b)
        out.append([lay.before, lay.image, lay.after])
    return out


class _Progress:
    """A rich progress bar with samples/s (or nothing)."""

    def __init__(self, enabled: bool, total: int, console: Console | None):
        self._bar = None
        if not enabled or total <= 0:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class SpeedColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text(
                    "- samples/s" if not speed else f"{speed:.2f} samples/s", style="progress.data.speed"
                )

        self._bar = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            SpeedColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._bar.add_task("eval", total=total)
        self._bar.start()

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _generate_batch(
    model: Any,
    processor: Any,
    task: Task,
    samples: Sequence[Sample],
    max_new_tokens: int,
    run: Any,
    image_token_id: int,
    generation_kwargs: Mapping[str, Any],
) -> list[dict[str, Any]]:
    import torch

    from himap_vlm.apps.prompting import build_inputs

    prompts = [task.prompt(s) for s in samples]
    images = []
    for s in samples:
        img = s.load_image()
        images.append([img] if img is not None else [])
    inputs = build_inputs(processor, images, prompts, model=model, padding_side="left")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    if pad is not None:
        kwargs["pad_token_id"] = pad
    kwargs.update(generation_kwargs)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)
    length = inputs["input_ids"].shape[1]
    texts = processor.batch_decode(out[:, length:], skip_special_tokens=True)
    mask = inputs.get("attention_mask")
    layouts = _layouts(inputs["input_ids"].cpu(), None if mask is None else mask.cpu(), image_token_id)
    per_layer = run.image_tokens_per_layer  # layers x batch
    records = []
    for b, (sample, prompt, text) in enumerate(zip(samples, prompts, texts, strict=True)):
        text = text.strip()
        prediction = task.parse(sample, text)
        try:
            score = task.score_sample(sample, prediction)
        except Exception:  # noqa: BLE001 - a per-sample score is informative only
            score = None
        records.append(
            {
                "id": sample.id,
                "prompt": prompt,
                "output": text,
                "prediction": _json_safe(prediction),
                "answer": _json_safe(sample.answer),
                "score": score,
                "layout": layouts[b],
                "image_tokens_per_layer": [int(row[b]) for row in per_layer],
            }
        )
    return records


# ---------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------
def evaluate(
    model: Any,
    processor: Any,
    task: Task | str,
    samples: Sequence[Sample],
    methods: str | MethodSpec | PruningMethod | Sequence[str | MethodSpec | PruningMethod],
    out_dir: str | os.PathLike[str],
    batch_size: int = 1,
    *,
    max_new_tokens: int | None = None,
    model_name: str | None = None,
    model_source: str | None = None,
    generation_kwargs: Mapping[str, Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    merge: bool | None = None,
    progress: bool = False,
    console: Console | None = None,
    on_record: Callable[[MethodSpec, dict[str, Any]], None] | None = None,
) -> EvalResults:
    """Evaluate every method configuration on ``samples`` and write resumable results.

    Parameters
    ----------
    model, processor
        A loaded supported model (on its device, in eval mode) and its processor.
    task : Task or str
        The task (or its registry name) that prompts, parses and scores.
    samples : sequence of Sample
        What to evaluate (e.g. ``task.load(data, limit=N)``); ids must be unique.
    methods : str, MethodSpec, PruningMethod, or a sequence of them
        ``"dense,himap(k1=2,r1=0.5,k2=8,r2=0.75),fastv"`` (see :mod:`himap_vlm.core.methods.spec`),
        specs, or built methods.
    out_dir : path
        Root of the results; see the module docstring for the layout.
    batch_size : int
        Samples per ``generate`` call (left padding).
    max_new_tokens : int, optional
        Default: the task's :attr:`~himap_vlm.apps.eval.tasks.base.Task.max_new_tokens`.
    model_name : str, optional
        Folder name of the model (default: :func:`model_label`).
    model_source : str, optional
        Where the model came from (path or hub id), recorded in ``config.json``.
    generation_kwargs : mapping, optional
        Extra ``generate`` arguments (default: greedy, one beam).
    rank, world_size : int, optional
        This process's shard. Default: from ``torch.distributed`` if initialised, else from
        ``accelerate`` when launched with ``WORLD_SIZE > 1``, else ``0`` of ``1``.
    merge : bool, optional
        Merge the part files and compute the metrics at the end. Default: when this is the
        only process, or after a barrier when a process group exists; with explicit ranks and
        no process group, call :func:`finalize` once every rank is done.
    progress : bool
        Show a progress bar (rank 0 only).
    console : rich.console.Console, optional
        Where the progress bar goes.
    on_record : callable, optional
        Called as ``on_record(spec, record)`` after each record is written and flushed.

    Returns
    -------
    EvalResults
        Complete on every rank after a merge; otherwise (ranks without a merge) the
        configurations this process knows of, with metrics over its own finished samples.

    Raises
    ------
    ValueError
        For duplicate sample ids, a bad batch size, a method that does not fit the model
        (:class:`~himap_vlm.core.methods.spec.MethodSpecError`), or an output folder holding
        another configuration.
    himap_vlm.apps.eval.io.MissingImageError, himap_vlm.apps.eval.io.DataFormatError
        From the task when an image or a record is bad.
    """
    from himap_vlm.apps.eval.tasks import get_task
    from himap_vlm.apps.flops import TextDims
    from himap_vlm.core.families import resolve_family

    task_obj = get_task(task) if isinstance(task, str) else task
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if max_new_tokens is None:
        max_new_tokens = int(task_obj.max_new_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    samples = list(samples)
    ids = [str(s.id) for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"two samples share the id {dup!r}; sample ids must be unique")
    specs = resolve_methods(methods)
    for spec in specs:  # fail before generating anything if a configuration does not fit the model
        spec.build()(model)
    ctx = _dist_context(rank, world_size)
    if merge is None:
        merge = ctx.world_size == 1 or ctx.barrier is not None
    family = resolve_family(model)
    image_token_id = int(family.image_token_id(model.config))
    try:
        dims: dict[str, Any] | None = dataclasses.asdict(TextDims.from_config(model.config))
    except ValueError:
        dims = None
    mname = model_label(model, model_name)
    root = Path(out_dir) / task_obj.name / mname
    source = model_source or str(getattr(model.config, "_name_or_path", "") or "")
    owned = list(range(ctx.rank, len(samples), ctx.world_size))
    gen_kwargs = dict(generation_kwargs or {})

    plans: list[tuple[MethodSpec, Path, list[list[int]], set[str]]] = []
    total = 0
    for spec in specs:
        directory = root / spec.slug
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "task": task_obj.name,
            "model": mname,
            "model_source": source,
            "method": spec.name,
            "label": spec.label,
            "slug": spec.slug,
            "params": spec.params,
            "config": spec.config,
            "max_new_tokens": max_new_tokens,
            "generation_kwargs": gen_kwargs,
            "batch_size": batch_size,
            "text_dims": dims,
            "dtype": str(getattr(model, "dtype", "")),
        }
        _check_config(directory, config)
        own_part = directory / f"predictions.part{ctx.rank}.jsonl"
        read_predictions(own_part, truncate_partial=True)
        done = set(_finished_records(directory))
        todo = [batch for batch in _batches(owned, batch_size) if any(ids[i] not in done for i in batch)]
        total += sum(1 for batch in todo for i in batch if ids[i] not in done)
        plans.append((spec, directory, todo, done))

    bar = _Progress(progress and ctx.rank == 0, total, console)
    timings: dict[str, tuple[int, float]] = {}
    try:
        for spec, directory, todo, done in plans:
            if not todo:
                continue
            bar.describe(spec.label)
            written = 0
            start = time.perf_counter()
            with (
                (directory / f"predictions.part{ctx.rank}.jsonl").open("a", encoding="utf-8") as out,
                spec.build()(model) as run,
            ):
                for batch in todo:
                    batch_samples = [samples[i] for i in batch]
                    records = _generate_batch(
                        model,
                        processor,
                        task_obj,
                        batch_samples,
                        max_new_tokens,
                        run,
                        image_token_id,
                        gen_kwargs,
                    )
                    for rec in records:
                        if rec["id"] in done:
                            continue
                        out.write(_json_line(rec))
                        out.flush()
                        done.add(rec["id"])
                        written += 1
                        bar.advance(1)
                        if on_record is not None:
                            on_record(spec, rec)
            timings[spec.slug] = (written, time.perf_counter() - start)
    finally:
        bar.close()

    if ctx.world_size > 1 and ctx.barrier is not None:
        ctx.barrier()
    if merge and ctx.rank == 0:
        results = finalize(out_dir, task_obj, samples, specs, mname, timings=timings)
    else:
        results = None
    if ctx.world_size > 1 and ctx.barrier is not None:
        ctx.barrier()
    if results is None:
        results = _collect(root, task_obj, samples, specs, mname, merged=merge, timings=timings)
    return results


# ---------------------------------------------------------------------------------------------
# merging and metrics
# ---------------------------------------------------------------------------------------------
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


def _flops(
    records: Iterable[Mapping[str, Any]], dims: Mapping[str, Any] | None
) -> tuple[float | None, float | None]:
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
    exact, paper = _flops(outputs, config.get("text_dims"))
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

    Returns
    -------
    EvalResults
    """
    from himap_vlm.apps.eval.tasks import get_task

    task_obj = get_task(task) if isinstance(task, str) else task
    specs = resolve_methods(methods)
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
    results = EvalResults(task=task_obj.name, model=model_name, directory=root, configs=configs)
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
