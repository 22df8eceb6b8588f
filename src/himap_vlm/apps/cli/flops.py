"""``himap flops``: FLOPs and KV-cache size of a pruning configuration, from a model config.

Examples
--------
::

    himap flops --preset llava-1.5-7b --method "himap(k1=2,r1=0.5,k2=8,r2=0.75)" --convention paper
    himap flops --config path/to/config.json --method fastv --method-arg k=3 --layout 35,576,60 --json
    himap flops --config tiny-llava --method vtw
    himap flops --preset llava-1.5-7b --methods all --convention paper
    himap flops --preset llava-1.5-7b --counts run_counts.json --per-layer

The layout defaults to the preset's (LLaVA-1.5: 35 tokens before the image, 576 image tokens,
60 after); for ``--config`` the image-token count comes from the vision tower when the config
has one. ``--method`` is one configuration and ``--methods`` a list (``all``: every registered
method), in the spec syntax of :mod:`himap_vlm.core.methods.spec`; a bare name takes the
method's paper setting scaled to the model's depth. Every schedule comes from the method
itself (:meth:`~himap_vlm.core.methods.base.PruningMethod.image_tokens_schedule`); methods
whose counts depend on the input (VisiPruner) need measured counts (``--counts``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from himap_vlm.apps.cli._app import app
from himap_vlm.apps.cli._common import fail, method_list, method_spec
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
)

_MIB = 2**20


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


def resolve_schedule(spec: Any, num_image: int, num_layers: int) -> list[int] | None:
    """Image tokens per decoder layer of a parsed configuration, read from the method itself.

    ``None`` for a method whose counts depend on the input (run it and pass the measured counts).
    """
    schedule = spec.build().image_tokens_schedule(num_image, num_layers)
    return None if schedule is None else [int(v) for v in schedule]


def _dynamic_message(label: str) -> str:
    return (
        f"method {label!r} keeps an input-dependent number of image tokens; run it and pass the measured "
        "run.image_tokens_per_layer with --counts"
    )


def _compact(counts: list[float]) -> str:
    """Run-length form of a count list: ``576x2, 288x6, 72x24``."""
    runs: list[list[Any]] = []
    for value in counts:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return ", ".join(f"{v:g}x{n}" for v, n in runs)


def _source(config: Path | None, preset: str | None) -> str:
    if (config is None) == (preset is None):
        raise ValueError(
            f"pass exactly one of --config PATH (or a named model) or --preset NAME (presets: {', '.join(list_presets())})"
        )
    if preset is not None:
        return preset
    from himap_vlm.models import resolve_model

    try:
        return resolve_model(str(config))
    except FileNotFoundError as exc:
        raise ValueError(f"--config {config}: {exc}") from exc


def _flops(dims: TextDims, lay: Layout, schedule: Any, opts: dict[str, Any]) -> dict[str, Any]:
    """FLOPs, KV bytes and (optionally) decode steps of one schedule."""
    convention, dtype, batch_reduce, new_tokens = (
        opts["convention"], opts["dtype"], opts["batch_reduce"], opts["new_tokens"]
    )
    report = prefill_flops(
        dims,
        lay,
        schedule,
        convention,
        causal=not opts["full_attention"],
        logits="all" if opts["all_logits"] else "last",
        vision=opts["vision"],
        batch_reduce=batch_reduce,
    )
    kv = kv_cache_bytes(dims, lay, schedule, dtype)
    kv_dense = kv_cache_bytes(dims, lay, None, dtype, batch=_batch_size(schedule))
    out: dict[str, Any] = {
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
            decode_step_flops(dims, lay, schedule, convention, generated=g, batch_reduce=batch_reduce)
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


def _compute(
    *,
    config: Path | None,
    preset: str | None,
    method: str,
    method_args: list[str],
    methods: str | None,
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
    source = _source(config, preset)
    dims = TextDims.from_config(source)
    lay = Layout.parse(layout) if layout else default_layout(source)
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown --convention {convention!r}; use one of: {', '.join(CONVENTIONS)}")
    if vision and convention != "exact":
        raise ValueError("--vision applies only to --convention exact")
    if new_tokens < 0:
        raise ValueError(f"--new-tokens must be >= 0; got {new_tokens}")
    opts = dict(
        convention=convention,
        dtype=dtype,
        batch_reduce=batch_reduce,
        new_tokens=new_tokens,
        full_attention=full_attention,
        all_logits=all_logits,
        vision=VisionDims.from_config(source) if vision else None,
    )
    head: dict[str, Any] = {
        "model": str(source),
        "num_layers": dims.num_layers,
        "layout": {"before": lay.before, "image": lay.image, "after": lay.after},
    }
    if methods is not None:
        if counts is not None or method_args or method != "dense":
            raise ValueError("--methods compares method schedules: drop --method, --method-arg and --counts")
        rows = []
        for spec in method_list(methods, dims.num_layers):
            row: dict[str, Any] = {"method": spec.name, "label": spec.label, "spec": spec.full_label}
            schedule = resolve_schedule(spec, lay.image, dims.num_layers)
            if schedule is None:
                row.update(schedule_source=None, note=_dynamic_message(spec.label))
            else:
                row.update(schedule_source=f"{spec.name}.image_tokens_schedule", **_flops(dims, lay, schedule, opts))
            rows.append(row)
        return {**head, "convention": convention, "methods": rows}
    if counts is not None:
        if method_args or "(" in method:
            raise ValueError("--counts replaces the method's schedule: drop the method's parameters (and --method-arg)")
        name = method_spec(method).name
        schedule: Any = _parse_counts(counts)
        out = {"method": "measured" if name == "dense" else name, "spec": None, "method_params": {}}
        out["schedule_source"] = "measured (--counts)"
    else:
        spec = method_spec(method, method_args, dims.num_layers)
        schedule = resolve_schedule(spec, lay.image, dims.num_layers)
        if schedule is None:
            raise ValueError(_dynamic_message(spec.label))
        out = {"method": spec.name, "spec": spec.full_label, "method_params": dict(spec.config)}
        out["schedule_source"] = f"{spec.name}.image_tokens_schedule"
    return {**head, **out, **_flops(dims, lay, schedule, opts)}


def _batch_size(schedule: Any) -> int:
    if isinstance(schedule, list) and schedule and isinstance(schedule[0], list):
        return len(schedule[0])
    return 1


def _print_rich(result: dict[str, Any], per_layer: bool) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    lay = result["layout"]
    table = Table(
        title=escape(f"himap flops: {result['model']} ({result['convention']} convention, prefill)"),
        show_header=False,
    )
    table.add_column("quantity", style="bold")
    table.add_column("value")
    table.add_row("method", escape(f"{result['spec'] or result['method']}  [{result['schedule_source']}]"))
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
        f"{result['kv_cache_bytes'] / _MIB:.2f} MiB (dense {result['kv_cache_bytes_dense'] / _MIB:.2f} MiB)",
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
                f"{result['kv_cache_bytes_per_layer'][i] / _MIB:.3f}",
                f"{result['kv_cache_bytes_per_layer_dense'][i] / _MIB:.3f}",
            )
        console.print(layers)


def _print_methods(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    lay = result["layout"]
    table = Table(
        title=escape(
            f"himap flops: {result['model']} ({result['convention']} convention, prefill; layout "
            f"{lay['before']}+{lay['image']}+{lay['after']})"
        )
    )
    table.add_column("method", overflow="fold")
    table.add_column("image tokens per layer", overflow="fold")
    for col in ("TFLOPs", "ratio", "KV MiB"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in result["methods"]:
        if row["schedule_source"] is None:
            table.add_row(escape(row["spec"]), "input-dependent: measure it and pass --counts", "-", "-", "-")
            continue
        table.add_row(
            escape(row["spec"]),
            _compact(row["image_tokens_per_layer"]),
            f"{row['tflops']:.4f}",
            f"{100 * row['ratio']:.1f} %",
            f"{row['kv_cache_bytes'] / _MIB:.2f}",
        )
    Console().print(table)


@app.command("flops")
def flops(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Hugging Face config.json or model directory, or a named model (tiny-llava, smol-llava)."
        ),
    ] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="Built-in model dimensions: llava-1.5-7b or llava-1.5-13b.")
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            help="One configuration: NAME or NAME(KEY=VALUE,...), e.g. 'fastv(k=3)'. Bare names take the paper "
            "setting scaled to the model's depth.",
        ),
    ] = "dense",
    method_arg: Annotated[
        list[str] | None,
        typer.Option("--method-arg", help="KEY=VALUE added to --method's parameters (repeatable), e.g. k2=4."),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            "--methods",
            help="Compare several configurations in one table: a comma list ('dense,himap,fastv(r=0.75)') or "
            "'all' (every registered method).",
        ),
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
    try:
        result = _compute(
            config=config,
            preset=preset,
            method=method,
            method_args=list(method_arg or []),
            methods=methods,
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
    elif "methods" in result:
        _print_methods(result)
    else:
        _print_rich(result, per_layer)
