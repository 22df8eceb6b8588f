"""``himap bench``: dense vs pruning methods (and the authors' approach), measured, not claimed.

Examples
--------
::

    himap bench --tiny --out /tmp/bench                                    # every registered method
    himap bench --model tiny-llava --methods "dense,himap,fastv(r=0.75)" --out /tmp/bench
    himap bench --tiny --methods all --reference all --out /tmp/bench      # + every reference-style row

``--methods`` and ``--reference`` are method lists in the spec syntax of
:mod:`himap_vlm.core.methods.spec` (``all``: every registered method); bare names take the
method's paper setting scaled to the model's depth.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import typer

from himap_vlm.apps.bench.rows import ALL
from himap_vlm.apps.cli._app import app
from himap_vlm.apps.cli._common import fail, load_model, model_config, num_layers_of, spec_error
from himap_vlm.apps.prompting import build_prompt

_DTYPES = {"float32", "bfloat16", "float16"}


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@app.command("bench")
def bench(
    out: Path = typer.Option(..., "--out", help="Directory for bench.json (all raw timings) and bench.png."),
    model: str | None = typer.Option(
        None, "--model", help="Model directory, hub id (when online), or a named model: tiny-llava, smol-llava."
    ),
    tiny: bool = typer.Option(
        False, "--tiny", help="Build a random LLaVA in memory (on --device) instead of --model."
    ),
    data: Path | None = typer.Option(
        None, "--data", help="JSONL of {image, question} records (himap_vlm.apps.data format)."
    ),
    n: int = typer.Option(3, "--n", min=1, help="Synthetic scene-QA samples when no --data is given."),
    methods: str = typer.Option(
        ALL,
        "--methods",
        help="Method list, e.g. 'dense,himap,fastv(r=0.75),himap(k2=4)', or 'all' (every registered method). "
        "Bare names take the paper setting scaled to the model's depth; dense is always run.",
    ),
    reference: str | None = typer.Option(
        None,
        "--reference",
        help="Configurations that also get a reference-style row: method names (every listed configuration "
        "of the method), listed configurations, 'all' (every static one) or 'none' (default: himap when run).",
    ),
    sweep: str | None = typer.Option(
        None, "--sweep", help="Image-token counts to sweep, e.g. 144,576,2304 (with --tiny: one model each)."
    ),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed rounds (every sample x every row)."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed rounds before timing."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Run the peak-memory pass."),
    layers: int = typer.Option(8, "--layers", min=2, help="--tiny: decoder layers."),
    hidden: int = typer.Option(256, "--hidden", min=16, help="--tiny: hidden size."),
    heads: int = typer.Option(4, "--heads", min=1, help="--tiny: attention heads."),
    kv_heads: int = typer.Option(4, "--kv-heads", min=1, help="--tiny: key/value heads."),
    intermediate: int | None = typer.Option(
        None, "--intermediate", help="--tiny: FFN size (default 2 x hidden)."
    ),
    image_tokens: int = typer.Option(576, "--image-tokens", min=1, help="--tiny: image tokens (a square)."),
    patch_size: int = typer.Option(4, "--patch-size", min=1, help="--tiny: vision patch size."),
    seed: int = typer.Option(0, "--seed", help="--tiny: weight seed."),
    attn_implementation: str | None = typer.Option(
        None, "--attn-implementation", help="sdpa (default), eager, flash_attention_2, ..."
    ),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch CPU threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the summaries as JSON instead of tables."),
) -> None:
    """Benchmark dense, pruning methods and the reference-style approach, interleaved, after warm-up.

    Reports medians and spread of prefill latency, time to first token, decode tokens/s,
    end-to-end latency, peak memory and KV-cache bytes, next to the exact FLOPs ratio and the
    FLOPs-ideal speedup (measured / ideal as a column). Writes OUT/bench.json with every raw
    timing, OUT/bench.md and OUT/bench.png.

    Methods come from the registry: --methods all (the default) runs every registered method,
    each with its paper setting scaled to the model's depth L (the method's defaults_for(L));
    give parameters in the spec syntax, e.g. --methods "dense,himap(k2=4),fastv(r=0.75)".
    """
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from himap_vlm.apps.bench.plot import plot_speedup
    from himap_vlm.apps.bench.report import markdown_report
    from himap_vlm.apps.bench.rows import build_rows
    from himap_vlm.apps.bench.runner import run_benchmark
    from himap_vlm.core.methods.spec import MethodSpecError

    if (model is None) == (not tiny):
        fail("give either --model PATH (or a named model such as tiny-llava) or --tiny (a random model built in memory)")
    if dtype not in _DTYPES:
        fail(f"--dtype must be one of {', '.join(sorted(_DTYPES))}; got {dtype!r}")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was given but CUDA is not available; leave --device out or pass --device cpu")
    sweep_points: list[int | None] = [None]
    if sweep:
        try:
            sweep_points = [int(v) for v in _split(sweep)]
        except ValueError:
            fail(f"--sweep expects comma-separated integers such as 144,576,2304; got {sweep!r}")
        if not tiny:
            fail("--sweep builds one tiny model per image-token count: use it with --tiny")
    for value in [v for v in sweep_points if v is not None] + ([image_tokens] if tiny else []):
        side = math.isqrt(value)
        if side * side != value:
            fail(f"image-token counts must be squares (a side x side patch grid); got {value}")
    if tiny and (hidden % heads or heads % kv_heads):
        fail("--hidden must be divisible by --heads, and --heads by --kv-heads")

    path = None
    if tiny:
        num_layers = layers
    else:
        path, config = model_config(model)
        num_layers = num_layers_of(config)
    try:
        rows = build_rows(methods, num_layers)
    except MethodSpecError as exc:
        spec_error(exc, "--methods", methods)
    if reference is None:  # HiMAP (the package's subject) when it is run
        reference = "himap" if any(r.method == "himap" for r in rows) else "none"
    try:
        rows = build_rows(methods, num_layers, reference)
    except MethodSpecError as exc:
        spec_error(exc, "--reference", reference)

    records = _load_records(data, n)
    console = Console(stderr=True)
    results = []
    for point in sweep_points:
        net, processor, label = _model(
            path,
            tiny,
            point or image_tokens,
            layers,
            hidden,
            heads,
            kv_heads,
            intermediate,
            patch_size,
            seed,
            attn_implementation,
            dtype,
            dev,
        )
        net.to(dev)
        samples = [_process(processor, rec, net, dev) for rec in records]
        total = (
            warmup * len(rows)
            + repeats * len(samples) * len(rows)
            + (len(samples) * len(rows) if memory else 0)
        )
        with Progress(
            TextColumn("[bold]{task.fields[head]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("", total=total, head=f"bench · {label}")
            result = run_benchmark(
                net,
                samples,
                rows,
                repeats=repeats,
                warmup=warmup,
                max_new_tokens=max_new_tokens,
                memory=memory,
                progress=lambda msg, bar=bar, task=task: bar.update(task, advance=1, description=msg),
            )
        result.model["label"] = label
        results.append(result)
        if not as_json:
            _print_table(Console(width=None if sys.stdout.isatty() else 200), result)
        del net

    out.mkdir(parents=True, exist_ok=True)
    payload = {"command": ["himap", *sys.argv[1:]], "runs": [r.to_dict() for r in results]}
    (out / "bench.json").write_text(json.dumps(payload, indent=1))
    png = plot_speedup(results, out / "bench.png")
    (out / "bench.md").write_text(markdown_report(results))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "runs": [
                        {"model": r.model, "settings": r.settings, "summary": r.to_dict()["summary"]}
                        for r in results
                    ]
                }
            )
        )
    else:
        console.print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and {png}")


def _load_records(data: Path | None, n: int) -> list[dict[str, Any]]:
    if data is not None:
        from himap_vlm.apps.data.synthetic import read_jsonl

        try:
            records = read_jsonl(data)
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc))
        if not records:
            fail(f"{data} holds no records")
        return records
    from himap_vlm.apps.data.synthetic import load_synthetic

    return load_synthetic("test", n)


def _model(
    path: str | None,
    tiny: bool,
    n_tokens: int,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int | None,
    patch: int,
    seed: int,
    attn: str | None,
    dtype: str,
    device: Any,
):
    if not tiny:
        net, processor = load_model(path, attn, dtype)
        return net, processor, str(path)
    import torch

    from himap_vlm.apps.bench.models import build_random_llava
    from himap_vlm.models.tiny import TinyLlavaSpec

    side = math.isqrt(n_tokens)
    spec = TinyLlavaSpec(
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        image_size=side * patch,
        patch_size=patch,
        seed=seed,
        attn_implementation=attn or "sdpa",
    )
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        net, processor = build_random_llava(spec, device, torch_dtype)
    except (ImportError, ValueError) as exc:  # e.g. flash_attention_2 without flash-attn
        fail(f"cannot build the --tiny model: {exc}")
    label = f"tiny llama L={layers} d={hidden} H={heads}/{kv_heads} · {n_tokens} image tokens"
    return net, processor, label


def _process(processor: Any, record: dict[str, Any], net: Any, device: Any) -> dict[str, Any]:
    text = build_prompt(processor, str(record["question"]), 1)
    inputs = processor(images=[record["image"]], text=text, return_tensors="pt")
    dtype = next(net.parameters()).dtype
    out = {}
    for key, value in inputs.items():
        if hasattr(value, "to"):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


def _fmt_stat(stat: Any, digits: int = 1) -> str:
    if stat.median is None:
        return "-"
    half_iqr = (stat.p75 - stat.p25) / 2
    return f"{stat.median:.{digits}f} ±{half_iqr:.{digits}f}"


def _print_table(console: Any, result: Any) -> None:
    from rich.table import Table

    s0 = result.settings
    env = result.environment
    table = Table(
        title=(
            f"himap bench · {result.model.get('label', result.model['class'])} · {env['device']} "
            f"({env['torch_threads']} threads) · {s0['samples']} samples x {s0['repeats']} rounds · "
            f"{s0['max_new_tokens']} new tokens"
        ),
        caption="median ±half-IQR; speedups are medians of paired ratios vs dense (same sample, same round)",
    )
    for col in (
        "row",
        "FLOPs ratio",
        "ideal x",
        "LM prefill ms",
        "prefill x",
        "measured/ideal",
        "TTFT ms",
        "decode tok/s",
        "e2e ms",
        "e2e x",
        "peak mem MiB",
        "KV MiB",
    ):
        table.add_column(col, justify="left" if col == "row" else "right")
    for s in result.summary:
        mem = s.peak_memory_bytes.scaled(1 / 2**20)
        table.add_row(
            s.row,
            f"{s.flops_ratio:.1%}",
            f"{s.ideal_speedup:.2f}",
            _fmt_stat(s.prefill_ms),
            _fmt_stat(s.prefill_speedup, 2),
            "-" if s.measured_over_ideal is None else f"{s.measured_over_ideal:.2f}",
            _fmt_stat(s.ttft_ms),
            _fmt_stat(s.decode_tokens_per_s),
            _fmt_stat(s.e2e_ms),
            _fmt_stat(s.e2e_speedup, 2),
            _fmt_stat(mem),
            f"{s.kv_bytes / 2**20:.2f}",
        )
    console.print(table)
