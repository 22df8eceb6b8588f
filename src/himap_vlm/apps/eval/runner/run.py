"""The runner itself: :func:`evaluate`."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from himap_vlm.core.methods.spec import MethodSpec, resolve_methods

from ..prompts import PromptPolicy
from .generation import _batches, _generate_batch, _Progress
from .merge import _collect, finalize
from .results import EvalResults
from .shards import _dist_context
from .store import _check_config, _finished_records, _json_line, model_label, read_predictions

if TYPE_CHECKING:
    from rich.console import Console

    from himap_vlm.apps.eval.tasks.base import Sample, Task
    from himap_vlm.core.methods.base import PruningMethod


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
    instructions: str = "auto",
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
        specs, or built methods. Parsed for the model's depth ``L``: a method named without
        parameters runs at ``defaults_for(L)``, the paper's setting scaled to ``L`` (unchanged on
        a 32-layer model).
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
    instructions : {"auto", "task", "none"}
        Whether the task's answer-format instructions are appended to the questions: see
        :mod:`himap_vlm.apps.eval.prompts` (``auto``: the model's declared convention, else the
        task's instructions where the model's tokenizer can spell them).

    Returns
    -------
    EvalResults
        Complete on every rank after a merge; otherwise (ranks without a merge) the
        configurations this process knows of, with metrics over its own finished samples.

    Raises
    ------
    ValueError
        For duplicate sample ids, a bad batch size, a method that does not fit the model
        (:class:`~himap_vlm.core.methods.spec.MethodSpecError`), a model whose
        ``config.image_token_id`` is not a token of its vocabulary, or an output folder holding
        another configuration or predictions made with other prompts.
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
    family = resolve_family(model)
    num_layers = int(family.text_config(model).num_hidden_layers)
    specs = resolve_methods(methods, num_layers=num_layers)
    for spec in specs:  # fail before generating anything if a configuration does not fit the model
        spec.build()(model)
    policy = PromptPolicy(task_obj, processor, model, instructions)
    prompts = policy.prompts(samples)
    ctx = _dist_context(rank, world_size)
    if merge is None:
        merge = ctx.world_size == 1 or ctx.barrier is not None
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
            "prompting": policy.to_dict(),
        }
        _check_config(directory, config)
        own_part = directory / f"predictions.part{ctx.rank}.jsonl"
        read_predictions(own_part, truncate_partial=True)
        finished = _finished_records(directory)
        _check_prompts(directory, finished, ids, prompts)
        done = set(finished)
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
                    records = _generate_batch(
                        model,
                        processor,
                        task_obj,
                        [samples[i] for i in batch],
                        [prompts[i] for i in batch],
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
        results = finalize(
            out_dir, task_obj, samples, specs, mname, timings=timings, prompting=policy.to_dict()
        )
    else:
        results = None
    if ctx.world_size > 1 and ctx.barrier is not None:
        ctx.barrier()
    if results is None:
        results = _collect(root, task_obj, samples, specs, mname, merged=merge, timings=timings)
    results.prompting = policy.to_dict()
    return results


def _check_prompts(
    directory: Path,
    finished: Mapping[str, Mapping[str, Any]],
    ids: Sequence[str],
    prompts: Sequence[tuple[str, str | None]],
) -> None:
    """Refuse to resume a folder whose finished predictions were asked with other prompts."""
    for sid, (prompt, _) in zip(ids, prompts, strict=True):
        rec = finished.get(sid)
        if rec is not None and "prompt" in rec and rec["prompt"] != prompt:
            raise ValueError(
                f"{directory} holds predictions made with another prompt (sample {sid}: {rec['prompt']!r} there, "
                f"{prompt!r} now; see --instructions); use another output folder or delete that one"
            )
