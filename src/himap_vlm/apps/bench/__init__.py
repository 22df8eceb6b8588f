"""Honest benchmarking of image-token pruning: interleaved timings, memory, KV bytes, FLOPs.

* :mod:`himap_vlm.apps.bench.rows` — rows (:class:`RowSpec`) from method lists in the one spec
  syntax (:func:`build_rows`);
* :mod:`himap_vlm.apps.bench.measure` — one timed run (:func:`measure_run`), the greedy loop
  (:func:`greedy_generate`), the peak-memory pass;
* :mod:`himap_vlm.apps.bench.runner` — the interleaved benchmark (:func:`run_benchmark`), the one
  timing routine of the package (``himap bench``, ``himap generate --compare``, the demo);
* :mod:`himap_vlm.apps.bench.summary` — statistics and paired speedups (:class:`RowSummary`,
  :class:`BenchResult`);
* :mod:`himap_vlm.apps.bench.reference_style` — :class:`ReferenceStyle`, a method run the authors' way
  (eager attention, scores from materialised maps, no KV cache);
* :mod:`himap_vlm.apps.bench.models` — random-weight LLaVAs of any shape, built on the device;
* :mod:`himap_vlm.apps.bench.plot` and :mod:`himap_vlm.apps.bench.report` — the PNG plot and Markdown tables.

The command is ``himap bench`` (:mod:`himap_vlm.apps.cli.bench`).
"""

from __future__ import annotations

from himap_vlm.apps.bench.measure import (
    Measurement,
    cache_nbytes,
    greedy_generate,
    measure_peak_memory,
    measure_run,
)
from himap_vlm.apps.bench.reference_style import (
    ReferenceStyle,
    ReferenceStyleRun,
    reference_generate,
)
from himap_vlm.apps.bench.rows import REFERENCE_SUFFIX, RowSpec, build_rows, expand_all, reference_capable
from himap_vlm.apps.bench.runner import run_benchmark
from himap_vlm.apps.bench.summary import BenchResult, RowSummary, Stat, summarize

__all__ = [
    "REFERENCE_SUFFIX",
    "BenchResult",
    "Measurement",
    "ReferenceStyle",
    "ReferenceStyleRun",
    "RowSpec",
    "RowSummary",
    "Stat",
    "build_rows",
    "cache_nbytes",
    "expand_all",
    "greedy_generate",
    "measure_peak_memory",
    "measure_run",
    "reference_capable",
    "reference_generate",
    "run_benchmark",
    "summarize",
]
