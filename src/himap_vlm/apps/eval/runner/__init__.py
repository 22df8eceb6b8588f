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

from .generation import prompt_layouts
from .merge import finalize, flops_ratios
from .results import ConfigResult, EvalResults
from .run import evaluate
from .store import CONFIG, METRICS, PREDICTIONS, SUMMARY_CSV, SUMMARY_JSON, model_label, read_predictions

__all__ = [
    "CONFIG",
    "ConfigResult",
    "EvalResults",
    "METRICS",
    "PREDICTIONS",
    "SUMMARY_CSV",
    "SUMMARY_JSON",
    "evaluate",
    "finalize",
    "flops_ratios",
    "model_label",
    "prompt_layouts",
    "read_predictions",
]
