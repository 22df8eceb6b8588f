"""Markdown renderings of benchmark results (``bench.md`` and ``benchmarks/README.md``).

Everything works on the dict form of ``bench.json`` (``BenchResult.to_dict()``), so a table can
be rebuilt from a saved file: ``markdown_report(json.load(open("bench.json"))["runs"])``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from himap_vlm.apps.bench.plot import as_dicts
from himap_vlm.apps.bench.summary import BenchResult

__all__ = ["markdown_report", "markdown_table"]


def _cell(stat: Mapping[str, Any], digits: int = 1, scale: float = 1.0) -> str:
    if stat["median"] is None:
        return "–"
    half = (stat["p75"] - stat["p25"]) / 2 * scale
    return f"{stat['median'] * scale:.{digits}f} ±{half:.{digits}f}"


def _compact(counts: Sequence[int]) -> str:
    parts, start = [], 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or counts[i] != counts[start]:
            span = f"L{start}" if i - 1 == start else f"L{start}–{i - 1}"
            parts.append(f"{span}: {counts[start]}")
            start = i
    return ", ".join(parts)


def markdown_table(result: BenchResult | Mapping[str, Any]) -> str:
    """One Markdown table: a row per method, medians ±half-IQR, paired speedups vs dense."""
    run = as_dicts([result])[0]
    head = (
        "| row | image tokens per layer | FLOPs ratio | ideal × | LM prefill ms | prefill × | measured/ideal "
        "| TTFT ms | TTFT × | decode tok/s | e2e ms | e2e × | peak mem MiB | KV MiB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in run["summary"]:
        moi = s["measured_over_ideal"]
        lines.append(
            f"| {s['row']} | {_compact(s['image_tokens_per_layer'])} | {s['flops_ratio']:.1%} "
            f"| {s['ideal_speedup']:.2f} | {_cell(s['prefill_ms'])} | {_cell(s['prefill_speedup'], 2)} "
            f"| {'–' if moi is None else f'{moi:.2f}'} | {_cell(s['ttft_ms'])} | {_cell(s['ttft_speedup'], 2)} "
            f"| {_cell(s['decode_tokens_per_s'])} | {_cell(s['e2e_ms'])} | {_cell(s['e2e_speedup'], 2)} "
            f"| {_cell(s['peak_memory_bytes'], 1, 1 / 2**20)} | {s['kv_bytes'] / 2**20:.2f} |"
        )
    return "\n".join(lines)


def markdown_report(results: Sequence[BenchResult | Mapping[str, Any]]) -> str:
    """Every result's settings line and table."""
    out = []
    for r in as_dicts(results):
        m, s, e = r["model"], r["settings"], r["environment"]
        load = e.get("loadavg") or [float("nan")]
        load_end = e.get("loadavg_end") or [float("nan")]
        out.append(
            f"### {m.get('label', m['class'])}\n\n"
            f"{m['num_layers']} layers, d={m['hidden_size']}, FFN {m['intermediate_size']}, "
            f"{m['num_heads']}/{m['num_kv_heads']} heads, {m['dtype']}, {m['attn_implementation']}; "
            f"{s['samples']} samples × {s['repeats']} rounds (+{s['warmup']} warm-up), "
            f"{s['max_new_tokens']} new tokens; {e['device']}, {e['torch_threads']} torch thread(s), "
            f"1-min load average {load[0]:.1f} → {load_end[0]:.1f} on {e.get('cpu_count')} CPUs.\n\n"
            + markdown_table(r)
            + "\n"
        )
    return "\n".join(out)
