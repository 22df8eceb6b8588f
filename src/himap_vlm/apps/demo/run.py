"""Running the demo: the questions, the accuracy pass (``himap eval``'s runner), the paired prefill timing."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .configs import DemoConfig, configuration_rule, demo_configurations
from .plot import plot_demo
from .results import DemoResult, DemoRow, _finite

if TYPE_CHECKING:
    from rich.console import Console

    from himap_vlm.apps.eval.prompts import PromptPolicy
    from himap_vlm.apps.eval.tasks.base import Sample

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_N",
    "DEFAULT_TIMING_REPEATS",
    "DEFAULT_TIMING_SAMPLES",
    "run_demo",
    "synthetic_samples",
]

DEFAULT_N = 300
"""Held-out questions evaluated by default."""
DEFAULT_BATCH_SIZE = 32
"""Questions per ``generate`` call in the accuracy pass."""
DEFAULT_MAX_NEW_TOKENS = 3
"""Generated tokens per answer (the embedded model answers one word, then ``</s>``)."""
DEFAULT_TIMING_SAMPLES = 5
"""Questions timed (one per question family with the default cycle)."""
DEFAULT_TIMING_REPEATS = 3
"""Timed rounds over the timing questions (every configuration, interleaved)."""
TASK = "synthetic"
EVAL_SUBDIR = "eval"
JSON_NAME = "demo.json"
PNG_NAME = "demo.png"


def synthetic_samples(n: int, image_size: int, seed: int = 0) -> list[Sample]:
    """The first ``n`` questions of the synthetic ``test`` split: what ``himap eval --task synthetic`` asks.

    The same as ``get_task("synthetic", seed=seed, image_size=image_size).load(limit=n)``
    (:class:`himap_vlm.apps.eval.tasks.synthetic.Synthetic`), so the demo and ``himap eval``
    ask the same questions.

    Parameters
    ----------
    n : int
        Number of questions (families cycled: equal shares).
    image_size : int
        Side of the generated images (the model's vision input size; at least 24 px, the
        smallest the 3 x 3 scene grid allows -- the processor resizes).
    seed : int
        Benchmark seed (:class:`~himap_vlm.apps.data.synthetic.SceneQAConfig`).

    Returns
    -------
    list of Sample
        ``meta`` holds ``family`` and ``qtype``.
    """
    from himap_vlm.apps.eval.tasks import get_task

    return get_task(TASK, seed=seed, image_size=int(image_size)).load(limit=n)


def _time_prefill(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    configs: Sequence[DemoConfig],
    policy: PromptPolicy,
    *,
    repeats: int,
    warmup: int,
    tick: Callable[[str], None],
) -> Any:
    """Paired, interleaved prefill timings of every configuration (``himap bench``'s runner).

    The prompts are the accuracy pass's (``policy``); each row runs the resolved configuration.
    """
    from himap_vlm.apps.bench.runner import RowSpec, run_benchmark
    from himap_vlm.apps.prompting import build_inputs

    rows = [RowSpec(c.spec.label, c.spec.name, dict(c.spec.config)) for c in configs]
    inputs = [
        dict(build_inputs(processor, [s.load_image()], policy.prompt(s)[0], model=model)) for s in samples
    ]
    return run_benchmark(
        model,
        inputs,
        rows,
        repeats=repeats,
        warmup=warmup,
        max_new_tokens=1,
        memory=False,
        progress=tick,
        baseline=configs[0].spec.label,
    )


class _Bar:
    """A rich progress bar for the timing phase (or nothing)."""

    def __init__(self, enabled: bool, total: int, console: Console | None, head: str):
        self._bar: Any = None
        if not enabled or total <= 0:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(
            TextColumn("[bold]{task.fields[head]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
            transient=True,
        )
        self._task = self._bar.add_task("", total=total, head=head)
        self._bar.start()

    def tick(self, message: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=message)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ---------------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------------
def _model_info(model: Any, source: str | None, label: str, embedded: bool) -> dict[str, Any]:
    from himap_vlm.core.families import resolve_family

    family = resolve_family(model)
    text = family.text_config(model)
    vision = getattr(model.config, "vision_config", None)
    image_size = getattr(vision, "image_size", None)
    patch = getattr(vision, "patch_size", None)
    return {
        "label": label,
        "source": source,
        "embedded": embedded,
        "class": type(model).__name__,
        "family": family.name,
        "num_layers": int(text.num_hidden_layers),
        "hidden_size": int(text.hidden_size),
        "intermediate_size": int(text.intermediate_size),
        "num_heads": int(text.num_attention_heads),
        "num_kv_heads": int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
        "image_size": image_size,
        "patch_size": patch,
        "image_tokens": (int(image_size) // int(patch)) ** 2 if image_size and patch else None,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def run_demo(
    model: Any,
    processor: Any,
    out_dir: str | Path,
    *,
    n: int = DEFAULT_N,
    methods: str | Iterable[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    timing_samples: int = DEFAULT_TIMING_SAMPLES,
    timing_repeats: int = DEFAULT_TIMING_REPEATS,
    warmup: int = 1,
    model_source: str | None = None,
    model_name: str | None = None,
    embedded: bool = False,
    progress: bool = False,
    console: Console | None = None,
    command: Sequence[str] | None = None,
    instructions: str = "auto",
    budgets: bool = True,
) -> DemoResult:
    """Run the demo (see the module docstring) and write ``demo.json`` and ``demo.png``.

    Parameters
    ----------
    model, processor
        A supported model (eval mode, on its device) and its processor.
    out_dir : str or Path
        Where ``demo.json``, ``demo.png`` and the runner's ``eval/`` folder go (created).
    n : int
        Held-out questions (>= 1).
    methods : str, iterable of str, or None
        See :func:`demo_configurations` (default: every registered method).
    batch_size : int
        Questions per ``generate`` call in the accuracy pass.
    max_new_tokens : int
        Generated tokens per answer.
    seed : int
        Benchmark seed of the questions.
    timing_samples, timing_repeats, warmup : int
        Prefill timing: the first ``timing_samples`` questions, ``timing_repeats`` interleaved
        rounds, after ``warmup`` untimed rounds. ``timing_samples=0`` skips the timing.
    model_source : str, optional
        Where the model came from (recorded).
    model_name : str, optional
        Folder name of the model under ``eval/synthetic/`` (default: from the model's path).
    embedded : bool
        Whether the model is the embedded one (recorded).
    progress : bool
        Show progress bars (accuracy pass: the eval runner's; timing: its own).
    console : rich.console.Console, optional
        Where the progress bars go.
    command : sequence of str, optional
        The command line (recorded).
    instructions : {"auto", "task", "none"}
        The prompt rule (:mod:`himap_vlm.apps.eval.prompts`), as for ``himap eval``.
    budgets : bool
        Whether a method named alone also runs its ``budgets(L)`` (see :func:`demo_configurations`).

    Returns
    -------
    DemoResult

    Raises
    ------
    ValueError
        For bad counts, or a method list that cannot be parsed or does not fit the model
        (:class:`~himap_vlm.core.methods.spec.MethodSpecError`).
    """
    from himap_vlm.apps.eval.prompts import PromptPolicy
    from himap_vlm.apps.eval.runner import evaluate, model_label
    from himap_vlm.apps.eval.tasks import get_task
    from himap_vlm.core.families import resolve_family

    for name, value, low in (
        ("n", n, 1),
        ("batch_size", batch_size, 1),
        ("max_new_tokens", max_new_tokens, 1),
        ("timing_samples", timing_samples, 0),
        ("timing_repeats", timing_repeats, 1),
        ("warmup", warmup, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    t_start = time.perf_counter()
    num_layers = int(resolve_family(model).text_config(model).num_hidden_layers)
    configs, skipped = demo_configurations(methods, num_layers, budgets)
    label = model_label(model, model_name)
    info = _model_info(model, model_source, label, embedded)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    task = get_task(TASK, seed=seed, image_size=int(info["image_size"] or 48))
    samples = task.load(limit=n)
    policy = PromptPolicy(task, processor, model, instructions)
    t_data = time.perf_counter() - t0

    eval_root = out / EVAL_SUBDIR
    shutil.rmtree(eval_root / TASK / label, ignore_errors=True)  # the demo always recomputes
    t0 = time.perf_counter()
    results = evaluate(
        model,
        processor,
        task,
        samples,
        [c.spec for c in configs],
        eval_root,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        model_name=label,
        model_source=model_source,
        progress=progress,
        console=console,
        instructions=instructions,
    )
    t_eval = time.perf_counter() - t0

    t0 = time.perf_counter()
    bench: Any = None
    timed = samples[: min(timing_samples, len(samples))]
    if timed:
        total = len(configs) * (warmup + timing_repeats * len(timed))
        bar = _Bar(progress, total, console, "prefill timing")
        try:
            bench = _time_prefill(
                model, processor, timed, configs, policy, repeats=timing_repeats, warmup=warmup, tick=bar.tick
            )
        finally:
            bar.close()
    t_timing = time.perf_counter() - t0

    speed = {s.row: s for s in bench.summary} if bench is not None else {}
    rows: list[DemoRow] = []
    for cfg, res in zip(configs, results.configs, strict=True):
        summ = speed.get(cfg.spec.label)
        sp = summ.prefill_speedup if summ is not None else None
        rows.append(
            DemoRow(
                label=cfg.spec.label,
                method=cfg.spec.name,
                slug=cfg.spec.slug,
                params=dict(cfg.spec.params),
                config=dict(res.config),
                paper_default=cfg.paper_default,
                n=res.n_samples,
                accuracy=_finite(res.score),
                accuracy_by_family={
                    k.split("/", 1)[1]: float(v)
                    for k, v in res.metrics.items()
                    if k.startswith("accuracy/") and _finite(v) is not None
                },
                flops_ratio=_finite(res.flops_ratio),
                flops_ratio_paper=_finite(res.flops_ratio_paper),
                prefill_speedup=None if sp is None else _finite(sp.median),
                prefill_speedup_p25=None if sp is None else _finite(sp.p25),
                prefill_speedup_p75=None if sp is None else _finite(sp.p75),
                prefill_ms=None if summ is None else _finite(summ.prefill_ms.median),
                mean_image_tokens_per_layer=list(res.mean_image_tokens_per_layer),
                predictions=str(res.directory / "predictions.jsonl"),
            )
        )
    families = list(dict.fromkeys(str(s.meta.get("family")) for s in samples))
    timing: dict[str, Any] = {}
    if bench is not None:
        full = bench.to_dict()
        timing = {
            "environment": full["environment"],
            "settings": full["settings"],
            "layouts": full["layouts"],
            "summary": full["summary"],
            "measurements": full["measurements"],
        }
    else:
        import torch

        timing = {"environment": {"torch_threads": torch.get_num_threads()}}
    result = DemoResult(
        model=info,
        settings={
            "command": list(command) if command is not None else None,
            "task": TASK,
            "split": "test",
            "n": len(samples),
            "seed": seed,
            "families": families,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "methods": None
            if methods is None
            else ([methods] if isinstance(methods, str) else list(methods)),
            "configurations": [c.spec.label for c in configs],
            "rule": configuration_rule(num_layers, dict.fromkeys(c.spec.name for c in configs)),
            "prompting": results.prompting,
            "flops_convention": "exact (every token, real shapes, LM head on the last position); "
            "flops_ratio_paper: image tokens only",
            "timing": {
                "what": "language-model prefill (decoder forward), batch 1, median of paired ratios vs dense",
                "samples": len(timed),
                "repeats": timing_repeats,
                "warmup": warmup,
            },
            "python": sys.version.split()[0],
        },
        rows=rows,
        skipped=skipped,
        timing=timing,
        seconds={"data": t_data, "eval": t_eval, "timing": t_timing},
        eval_dir=results.directory,
    )
    t0 = time.perf_counter()
    result.png_path = plot_demo(result, out / PNG_NAME)
    result.seconds["plot"] = time.perf_counter() - t0
    result.seconds["total"] = time.perf_counter() - t_start
    result.json_path = out / JSON_NAME
    result.json_path.write_text(json.dumps(result.to_dict(), indent=1, default=str) + "\n", encoding="utf-8")
    return result


