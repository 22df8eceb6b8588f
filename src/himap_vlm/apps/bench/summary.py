"""Statistics of a benchmark: medians and quartiles per row, paired speedups, the result record.

*Speedups* are medians of **paired** ratios: a row's run divided by the baseline (dense) run of
the same sample in the same round, so slow drifts of the machine cancel; they stand next to the
FLOPs-ideal speedup ``1 / flops_ratio`` (``measured_over_ideal``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from himap_vlm.apps.bench.measure import Measurement
from himap_vlm.apps.bench.rows import RowSpec

__all__ = ["BenchResult", "RowSummary", "Stat", "summarize"]


@dataclass
class Stat:
    """Median and spread of a list of values (``None`` entries ignored)."""

    median: float | None
    p25: float | None
    p75: float | None
    min: float | None
    max: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        """Statistics of ``values`` (quartiles by linear interpolation)."""
        vals = sorted(float(v) for v in values if v is not None and not math.isnan(float(v)))
        if not vals:
            return cls(None, None, None, None, None, 0)
        return cls(
            statistics.median(vals),
            _quantile(vals, 0.25),
            _quantile(vals, 0.75),
            vals[0],
            vals[-1],
            len(vals),
        )

    def scaled(self, factor: float) -> Stat:
        """The same statistics multiplied by ``factor`` (e.g. seconds to milliseconds)."""

        def f(v: float | None) -> float | None:
            return None if v is None else v * factor

        return Stat(f(self.median), f(self.p25), f(self.p75), f(self.min), f(self.max), self.n)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class RowSummary:
    """Summary of one row over all its runs.

    Attributes
    ----------
    prefill_ms, ttft_ms, e2e_ms, decode_tokens_per_s, peak_memory_bytes : Stat
        Over every run (memory: over the memory pass, one run per sample).
    kv_bytes : int
        Median over samples of the cache bytes after the prefill.
    kv_ratio : float
        ``kv_bytes`` over dense's.
    flops_ratio : float
        Exact-convention prefill FLOPs over dense (:func:`himap_vlm.apps.flops.flops_ratio_for_run`),
        averaged over samples, from the image tokens each layer really processed.
    ideal_speedup : float
        ``1 / flops_ratio``: the prefill speedup if time followed FLOPs.
    prefill_speedup, ttft_speedup, e2e_speedup, decode_speedup : Stat
        Paired ratios against dense (dense time / row time; decode: row tokens/s / dense's).
    measured_over_ideal : float or None
        ``prefill_speedup.median / ideal_speedup``.
    """

    row: str
    method: str
    style: str
    args: dict[str, Any]
    runs: int
    prefill_ms: Stat
    ttft_ms: Stat
    decode_tokens_per_s: Stat
    e2e_ms: Stat
    peak_memory_bytes: Stat
    kv_bytes: int
    kv_ratio: float | None
    flops_ratio: float
    ideal_speedup: float
    prefill_speedup: Stat
    ttft_speedup: Stat
    decode_speedup: Stat
    e2e_speedup: Stat
    measured_over_ideal: float | None
    image_tokens_per_layer: list[int]


@dataclass
class BenchResult:
    """Everything one benchmark produced: settings, environment, raw runs and summaries."""

    model: dict[str, Any]
    settings: dict[str, Any]
    environment: dict[str, Any]
    layouts: list[dict[str, int]]
    rows: list[RowSpec]
    measurements: list[Measurement]
    memory: dict[str, list[int]]
    summary: list[RowSummary]
    kv_predicted_bytes: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (raw runs included)."""
        return {
            "model": self.model,
            "settings": self.settings,
            "environment": self.environment,
            "layouts": self.layouts,
            "rows": [asdict(r) for r in self.rows],
            "summary": [asdict(s) for s in self.summary],
            "measurements": [asdict(m) for m in self.measurements],
            "memory_bytes": self.memory,
            "kv_predicted_bytes": self.kv_predicted_bytes,
        }


def summarize(
    rows: Sequence[RowSpec],
    measurements: Sequence[Measurement],
    memory: Mapping[str, Sequence[int]],
    flops_ratios: Mapping[str, float],
    baseline: str = "dense",
) -> list[RowSummary]:
    """Medians, spreads and paired speedups of every row.

    Parameters
    ----------
    rows : sequence of RowSpec
    measurements : sequence of Measurement
        Every timed run.
    memory : mapping
        Per row, the peak-memory bytes of the memory pass.
    flops_ratios : mapping
        Per row, the prefill FLOPs ratio.
    baseline : str
        The row speedups are measured against.

    Returns
    -------
    list of RowSummary
    """
    by_key = {(m.row, m.sample, m.repeat): m for m in measurements}
    base_kv = [m.kv_bytes for m in measurements if m.row == baseline]
    base_kv_median = statistics.median(base_kv) if base_kv else None
    out = []
    for row in rows:
        runs = [m for m in measurements if m.row == row.name]
        pairs = [(m, by_key.get((baseline, m.sample, m.repeat))) for m in runs]
        pairs = [(m, b) for m, b in pairs if b is not None]

        def ratio(attr: str, invert: bool = False, pairs: list = pairs) -> Stat:
            vals = []
            for m, b in pairs:
                a, c = getattr(m, attr), getattr(b, attr)
                if a is None or c is None or a <= 0 or c <= 0:
                    continue
                vals.append(a / c if invert else c / a)
            return Stat.of(vals)

        kv_by_sample: dict[int, int] = {}
        for m in runs:
            kv_by_sample.setdefault(m.sample, m.kv_bytes)
        kv = int(statistics.median(kv_by_sample.values())) if kv_by_sample else 0
        flops_ratio = float(flops_ratios.get(row.name, 1.0))
        ideal = 1.0 / flops_ratio if flops_ratio > 0 else math.inf
        prefill_speedup = ratio("prefill_s")
        out.append(
            RowSummary(
                row=row.name,
                method=row.method,
                style=row.style,
                args=dict(row.args),
                runs=len(runs),
                prefill_ms=Stat.of([m.prefill_s for m in runs]).scaled(1e3),
                ttft_ms=Stat.of([m.ttft_s for m in runs]).scaled(1e3),
                decode_tokens_per_s=Stat.of([m.decode_tokens_per_s for m in runs]),
                e2e_ms=Stat.of([m.e2e_s for m in runs]).scaled(1e3),
                peak_memory_bytes=Stat.of(list(memory.get(row.name, []))),
                kv_bytes=kv,
                kv_ratio=kv / base_kv_median if base_kv_median else None,
                flops_ratio=flops_ratio,
                ideal_speedup=ideal,
                prefill_speedup=prefill_speedup,
                ttft_speedup=ratio("ttft_s"),
                decode_speedup=ratio("decode_tokens_per_s", invert=True),
                e2e_speedup=ratio("e2e_s"),
                measured_over_ideal=(
                    prefill_speedup.median / ideal if prefill_speedup.median is not None and ideal else None
                ),
                image_tokens_per_layer=runs[0].image_tokens_per_layer if runs else [],
            )
        )
    return out
