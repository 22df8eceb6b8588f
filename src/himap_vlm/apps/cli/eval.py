"""``himap eval``: evaluate several pruning configurations on a benchmark with one model load.

Examples
--------
::

    himap eval --model llava-hf/llava-1.5-7b-hf --task scienceqa_img --data playground/data/eval/scienceqa \\
        --methods "dense,himap(k1=2,r1=0.5,k2=8,r2=0.75),fastv(k=2,r=0.5)" --batch-size 8 --out runs/

    himap eval ... --methods dense,himap,fastv --method-args "himap:k1=2,r1=0.5,k2=8,r2=0.75;fastv:k=2,r=0.5"

    accelerate launch --num_processes 4 -m himap_vlm eval ...     # data parallel, one model per process

    himap eval --model tiny-llava --task synthetic --limit 300 --out runs/   # the demo's questions

``--methods`` is a comma-separated list of ``NAME`` or ``NAME(KEY=VALUE,...)``; the same method
may appear with several parameter sets, and the option may be repeated. ``--method-args``
(``METHOD:KEY=VALUE,...;METHOD:...``, repeatable) gives parameters to every configuration of a
method; parameters in parentheses win. Parameters left out take the method's
``defaults_for(L)``, its paper setting scaled to the model's depth ``L`` (read from the model's
``config.json``): on a 32-layer model (LLaVA-1.5-7B) these are the papers' settings; on other
depths the layer indices scale (HiMAP ``k2 = max(3, L // 4)``, VTW ``k = L // 2``, ...). See
:mod:`himap_vlm.core.methods.spec` and :mod:`himap_vlm.apps.eval.runner` for the result folders,
resuming and the FLOPs ratio, and :mod:`himap_vlm.apps.eval.prompts` for ``--instructions``.

Bad input (an unknown task, a method spec that does not parse or does not fit the model, an
``--out`` that cannot be written, a model whose ``image_token_id`` is unusable) is reported on
one line with exit status 2, checked before the model's weights are loaded where the files allow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from himap_vlm.apps.cli._app import app
from himap_vlm.apps.cli._common import load_model
from himap_vlm.apps.eval.preflight import fail

DTYPES = ("float32", "bfloat16", "float16")


def _task_options(pairs: list[str]) -> dict:
    from himap_vlm.core.methods.spec import coerce_value

    out = {}
    for pair in pairs:
        if "=" not in pair:
            fail(f"--task-option expects KEY=VALUE; got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = coerce_value(value)
    return out


@app.command("eval")
def eval_command(
    model: str = typer.Option(
        ..., "--model", help="Local model directory, a named model (tiny-llava, smol-llava), or a hub id when online."
    ),
    task: str = typer.Option(..., "--task", help="Benchmark: scienceqa_img, pope, mme, gqa, ..., synthetic."),
    data: str | None = typer.Option(
        None,
        "--data",
        help="The task's data (folder, file, saved dataset); default: the task's hub dataset (synthetic: generated).",
    ),
    out: Path = typer.Option(..., "--out", help="Results root: <out>/<task>/<model>/<configuration>/."),
    methods: list[str] = typer.Option(
        ["dense"],
        "--methods",
        help='Configurations, e.g. "dense,himap(k1=2,r1=0.5,k2=8,r2=0.75),fastv(k=2,r=0.5)" (repeatable).',
    ),
    method_args: list[str] = typer.Option(
        [],
        "--method-args",
        help='Parameters per method, e.g. "himap:k1=2,r1=0.5;fastv:k=2,r=0.5" (repeatable).',
    ),
    limit: int | None = typer.Option(None, "--limit", min=0, help="Evaluate only the first N samples."),
    batch_size: int = typer.Option(
        1, "--batch-size", min=1, help="Samples per generate call (left padding)."
    ),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1, help="Default: the task's."),
    split: str | None = typer.Option(None, "--split", help="Dataset split, where the task has several."),
    image_dir: Path | None = typer.Option(
        None, "--image-dir", help="Folder the image paths are relative to."
    ),
    annotations: Path | None = typer.Option(None, "--annotations", help="Answer/annotation file."),
    task_option: list[str] = typer.Option([], "--task-option", help="Task option KEY=VALUE (repeatable)."),
    model_name: str | None = typer.Option(
        None, "--model-name", help="Folder name of the model in the results."
    ),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    attn_implementation: str | None = typer.Option(
        None, "--attn-implementation", help="sdpa (default), eager, ..."
    ),
    device: str = typer.Option("auto", "--device", help="auto (cuda if available), cpu, cuda, cuda:1, ..."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar with samples/s."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
    instructions: str = typer.Option(
        "auto",
        "--instructions",
        help="The task's answer-format instructions: auto (the model's declared question convention, else the "
        "task's where its tokenizer can spell them), task (always, the papers' protocol) or none.",
    ),
) -> None:
    """Evaluate pruning configurations on a benchmark: resumable, batched, data parallel."""
    from himap_vlm.apps.eval import DataFormatError, MissingImageError, get_task
    from himap_vlm.apps.eval.preflight import (
        PreflightError,
        check_image_tokens,
        check_output_dir,
        model_config,
        model_depth,
        resolve_model_path,
    )
    from himap_vlm.apps.eval.prompts import INSTRUCTION_MODES
    from himap_vlm.apps.eval.runner import evaluate
    from himap_vlm.core.methods.spec import MethodSpecError, parse_methods
    from himap_vlm.models import named_model

    # Everything the files can tell is checked before the model's weights are loaded.
    try:
        task_obj = get_task(task, **_task_options(task_option))
    except (ValueError, TypeError) as exc:
        fail(exc)
    if instructions not in INSTRUCTION_MODES:
        fail(f"--instructions must be one of {', '.join(INSTRUCTION_MODES)}; got {instructions!r}")
    if dtype not in DTYPES:
        fail(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    try:
        parse_methods(methods, method_args)  # syntax, names, parameters
        check_output_dir(out)
        source = resolve_model_path(model)
        if model_name is None and named_model(model):  # results under its name, not its cache folder
            model_name = named_model(model).replace("-", "_")
        num_layers = model_depth(model_config(source))
        specs = parse_methods(methods, method_args, num_layers=num_layers)  # defaults_for(L), fit
    except (MethodSpecError, PreflightError) as exc:
        fail(exc)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = None
    if distributed:
        from accelerate import PartialState

        state = PartialState()
    try:
        samples = task_obj.load(data, split=split, limit=limit, image_dir=image_dir, annotations=annotations)
    except MissingImageError as exc:
        fail(f"missing image: {exc}")
    except DataFormatError as exc:
        fail(f"malformed data: {exc}")
    except (FileNotFoundError, ValueError, ImportError) as exc:
        fail(exc)
    if not samples:
        fail(f"{task_obj.name}: no samples in {data!r}" + (f" (limit={limit})" if limit is not None else ""))

    try:
        net, processor = load_model(source, attn_implementation, dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        fail(f"cannot load the model from {model!r}: {exc}")
    try:
        check_image_tokens(net, processor)
    except PreflightError as exc:
        fail(exc)
    import torch

    if state is not None:
        target = state.device
    elif device == "auto":
        target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            target = torch.device(device)
        except RuntimeError as exc:
            fail(f"--device: {exc}")
    if target.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: CUDA is not available on this machine")
    try:
        net.to(target)
    except (RuntimeError, AssertionError) as exc:
        fail(f"--device {device}: {exc}")

    from rich.console import Console

    console = Console(stderr=True)
    is_main = state is None or state.is_main_process
    try:
        results = evaluate(
            net,
            processor,
            task_obj,
            samples,
            specs,
            out,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            model_name=model_name,
            model_source=model,
            progress=progress,
            console=console,
            instructions=instructions,
        )
    except (MissingImageError, DataFormatError) as exc:
        fail(exc)
    except (ValueError, OSError) as exc:
        fail(exc)
    if not is_main:
        return
    if as_json:
        typer.echo(json.dumps(results.to_dict(), indent=2))
    else:
        results.print(Console())
