"""``himap generate``: answer a prompt about an image with a pruning method, optionally timed.

Examples
--------
::

    himap generate --model tiny-llava --image cat.png --prompt "What is it?" --method "himap(k1=2,r1=0.5)"
    himap generate --model ./my-llava --image cat.png --prompt "What is it?" --method fastv --method-arg k=3
    himap generate --model tiny-llava --image cat.png --prompt "What is it?" --method vtw --compare

``--method`` is one configuration in the spec syntax of :mod:`himap_vlm.core.methods.spec`; a bare
name takes the method's paper setting scaled to the model's depth. ``--compare`` times the
prefill against dense with the benchmark's routine (:func:`himap_vlm.apps.bench.run_benchmark`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from himap_vlm.apps.cli._app import app
from himap_vlm.apps.cli._common import (
    build_prompt,
    fail,
    load_images,
    load_model,
    method_spec,
    model_config,
    num_layers_of,
    summarize_counts,
)


@app.command("generate")
def generate(
    model: str = typer.Option(
        ..., "--model", help="Model directory, hub id (when online), or a named model: tiny-llava, smol-llava."
    ),
    image: list[Path] = typer.Option([], "--image", help="Image file; repeat for several images."),
    prompt: str = typer.Option(..., "--prompt", help="The question or instruction."),
    method: str = typer.Option(
        "himap",
        "--method",
        help="A registered method, optionally with parameters: NAME or NAME(KEY=VALUE,...), e.g. "
        "'himap(k1=2,r1=0.5)'. Bare names take the paper setting scaled to the model's depth.",
    ),
    method_arg: list[str] = typer.Option(
        [], "--method-arg", help="KEY=VALUE added to --method's parameters (repeatable), e.g. k2=4."
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    compare: bool = typer.Option(
        False, "--compare", help="Also time the prefill against dense (interleaved, paired ratios, FLOPs-ideal)."
    ),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed rounds per setting with --compare."),
    attn_implementation: str | None = typer.Option(None, "--attn-implementation", help="sdpa (default), eager, ..."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: torch's)."),
) -> None:
    """Generate an answer with image tokens pruned inside the language model."""
    import torch
    from rich.console import Console
    from rich.table import Table

    if threads:
        torch.set_num_threads(threads)
    path, config = model_config(model)
    spec = method_spec(method, method_arg, num_layers_of(config))
    if not image:
        fail("give at least one --image (the prompt is about an image)")
    images = load_images(image)
    net, processor = load_model(path, attn_implementation, dtype)
    text = build_prompt(processor, prompt, len(images))
    inputs = processor(images=images, text=text, return_tensors="pt")
    pruner = spec.build()
    try:
        run = pruner(net)
    except ValueError as exc:
        fail(f"--method {spec.label}: {exc}")
    with torch.no_grad(), run:
        out = net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    counts = [c[0] for c in run.image_tokens_per_layer]
    result: dict = {
        "answer": answer,
        "method": spec.name,
        "spec": spec.full_label,
        "config": dict(pruner.config),
        "image_tokens_per_layer": counts,
        "sequence_length": int(inputs["input_ids"].shape[1]),
        "record": _jsonable(getattr(run, "record", {})),
    }
    if compare:
        result.update(compare_prefill(net, dict(inputs), spec, repeats))
    if as_json:
        typer.echo(json.dumps(result))
        return
    console = Console()
    console.print(f"[bold]{answer or '(empty answer)'}[/bold]")
    table = Table(title=f"himap · {spec.label}", show_header=False)
    table.add_row("config", ", ".join(f"{k_}={v}" for k_, v in result["config"].items()) or "-")
    table.add_row("sequence length", str(result["sequence_length"]))
    table.add_row("image tokens per layer", summarize_counts(counts))
    for key, value in result["record"].items():
        table.add_row(key, json.dumps(value))
    if compare:
        table.add_row(
            "prefill dense / pruned (median)",
            f"{result['prefill_ms_dense']:.1f} / {result['prefill_ms_pruned']:.1f} ms "
            f"({result['prefill_speedup']:.2f}x, paired)",
        )
        table.add_row(
            "language model only",
            f"{result['lm_prefill_ms_dense']:.1f} / {result['lm_prefill_ms_pruned']:.1f} ms "
            f"({result['lm_prefill_speedup']:.2f}x, paired)",
        )
        table.add_row(
            "FLOPs ratio (exact) · ideal · measured/ideal",
            f"{result['flops_ratio']:.1%} · {result['ideal_speedup']:.2f}x · "
            + ("-" if result["measured_over_ideal"] is None else f"{result['measured_over_ideal']:.2f}"),
        )
    console.print(table)


def compare_prefill(net: Any, inputs: dict[str, Any], spec: Any, repeats: int, warmup: int = 1) -> dict[str, Any]:
    """Prefill of ``spec`` against dense, timed by the benchmark's routine.

    One sample, ``warmup`` untimed rounds, then ``repeats`` interleaved rounds of dense and the
    method (:func:`himap_vlm.apps.bench.run_benchmark` with one new token, no memory pass):
    synchronised timers, medians, and speedups as medians of paired ratios, next to the
    FLOPs-ideal speedup.

    Returns
    -------
    dict
        ``prefill_ms_*`` (time to first token: the whole first forward), ``lm_prefill_ms_*`` (the
        language model's forward), their paired speedups, ``flops_ratio``, ``ideal_speedup``,
        ``measured_over_ideal``, ``repeats``.
    """
    from himap_vlm.apps.bench import build_rows, run_benchmark

    rows = build_rows([spec], spec.num_layers)
    bench = run_benchmark(net, [inputs], rows, repeats=repeats, warmup=warmup, max_new_tokens=1, memory=False)
    by_row = {s.row: s for s in bench.summary}
    dense, row = by_row[rows[0].name], by_row[rows[-1].name]
    return {
        "prefill_ms_dense": dense.ttft_ms.median,
        "prefill_ms_pruned": row.ttft_ms.median,
        "prefill_speedup": row.ttft_speedup.median,
        "lm_prefill_ms_dense": dense.prefill_ms.median,
        "lm_prefill_ms_pruned": row.prefill_ms.median,
        "lm_prefill_speedup": row.prefill_speedup.median,
        "flops_ratio": row.flops_ratio,
        "ideal_speedup": row.ideal_speedup,
        "measured_over_ideal": row.measured_over_ideal,
        "repeats": repeats,
    }


def _jsonable(value):
    """Method records (tensors, tuples, nested dicts) as plain JSON values."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)
