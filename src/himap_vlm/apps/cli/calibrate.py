"""``himap calibrate``: choose a method's configuration on calibration data.

Examples
--------
::

    himap calibrate vtw --model path/to/llava --data calib.jsonl --eta 0.003
    himap calibrate vtw --model path/to/llava --data calib.jsonl --limit 50 --start 5 --json

The data file is a JSON list or JSONL of ``{"image": path relative to the file, "question": ...,
"answer": ...}`` records (see :func:`himap_vlm.apps.data.synthetic.read_jsonl`); the first ``--limit``
(20, as in the VTW paper) are used. The progress bar goes to stderr, so ``--json`` output stays
clean on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from himap_vlm.apps.cli._app import app
from himap_vlm.apps.cli._common import load_model
from himap_vlm.apps.eval.preflight import fail

calibrate_app = typer.Typer(
    help="Calibrate a method on a few samples (e.g. VTW's withdrawal layer).", no_args_is_help=True
)
app.add_typer(calibrate_app, name="calibrate")


@calibrate_app.command("vtw")
def calibrate_vtw_command(
    model: Annotated[
        str, typer.Option("--model", help="Local model directory, a named model (tiny-llava, smol-llava), or a hub id when online.")
    ],
    data: Annotated[Path, typer.Option("--data", help="JSON/JSONL calibration records (image, question).")],
    eta: Annotated[float, typer.Option("--eta", help="KL threshold (0.003 for LLaVA-1.5-7B).")] = 0.003,
    start: Annotated[int, typer.Option("--start", help="First candidate withdrawal layer (paper: 5).")] = 5,
    stop: Annotated[int | None, typer.Option("--stop", help="Last candidate layer (default: the last).")] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Use the first N records (the paper uses 20).")
    ] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per forward.")] = 1,
    attn_implementation: Annotated[
        str | None, typer.Option("--attn-implementation", help="sdpa (default), eager, ...")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")] = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Choose VTW's withdrawal layer: the first layer whose mean first-token KL(withdrawn || dense) <= eta."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from himap_vlm.apps.calibrate import calibrate_vtw, candidate_layers
    from himap_vlm.apps.data.synthetic import read_jsonl
    from himap_vlm.apps.eval.preflight import (
        PreflightError,
        check_image_tokens,
        model_config,
        model_depth,
        resolve_model_path,
    )

    try:
        records = read_jsonl(data)
    except (FileNotFoundError, ValueError) as exc:
        fail(exc)
    if limit is not None:
        records = records[:limit]
    if not records:
        fail(f"{data} holds no records")
    try:  # what the files can tell, before the weights are loaded
        source = resolve_model_path(model)
        num_layers = model_depth(model_config(source))
        if num_layers is not None:
            candidate_layers(num_layers, start, stop)
    except ValueError as exc:  # PreflightError included
        fail(exc)
    try:
        net, processor = load_model(source, attn_implementation, dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        fail(f"cannot load the model from {model!r}: {exc}")
    try:
        check_image_tokens(net, processor)
    except PreflightError as exc:
        fail(exc)
    err = Console(stderr=True)
    with Progress(
        TextColumn("[bold]VTW calibration"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("forwards"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("calibrate", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            result = calibrate_vtw(
                net, processor, records, eta=eta, start=start, stop=stop, batch_size=batch_size, progress=progress
            )
        except ValueError as exc:
            fail(exc)
    out = result.to_dict()
    out["model"] = model
    out["data"] = str(data)
    if as_json:
        typer.echo(json.dumps(out))
        return
    _print_curve(out)


def _print_curve(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"VTW calibration · {result['num_samples']} samples · eta = {result['eta']:g}")
    table.add_column("layer d", justify="right")
    table.add_column("mean KL(withdrawn || dense)", justify="right")
    table.add_column("<= eta", justify="center")
    for d, value in zip(result["candidates"], result["kl"], strict=True):
        mark = "✓" if value <= result["eta"] else ""
        style = "bold green" if d == result["layer"] else None
        table.add_row(str(d), f"{value:.6g}", mark, style=style)
    console.print(table)
    if result["layer"] is None:
        console.print(
            f"[bold red]No candidate layer reaches KL <= {result['eta']:g}[/]: raise --eta or use more layers."
        )
    else:
        from himap_vlm.apps.calibrate import vtw_spec

        spec = vtw_spec(result["layer"]).label
        console.print(
            f"withdrawal layer K = [bold]{result['layer']}[/]  (use: himap eval/demo --methods \"{spec}\", "
            f"or himap generate --method \"{spec}\")",
            highlight=False,
        )
    console.print(f"[dim]{result['forwards']} forwards[/]")
