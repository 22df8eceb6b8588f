"""Honest benchmarking of image-token pruning: interleaved timings, memory, KV bytes, FLOPs.

* :mod:`himap_vlm.apps.bench.runner` — rows (:class:`RowSpec`), one timed run (:func:`measure_run`), the
  interleaved benchmark (:func:`run_benchmark`) and its summaries (:class:`RowSummary`);
* :mod:`himap_vlm.apps.bench.reference_style` — :class:`ReferenceStyle`, a method run the authors' way
  (eager attention, scores from materialised maps, no KV cache);
* :mod:`himap_vlm.apps.bench.plot` and :mod:`himap_vlm.apps.bench.report` — the PNG plot and Markdown tables.

The command is ``himap bench`` (:mod:`himap_vlm.apps.cli.bench`).
"""

from __future__ import annotations

from himap_vlm.apps.bench.reference_style import (
    ReferenceStyle,
    ReferenceStyleRun,
    reference_generate,
)
from himap_vlm.apps.bench.runner import (
    BenchResult,
    Measurement,
    RowSpec,
    RowSummary,
    Stat,
    build_rows,
    cache_nbytes,
    default_method_args,
    greedy_generate,
    measure_peak_memory,
    measure_run,
    run_benchmark,
    summarize,
)

__all__ = [
    "BenchResult",
    "Measurement",
    "ReferenceStyle",
    "ReferenceStyleRun",
    "RowSpec",
    "RowSummary",
    "Stat",
    "build_rows",
    "cache_nbytes",
    "default_method_args",
    "greedy_generate",
    "measure_peak_memory",
    "measure_run",
    "reference_generate",
    "run_benchmark",
    "summarize",
]
