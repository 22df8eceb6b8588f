"""The benchmark runner: dense and pruned runs, interleaved in one process, with raw timings kept.

Everything here sits *on top of* the library: the engine is used exactly as a user would use it
(``with method(model) as run``) and measured from the outside with forward hooks and
``time.perf_counter``; nothing in :mod:`himap_vlm.core.engine` knows it is being timed. It is
the one timing routine of the package: ``himap bench``, ``himap generate --compare`` and the
demo's timing phase all call :func:`run_benchmark`.

The definitions of what one run measures are in :mod:`~himap_vlm.apps.bench.measure`; rows
(:class:`~himap_vlm.apps.bench.rows.RowSpec`) in :mod:`~himap_vlm.apps.bench.rows`; statistics in
:mod:`~himap_vlm.apps.bench.summary`.

Interleaving and statistics
---------------------------
After ``warmup`` untimed rounds (every row on the first sample), each of ``repeats`` rounds
runs every sample with every row; the row order rotates from one (round, sample) to the next so
that no row always runs first. Every run is kept (:class:`Measurement`). Summaries give the
median and quartiles over all runs of a row; *speedups* are medians of **paired** ratios: a row's
run divided by the dense run of the same sample in the same round, so slow drifts of the
machine (other processes, thermal state) cancel.
"""

from __future__ import annotations

import gc
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from himap_vlm.apps.bench.measure import Measurement, greedy_generate, measure_peak_memory, measure_run
from himap_vlm.apps.bench.rows import RowSpec
from himap_vlm.apps.bench.summary import BenchResult, summarize
from himap_vlm.apps.flops import Layout, TextDims, flops_ratio_for_run, kv_cache_bytes, layout_from_inputs
from himap_vlm.core import contract

__all__ = ["run_benchmark"]

# Names other modules import from here (``apps/demo.py``: RowSpec, run_benchmark;
# ``tests/test_contract.py``: greedy_generate); their home is the module they come from.
_REEXPORTED = (Measurement, RowSpec, greedy_generate)


def _environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        env["loadavg"] = list(os.getloadavg())
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _model_info(model: nn.Module) -> dict[str, Any]:
    from himap_vlm.core.families import resolve_family

    family = resolve_family(model)
    text = family.text_config(model)
    return {
        "class": type(model).__name__,
        "family": family.name,
        "num_layers": int(text.num_hidden_layers),
        "hidden_size": int(text.hidden_size),
        "intermediate_size": int(text.intermediate_size),
        "num_heads": int(text.num_attention_heads),
        "num_kv_heads": int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attn_implementation": contract.attn_implementation(text),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def run_benchmark(
    model: nn.Module,
    samples: Sequence[Mapping[str, Any]],
    rows: Sequence[RowSpec],
    *,
    repeats: int = 5,
    warmup: int = 1,
    max_new_tokens: int = 8,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
    baseline: str = "dense",
) -> BenchResult:
    """Benchmark ``rows`` on ``samples``: interleaved timed runs, a memory pass, summaries.

    Parameters
    ----------
    model : nn.Module
        A supported model, in eval mode, on its device.
    samples : sequence of mapping
        Processed inputs, one sample each (batch size 1), already on the model's device.
    rows : sequence of RowSpec
        Must contain the ``baseline`` row (dense).
    repeats : int
        Timed rounds (every sample × every row per round).
    warmup : int
        Untimed rounds of every row on the first sample.
    max_new_tokens : int
        Generated tokens per run.
    memory : bool
        Run the peak-memory pass.
    progress : callable, optional
        Called with a short description after each run (for a progress bar).
    baseline : str
        Name of the row speedups are measured against.

    Returns
    -------
    BenchResult

    Raises
    ------
    ValueError
        For no samples, a batch larger than 1, no baseline row, or bad counts.
    """
    from himap_vlm.core.families import resolve_family

    if not samples:
        raise ValueError("the benchmark needs at least one sample")
    if repeats < 1 or warmup < 0 or max_new_tokens < 1:
        raise ValueError("repeats and max_new_tokens must be >= 1 and warmup >= 0")
    names = [r.name for r in rows]
    if baseline not in names:
        raise ValueError(f"the rows must include the baseline {baseline!r}; got {names}")
    for s in samples:
        if s["input_ids"].shape[0] != 1:
            raise ValueError("benchmark samples must each hold one prompt (batch size 1)")
    device = next(model.parameters()).device
    decoder = resolve_family(model).decoder(model)
    env_start = _environment(device)
    tick = progress or (lambda _msg: None)

    for w in range(warmup):
        for row in rows:
            measure_run(model, samples[0], row, max_new_tokens, decoder=decoder)
            tick(f"warm-up {w + 1}/{warmup} · {row.name}")

    measurements: list[Measurement] = []
    n_rows = len(rows)
    for r in range(repeats):
        for i, sample in enumerate(samples):
            shift = (r * len(samples) + i) % n_rows
            for row in list(rows[shift:]) + list(rows[:shift]):
                measurements.append(
                    measure_run(model, sample, row, max_new_tokens, sample=i, repeat=r, decoder=decoder)
                )
                tick(f"round {r + 1}/{repeats} · sample {i + 1}/{len(samples)} · {row.name}")

    mem: dict[str, list[int]] = {row.name: [] for row in rows}
    if memory:
        gc.collect()
        for i, sample in enumerate(samples):
            for row in rows:
                mem[row.name].append(measure_peak_memory(model, sample, row, max_new_tokens))
                tick(f"memory · sample {i + 1}/{len(samples)} · {row.name}")

    token_id = resolve_family(model).image_token_id(model.config)
    layouts: list[Layout] = [
        layout_from_inputs(s["input_ids"], token_id, s.get("attention_mask")) for s in samples
    ]
    flops_ratios: dict[str, float] = {}
    kv_predicted: dict[str, list[int]] = {}
    dims = TextDims.from_config(model.config)
    kv_dtype = next(model.parameters()).dtype
    for row in rows:
        per_sample = {}
        for m in measurements:
            if m.row == row.name and m.sample not in per_sample:
                per_sample[m.sample] = m.image_tokens_per_layer
        ratios = [flops_ratio_for_run(model, samples[i], counts) for i, counts in sorted(per_sample.items())]
        flops_ratios[row.name] = float(sum(ratios) / len(ratios)) if ratios else 1.0
        if row.style == "engine":
            kv_predicted[row.name] = [
                sum(kv_cache_bytes(dims, layouts[i], counts, dtype=kv_dtype))
                for i, counts in sorted(per_sample.items())
            ]
    summary = summarize(rows, measurements, mem, flops_ratios, baseline)
    env = {**env_start, "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    return BenchResult(
        model=_model_info(model),
        settings={
            "repeats": repeats,
            "warmup": warmup,
            "max_new_tokens": max_new_tokens,
            "samples": len(samples),
            "baseline": baseline,
            "memory_pass": memory,
            "image_tokens": layouts[0].image,
        },
        environment=env,
        layouts=[asdict(lay) for lay in layouts],
        rows=list(rows),
        measurements=measurements,
        memory=mem,
        summary=summary,
        kv_predicted_bytes=kv_predicted,
    )
