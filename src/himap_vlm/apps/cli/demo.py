"""``himap demo``: dense and every pruning method on the embedded tiny LLaVA, offline, in about a minute.

Examples
--------
::

    himap demo                                   # the embedded model, 300 questions, every method
    himap demo --out runs/demo --n 500 --methods dense,himap,fastv
    himap demo --methods "himap,fastv(k=2,r=0.9)"   # a name alone: paper default + budgets
    himap demo --model runs/tiny-llava/final     # another model (e.g. from scripts/train_tiny_llava.py)

See :mod:`himap_vlm.apps.demo` for what is measured and how the configurations are chosen (every
registered method at ``defaults_for(L)`` plus its ``budgets(L)``). Bad input (a method spec, an
``--out`` that cannot be written, a model whose ``image_token_id`` is unusable) is reported on one
line with exit status 2, before the model is loaded where the files allow.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from himap_vlm.apps.cli._app import app
from himap_vlm.apps.cli._common import load_model
from himap_vlm.apps.demo import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_N,
    DEFAULT_TIMING_REPEATS,
    DEFAULT_TIMING_SAMPLES,
)
from himap_vlm.apps.eval.preflight import fail

SMALL_MODEL_PARAMETERS = 100_000_000
"""Below this many parameters the demo runs on one CPU thread unless ``--threads`` says otherwise, and
runs each method's harsher budgets and :data:`DEFAULT_N` questions by default."""
DEFAULT_N_LARGE = 100
"""Default ``--n`` for models of :data:`SMALL_MODEL_PARAMETERS` or more (e.g. smol-llava, 137 M)."""

MISSING_MODEL = (
    "the embedded model is not shipped in this build; pass --model PATH "
    "(e.g. a model trained with scripts/train_tiny_llava.py)"
)


@app.command("demo")
def demo_command(
    out: Path = typer.Option(
        Path("himap-demo"),
        "--out",
        help="Folder for demo.json, demo.png and the per-configuration predictions.",
    ),
    n: int | None = typer.Option(
        None,
        "--n",
        min=1,
        help=f"Held-out synthetic test questions to evaluate (default: {DEFAULT_N} for models under "
        f"{SMALL_MODEL_PARAMETERS // 10**6} M parameters, {DEFAULT_N_LARGE} for larger ones, to stay within "
        "minutes on a CPU).",
    ),
    methods: list[str] = typer.Option(
        [],
        "--methods",
        help=(
            "Comma-separated methods (default: every registered method). A name alone runs its defaults_for(L) "
            "(paper setting scaled to the model depth) plus its budgets(L); NAME(KEY=VALUE,...) runs that "
            'configuration only, e.g. "fastv(k=2,r=0.9)". Dense is always run.'
        ),
    ),
    model: str | None = typer.Option(
        None, "--model", help="A model directory (or named model) to use instead of the embedded tiny LLaVA."
    ),
    batch_size: int = typer.Option(
        DEFAULT_BATCH_SIZE, "--batch-size", min=1, help="Questions per generate call."
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the synthetic questions."),
    max_new_tokens: int = typer.Option(
        DEFAULT_MAX_NEW_TOKENS, "--max-new-tokens", min=1, help="Generated tokens per answer."
    ),
    timing_samples: int = typer.Option(
        DEFAULT_TIMING_SAMPLES,
        "--timing-samples",
        min=0,
        help="Questions whose prefill is timed (0: no timing).",
    ),
    timing_repeats: int = typer.Option(
        DEFAULT_TIMING_REPEATS, "--timing-repeats", min=1, help="Interleaved timing rounds."
    ),
    threads: int | None = typer.Option(
        None,
        "--threads",
        min=1,
        help=f"torch CPU threads (default: 1 for models under {SMALL_MODEL_PARAMETERS // 10**6} M parameters, "
        "where threading overhead dominates, else torch's default).",
    ),
    by_family: bool = typer.Option(
        False, "--by-family", help="Add per-family accuracy columns to the table."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars while it runs."),
    as_json: bool = typer.Option(False, "--json", help="Print demo.json's content instead of the table."),
    instructions: str = typer.Option(
        "auto", "--instructions", help="auto, task or none: the prompt rule of `himap eval --instructions`."
    ),
    budgets: str = typer.Option(
        "auto",
        "--budgets",
        help=f"Run each method's harsher budgets too: all, none, or auto (all for models under "
        f"{SMALL_MODEL_PARAMETERS // 10**6} M parameters; the paper settings only for larger ones, to stay "
        "within minutes on a CPU).",
    ),
) -> None:
    """Evaluate dense and the pruning methods on held-out questions: accuracy, FLOPs, measured speedup.

    Loads the embedded tiny trained LLaVA (or --model), evaluates dense and every method at its paper
    default scaled to the model depth plus two budgets on N held-out synthetic questions through the
    runner of `himap eval`, times the prefill of each configuration against dense in the same process,
    prints a table and writes OUT/demo.json and OUT/demo.png (accuracy vs FLOPs ratio).
    """
    import torch
    from rich.console import Console

    import himap_vlm.assets as assets
    from himap_vlm.apps.demo import demo_configurations, run_demo
    from himap_vlm.apps.eval.preflight import (
        PreflightError,
        check_image_tokens,
        check_output_dir,
        model_config,
        model_depth,
        resolve_model_path,
    )
    from himap_vlm.apps.eval.prompts import INSTRUCTION_MODES
    from himap_vlm.core.methods.spec import MethodSpecError
    from himap_vlm.models import named_model

    embedded = model is None
    if model is None:
        path = assets.tiny_llava_path()
        if not assets.has_tiny_llava(path):
            fail(MISSING_MODEL)
    if instructions not in INSTRUCTION_MODES:
        fail(f"--instructions must be one of {', '.join(INSTRUCTION_MODES)}; got {instructions!r}")
    if budgets not in ("auto", "all", "none"):
        fail(f"--budgets must be auto, all or none; got {budgets!r}")
    try:  # what the files can tell, before the weights are loaded
        check_output_dir(out)
        path = Path(resolve_model_path(model)) if model is not None else path
        named = (named_model(model) or "").replace("-", "_") if model is not None else ""
        if not path.exists():
            fail(f"model path {str(path)!r} does not exist")
        num_layers = model_depth(model_config(str(path)))
        if num_layers is not None:
            demo_configurations(methods or None, num_layers)
    except (MethodSpecError, PreflightError) as exc:
        fail(exc)
    if threads:
        torch.set_num_threads(threads)
    console = Console(stderr=True)
    with console.status(f"loading {'the embedded model' if embedded else path}", spinner="dots"):
        try:
            net, processor = load_model(str(path))
        except (OSError, ValueError, RuntimeError) as exc:
            fail(f"cannot load the model from {str(path)!r}: {exc}")
    try:
        check_image_tokens(net, processor)
    except PreflightError as exc:
        fail(exc)
    small = sum(p.numel() for p in net.parameters()) < SMALL_MODEL_PARAMETERS
    with_budgets = budgets == "all" or (budgets == "auto" and small)
    if n is None:
        n = DEFAULT_N if small else DEFAULT_N_LARGE
    if threads is None and small:
        # A tiny model runs many small kernels: extra threads only add synchronisation, and on a
        # busy machine a descheduled thread stalls every kernel (measured: minutes instead of seconds).
        torch.set_num_threads(1)
    try:
        result = run_demo(
            net,
            processor,
            out,
            n=n,
            methods=methods or None,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            seed=seed,
            timing_samples=timing_samples,
            timing_repeats=timing_repeats,
            model_source=str(path),
            model_name="tiny_llava" if embedded else (named or None),
            embedded=embedded,
            progress=progress,
            console=console,
            command=["himap", *sys.argv[1:]],
            instructions=instructions,
            budgets=with_budgets,
        )
    except (ValueError, OSError) as exc:  # MethodSpecError included
        fail(exc)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1, default=str))
    else:
        result.print(Console(width=None if sys.stdout.isatty() else 140), by_family=by_family)
