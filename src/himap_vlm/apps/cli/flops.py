"""``himap flops``: FLOPs and KV-cache size of a pruning configuration, from a model config.

Examples
--------
::

    himap flops --preset llava-1.5-7b --method himap --k1 2 --r1 0.5 --k2 8 --r2 0.75 --convention paper
    himap flops --config path/to/config.json --method fastv --k 2 --r 0.5 --layout 35,576,60 --json
    himap flops --preset llava-1.5-7b --counts run_counts.json --per-layer

The layout defaults to the preset's (LLaVA-1.5: 35 tokens before the image, 576 image tokens,
60 after); for ``--config`` the image-token count comes from the vision tower when the config
has one. Static schedules come from ``himap_vlm.core.methods.get_method(name)(**params)
.image_tokens_schedule(...)`` when that registry knows the method, else from
:func:`himap_vlm.apps.flops.schedule_for`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from himap_vlm.apps.cli._app import app
from himap_vlm.apps.cli._common import fail
from himap_vlm.apps.flops import (
    CONVENTIONS,
    Layout,
    TextDims,
    VisionDims,
    decode_step_flops,
    default_layout,
    kv_cache_bytes,
    list_presets,
    prefill_flops,
    schedule_for,
)


def _parse_counts(text: str) -> Any:
    """``--counts``: a comma list of ints, an inline JSON list, or a JSON file (list or run record)."""
    path = Path(text).expanduser()
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--counts: cannot read {path} as JSON ({exc})") from exc
        if isinstance(data, dict):
            if "image_tokens_per_layer" not in data:
                raise ValueError(f"--counts: {path} is a JSON object without an 'image_tokens_per_layer' key")
            data = data["image_tokens_per_layer"]
        return data
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--counts: invalid JSON list ({exc})") from exc
    try:
        return [int(v) for v in stripped.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(
            f"--counts must be a comma list of ints (one per decoder layer), a JSON list, or a JSON file; got {text!r}"
        ) from exc


def resolve_schedule(
    method: str, num_image: int, num_layers: int, params: dict[str, Any]
) -> tuple[list[int], str]:
    """Per-layer image-token counts of a static method, and where they came from.

    Uses the method classes of :mod:`himap_vlm.core.methods` (the engine's own schedule), and falls back
    to :func:`himap_vlm.apps.flops.schedule_for` only for names the registry does not know (its aliases).

    Raises
    ------
    ValueError
        For an unknown method, bad parameters, or an input-dependent method.
    """
    from himap_vlm.core.methods import get_method

    try:
        cls = get_method(method)
    except ValueError:
        cls = None  # e.g. an alias such as "randomprune" that only schedule_for knows
    if cls is not None:
        try:
            instance = cls(**params)
        except TypeError as exc:
            raise ValueError(
                f"method {method!r} does not accept {', '.join('--' + p for p in params)}: {exc}"
            ) from exc
        instance.validate_for_model(num_layers)
        schedule = instance.image_tokens_schedule(num_image, num_layers)
        if schedule is None:
            raise ValueError(
                f"method {method!r} keeps an input-dependent number of image tokens; run it and pass the measured "
                "run.image_tokens_per_layer with --counts"
            )
        return [int(v) for v in schedule], "himap_vlm.core.methods"
    return schedule_for(method, num_image, num_layers, **params), "himap_vlm.apps.flops.schedule_for"


def _compact(counts: list[float]) -> str:
    """Run-length form of a count list: ``576x2, 288x6, 72x24``."""
    runs: list[list[Any]] = []
    for value in counts:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return ", ".join(f"{v:g}x{n}" for v, n in runs)


def _compute(
    *,
    config: Path | None,
    preset: str | None,
    method: str,
    params: dict[str, Any],
    counts: str | None,
    layout: str | None,
    convention: str,
    vision: bool,
    all_logits: bool,
    full_attention: bool,
    batch_reduce: str,
    dtype: str,
    new_tokens: int,
) -> dict[str, Any]:
    if (config is None) == (preset is None):
        raise ValueError(
            f"pass exactly one of --config PATH or --preset NAME (presets: {', '.join(list_presets())})"
        )
    source: Any = str(config) if config is not None else preset
    dims = TextDims.from_config(source)
    lay = Layout.parse(layout) if layout else default_layout(source)
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown --convention {convention!r}; use one of: {', '.join(CONVENTIONS)}")
    vision_dims = VisionDims.from_config(source) if vision else None
    if vision and convention != "exact":
        raise ValueError("--vision applies only to --convention exact")
    if new_tokens < 0:
        raise ValueError(f"--new-tokens must be >= 0; got {new_tokens}")

    if counts is not None:
        if params:
            raise ValueError(
                "--counts replaces the method's schedule; drop the method options (--k, --r, ...)"
            )
        schedule: Any = _parse_counts(counts)
        schedule_source = "measured (--counts)"
        method_name = method if method != "dense" else "measured"
    else:
        schedule, schedule_source = resolve_schedule(method, lay.image, dims.num_layers, params)
        method_name = method

    report = prefill_flops(
        dims,
        lay,
        schedule,
        convention,  # type: ignore[arg-type]
        causal=not full_attention,
        logits="all" if all_logits else "last",
        vision=vision_dims,
        batch_reduce=batch_reduce,  # type: ignore[arg-type]
    )
    kv = kv_cache_bytes(dims, lay, schedule, dtype)
    kv_dense = kv_cache_bytes(dims, lay, None, dtype, batch=_batch_size(schedule))
    out: dict[str, Any] = {
        "model": str(source),
        "num_layers": dims.num_layers,
        "method": method_name,
        "method_params": params,
        "schedule_source": schedule_source,
        "layout": {"before": lay.before, "image": lay.image, "after": lay.after},
        **report.to_dict(),
        "kv_cache_dtype": dtype,
        "kv_cache_bytes": sum(kv),
        "kv_cache_bytes_dense": sum(kv_dense),
        "kv_cache_bytes_per_layer": kv,
        "kv_cache_bytes_per_layer_dense": kv_dense,
    }
    if new_tokens > 0:
        # The first new token comes from the prefill logits; each later one costs a decode step.
        steps = [
            decode_step_flops(dims, lay, schedule, convention, generated=g, batch_reduce=batch_reduce)  # type: ignore[arg-type]
            for g in range(new_tokens - 1)
        ]
        decode = sum(s.total for s in steps)
        decode_dense = sum(s.dense_total for s in steps)
        out["decode"] = {
            "new_tokens": new_tokens,
            "steps": len(steps),
            "flops": decode,
            "flops_dense": decode_dense,
            "tflops_total": (report.total + decode) / 1e12,
            "tflops_total_dense": (report.dense_total + decode_dense) / 1e12,
            "ratio_total": (report.total + decode) / (report.dense_total + decode_dense),
            "kv_cache_bytes_end": sum(kv_cache_bytes(dims, lay, schedule, dtype, generated=new_tokens - 1)),
        }
    return out


def _batch_size(schedule: Any) -> int:
    if isinstance(schedule, list) and schedule and isinstance(schedule[0], list):
        return len(schedule[0])
    return 1


def _print_rich(result: dict[str, Any], per_layer: bool) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    mib = 2**20
    lay = result["layout"]
    table = Table(
        title=escape(f"himap flops: {result['model']} ({result['convention']} convention, prefill)"),
        show_header=False,
    )
    table.add_column("quantity", style="bold")
    table.add_column("value")
    params = ", ".join(f"{k}={v}" for k, v in result["method_params"].items())
    table.add_row("method", escape(f"{result['method']}({params})  [{result['schedule_source']}]"))
    table.add_row("layout", f"{lay['before']} before + {lay['image']} image + {lay['after']} after")
    table.add_row("image tokens per layer", _compact(result["image_tokens_per_layer"]))
    table.add_row("TFLOPs (dense)", f"{result['tflops_dense']:.4f}")
    table.add_row("TFLOPs (method)", f"{result['tflops']:.4f}")
    table.add_row("ratio", f"{100 * result['ratio']:.2f} %  (reduction {100 * (1 - result['ratio']):.2f} %)")
    if result["other_flops"]:
        table.add_row(
            "outside decoder layers",
            ", ".join(f"{k} {v / 1e9:.2f} GFLOPs" for k, v in result["other_flops"].items()),
        )
    table.add_row(
        f"KV cache ({result['kv_cache_dtype']})",
        f"{result['kv_cache_bytes'] / mib:.2f} MiB (dense {result['kv_cache_bytes_dense'] / mib:.2f} MiB)",
    )
    if "decode" in result:
        dec = result["decode"]
        table.add_row(
            f"prefill + {dec['steps']} decode steps",
            f"{dec['tflops_total']:.4f} TFLOPs (dense {dec['tflops_total_dense']:.4f}; ratio {100 * dec['ratio_total']:.2f} %)",
        )
    console.print(table)
    if per_layer:
        layers = Table(title="per decoder layer")
        for col in ("layer", "image tokens", "GFLOPs", "GFLOPs dense", "KV MiB", "KV MiB dense"):
            layers.add_column(col, justify="right")
        for i in range(result["num_layers"]):
            layers.add_row(
                str(i),
                f"{result['image_tokens_per_layer'][i]:g}",
                f"{result['per_layer_flops'][i] / 1e9:.3f}",
                f"{result['per_layer_flops_dense'][i] / 1e9:.3f}",
                f"{result['kv_cache_bytes_per_layer'][i] / mib:.3f}",
                f"{result['kv_cache_bytes_per_layer_dense'][i] / mib:.3f}",
            )
        console.print(layers)


@app.command("flops")
def flops(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="Hugging Face config.json (or model directory) of the model."),
    ] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="Built-in model dimensions: llava-1.5-7b or llava-1.5-13b.")
    ] = None,
    method: Annotated[
        str, typer.Option("--method", "-m", help="dense, himap, fastv, random or vtw (static schedules).")
    ] = "dense",
    k: Annotated[int | None, typer.Option("--k", help="Pruning layer K (fastv, random, vtw).")] = None,
    r: Annotated[
        float | None, typer.Option("--r", help="Fraction of image tokens pruned (fastv, random).")
    ] = None,
    k1: Annotated[int | None, typer.Option("--k1", help="HiMAP shallow pruning layer.")] = None,
    r1: Annotated[float | None, typer.Option("--r1", help="HiMAP fraction pruned at k1.")] = None,
    k2: Annotated[int | None, typer.Option("--k2", help="HiMAP deep pruning layer.")] = None,
    r2: Annotated[
        float | None, typer.Option("--r2", help="HiMAP fraction of the remaining tokens pruned at k2.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed (random; does not change the counts).")
    ] = None,
    counts: Annotated[
        str | None,
        typer.Option(
            "--counts",
            help="Measured image tokens per layer instead of a method schedule: comma list, JSON list "
            "(layers x batch allowed) or JSON file (list, or object with image_tokens_per_layer).",
        ),
    ] = None,
    layout: Annotated[
        str | None,
        typer.Option("--layout", help="Tokens 'before,image,after' (default 35,576,60 for LLaVA-1.5)."),
    ] = None,
    convention: Annotated[
        str,
        typer.Option("--convention", help="exact (every token, real shapes) or paper (image tokens only)."),
    ] = "exact",
    vision: Annotated[
        bool, typer.Option("--vision/--no-vision", help="Add vision tower + projector (exact).")
    ] = False,
    all_logits: Annotated[
        bool, typer.Option("--all-logits", help="LM head on every position (default: last position only).")
    ] = False,
    full_attention: Annotated[
        bool,
        typer.Option(
            "--full-attention", help="Count the full attention square instead of the causal triangle."
        ),
    ] = False,
    batch_reduce: Annotated[
        str, typer.Option("--batch-reduce", help="Batched --counts: mean, sum or first sample.")
    ] = "mean",
    dtype: Annotated[str, typer.Option("--dtype", help="KV-cache element type.")] = "float16",
    new_tokens: Annotated[
        int, typer.Option("--new-tokens", help="Also count decode steps for this many generated tokens.")
    ] = 0,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Print the per-layer table.")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of tables.")
    ] = False,
) -> None:
    """FLOPs (prefill, optionally decode) and KV-cache bytes of a pruning configuration."""
    params = {
        name: value
        for name, value in dict(k=k, r=r, k1=k1, r1=r1, k2=k2, r2=r2, seed=seed).items()
        if value is not None
    }
    try:
        result = _compute(
            config=config,
            preset=preset,
            method=method,
            params=params,
            counts=counts,
            layout=layout,
            convention=convention,
            vision=vision,
            all_logits=all_logits,
            full_attention=full_attention,
            batch_reduce=batch_reduce,
            dtype=dtype,
            new_tokens=new_tokens,
        )
    except ValueError as exc:
        fail(str(exc))
        return
    if json_output:
        typer.echo(json.dumps(result))
    else:
        _print_rich(result, per_layer)
