"""Benchmark tasks and metrics for reproducing the HiMAP paper's tables.

Each task (:mod:`himap_vlm.apps.eval.tasks`) reads its data (LLaVA's evaluation layout, the benchmark's
own release files, or a Hugging Face dataset), writes the prompt the papers used, extracts the
prediction from generated text and computes the official metric. The metrics
(:mod:`himap_vlm.apps.eval.metrics`) can be used on their own. The runner (:func:`evaluate`,
:mod:`himap_vlm.apps.eval.runner`; ``himap eval`` on the command line) evaluates several pruning
configurations (:mod:`himap_vlm.core.methods.spec`) on a task, resumably and data parallel. See
``README.md`` in this folder for the data layouts each task reads.
"""

from __future__ import annotations

from himap_vlm.core.methods.spec import MethodSpec, MethodSpecError, parse_methods

from .io import DataFormatError, MissingImageError
from .runner import ConfigResult, EvalResults, evaluate, finalize
from .tasks import Sample, Task, get_task, list_tasks, register_task

__all__ = [
    "ConfigResult",
    "DataFormatError",
    "EvalResults",
    "MethodSpec",
    "MethodSpecError",
    "MissingImageError",
    "Sample",
    "Task",
    "evaluate",
    "finalize",
    "get_task",
    "list_tasks",
    "parse_methods",
    "register_task",
]
