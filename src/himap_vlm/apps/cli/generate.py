"""``himap generate``: answer a prompt about an image with a pruning method, optionally timed."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from himap_vlm.apps.cli._app import app
from himap_vlm.apps.cli._common import (
    build_method,
    build_prompt,
    fail,
    load_images,
    load_model,
    parse_method_args,
    summarize_counts,
)


@app.command("generate")
def generate(
    model: str = typer.Option(..., "--model", help="Local model directory (or hub id when online)."),
    image: list[Path] = typer.Option([], "--image", help="Image file; repeat for several images."),
    prompt: str = typer.Option(..., "--prompt", help="The question or instruction."),
    method: str = typer.Option("himap", "--method", help="dense, himap, fastv, random (and any registered method)."),
    k: int | None = typer.Option(None, "--k", help="Pruning layer (fastv, random, vtw)."),
    r: float | None = typer.Option(None, "--r", help="Fraction of image tokens pruned (fastv, random)."),
    k1: int | None = typer.Option(None, "--k1", help="HiMAP shallow filtering layer."),
    r1: float | None = typer.Option(None, "--r1", help="HiMAP fraction pruned at k1."),
    k2: int | None = typer.Option(None, "--k2", help="HiMAP deep filtering layer."),
    r2: float | None = typer.Option(None, "--r2", help="HiMAP fraction of the remaining tokens pruned at k2."),
    seed: int | None = typer.Option(None, "--seed", help="Seed (random control)."),
    criterion: str | None = typer.Option(None, "--criterion", help="FastV: last_token or mean_received."),
    method_arg: list[str] = typer.Option([], "--method-arg", help="Other method parameter, KEY=VALUE (repeatable)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    compare: bool = typer.Option(False, "--compare", help="Also time the prefill dense vs pruned (medians)."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed prefills per setting with --compare."),
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
    options = dict(k=k, r=r, k1=k1, r1=r1, k2=k2, r2=r2, seed=seed, criterion=criterion)
    extra = parse_method_args(method_arg)
    options.update(extra)
    pruner = build_method(method, options, frozenset(k_ for k_, v in extra.items() if v is None))
    if not image:
        fail("give at least one --image (the prompt is about an image)")
    images = load_images(image)
    net, processor = load_model(model, attn_implementation, dtype)
    text = build_prompt(processor, prompt, len(images))
    inputs = processor(images=images, text=text, return_tensors="pt")
    try:
        run = pruner(net)
    except ValueError as exc:
        fail(str(exc))
    with torch.no_grad(), run:
        out = net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    counts = [c[0] for c in run.image_tokens_per_layer]
    result: dict = {
        "answer": answer,
        "method": method,
        "config": dict(pruner.config),
        "image_tokens_per_layer": counts,
        "sequence_length": int(inputs["input_ids"].shape[1]),
        "record": _jsonable(getattr(run, "record", {})),
    }
    if compare:
        timing = prefill_timings(net, inputs, pruner, repeats)
        result.update(timing)
        try:
            from himap_vlm.apps.flops import flops_ratio_for_run

            result["flops_ratio"] = flops_ratio_for_run(net, inputs, counts)
        except Exception:  # pragma: no cover - flops module optional at this point
            pass
    if as_json:
        typer.echo(json.dumps(result))
        return
    console = Console()
    console.print(f"[bold]{answer or '(empty answer)'}[/bold]")
    table = Table(title=f"himap · {method}", show_header=False)
    table.add_row("config", ", ".join(f"{k_}={v}" for k_, v in result["config"].items()) or "-")
    table.add_row("sequence length", str(result["sequence_length"]))
    table.add_row("image tokens per layer", summarize_counts(counts))
    for key, value in result["record"].items():
        table.add_row(key, json.dumps(value))
    if compare:
        table.add_row(
            "prefill dense / pruned (median)",
            f"{result['prefill_ms_dense']:.1f} / {result['prefill_ms_pruned']:.1f} ms "
            f"({result['prefill_speedup']:.2f}x)",
        )
        table.add_row(
            "language model only",
            f"{result['lm_prefill_ms_dense']:.1f} / {result['lm_prefill_ms_pruned']:.1f} ms "
            f"({result['lm_prefill_speedup']:.2f}x)",
        )
        if "flops_ratio" in result:
            table.add_row("FLOPs ratio (exact)", f"{result['flops_ratio']:.1%}")
    console.print(table)


def prefill_timings(net, inputs, pruner, repeats: int) -> dict:
    """Median prefill times (whole model and language model alone), dense vs ``pruner``.

    Dense and pruned runs alternate in the same process after one warm-up each, so drift and
    caches affect both alike; CUDA is synchronised around every timed call.
    """
    import statistics
    import time

    import torch

    from himap_vlm.core.families import resolve_family
    from himap_vlm.core.methods import Dense

    decoder = resolve_family(net).decoder(net)
    lm_time: list[float] = []

    def pre(*_):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        lm_time.append(-time.perf_counter())

    def post(*_):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        lm_time[-1] += time.perf_counter()

    def once(method) -> tuple[float, float]:
        with torch.no_grad(), method(net):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            net(**inputs, use_cache=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter() - t0, lm_time[-1]

    handles = [decoder.register_forward_pre_hook(pre), decoder.register_forward_hook(post)]
    try:
        once(Dense())
        once(pruner)
        samples = {"dense": [], "pruned": []}
        for _ in range(repeats):
            samples["dense"].append(once(Dense()))
            samples["pruned"].append(once(pruner))
    finally:
        for h in handles:
            h.remove()
    med = {k: (statistics.median(t for t, _ in v), statistics.median(lm for _, lm in v)) for k, v in samples.items()}
    return {
        "prefill_ms_dense": med["dense"][0] * 1e3,
        "prefill_ms_pruned": med["pruned"][0] * 1e3,
        "prefill_speedup": med["dense"][0] / med["pruned"][0],
        "lm_prefill_ms_dense": med["dense"][1] * 1e3,
        "lm_prefill_ms_pruned": med["pruned"][1] * 1e3,
        "lm_prefill_speedup": med["dense"][1] / med["pruned"][1],
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
