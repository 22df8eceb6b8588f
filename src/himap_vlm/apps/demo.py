"""``himap demo``: every pruning method on the embedded tiny LLaVA, accuracy next to cost, in minutes.

What it does
------------
1. Generates ``n`` held-out questions in memory: the ``test`` split of the synthetic scene-QA
   benchmark (:func:`himap_vlm.apps.data.synthetic.load_synthetic`), drawn at the model's vision image size
   (no test scene is ever trained on: splits are content-disjoint). Each question is sent as the
   model was trained to read it: the question alone (multiple-choice questions carry their own
   "Answer with the option's letter ..." line), in the processor's chat template.
2. Evaluates dense and every configuration (see *Configurations*) on those questions through
   the evaluation runner of ``himap eval`` (:func:`himap_vlm.apps.eval.runner.evaluate`, task
   ``synthetic``): accuracy overall and per question family, and the prefill FLOPs ratio
   (exact convention: every token, real shapes, from the image tokens each layer really
   processed, summed over the questions).
3. Times the language-model prefill of every configuration in the same process with the
   paired, interleaved timing of ``himap bench`` (:func:`himap_vlm.apps.bench.runner.run_benchmark`):
   batch size 1, a few questions, after a warm-up round; the speedup is the median over
   (question, round) of dense's prefill time over the configuration's, each pair measured
   back to back.
4. Prints a table and writes ``OUT/demo.json`` (everything, raw timings included) and
   ``OUT/demo.png`` (accuracy against FLOPs ratio, one series per method, dense marked).
   The runner's per-configuration predictions are under ``OUT/eval/synthetic/<model>/``; the
   demo recomputes everything on every run and replaces that folder.

The command (``himap demo``) runs models under 100 M parameters on one CPU thread unless
``--threads`` says otherwise: their many small kernels gain nothing from more threads, and on a
busy machine a descheduled thread stalls every kernel. :func:`run_demo` leaves the thread count
to the caller.

Configurations
--------------
A method named alone runs at its *paper default scaled to the model depth* ``L`` (the rule of
``himap bench``, :func:`himap_vlm.apps.bench.runner.default_method_args`; ``L = 8`` for the embedded
model) plus two harsher budgets (on a small model whose objects each cover many redundant image
tokens, moderate pruning costs little, so the budgets go where the methods separate):

* ``himap``: ``k1=2, r1=0.5, k2=max(3, L//4), r2=0.75`` (paper: K2=8 of 32 layers); budgets
  ``(r1, r2)`` = (0.75, 0.9) and (0.9, 0.95);
* ``fastv``: ``k=2, r=0.5``; budgets ``r`` = 0.75 and 0.9;
* ``random``: ``k=2, r=0.5`` (FastV's setting, random choice); budgets ``r`` = 0.75 and 0.9;
* ``vtw``: ``k=L//2`` (paper: 16 of 32); budgets ``k`` = ``L//4`` and ``min(L-1, 3L//4)``;
* ``visipruner``: ``shallow_layers=max(1, round(6L/32))`` and the paper's thresholds; budgets
  ``l2_threshold`` = 0.1 and 0.4 (keeps more / fewer tokens at the filtering layer);
* ``dense``: nothing pruned; always run, first;
* any other registered method: its constructor defaults.

A method given with parameters (``fastv(k=2,r=0.9)``, the syntax of ``himap eval``) runs that
configuration only. Budgets that do not fit the model's depth are skipped (and listed in
``demo.json``); an explicit configuration that does not fit is an error. VisiPruner's thresholds
are scale-dependent: on a small model it may prune nothing, which the table then shows.

Example::

    from himap_vlm.apps.demo import run_demo
    from himap_vlm.models.tiny_llava import load_trained
    from himap_vlm.assets import tiny_llava_path

    model, processor = load_trained(tiny_llava_path())
    result = run_demo(model, processor, "himap-demo", n=300, progress=True)
    result.print()
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from himap_vlm.apps.eval.tasks.base import Sample
    from himap_vlm.core.methods.spec import MethodSpec

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_N",
    "DEFAULT_TIMING_REPEATS",
    "DEFAULT_TIMING_SAMPLES",
    "DemoConfig",
    "DemoResult",
    "DemoRow",
    "demo_configurations",
    "method_budgets",
    "plot_demo",
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

CONFIG_RULE = (
    "paper defaults scaled to the model depth L (himap_vlm.apps.bench.runner.default_method_args): "
    "HiMAP k1=2, r1=0.5, k2=max(3, L//4), r2=0.75; FastV and random k=2, r=0.5; VTW k=L//2; "
    "VisiPruner shallow_layers=max(1, round(6L/32)), paper thresholds. Budgets: HiMAP (r1, r2) in "
    "{(0.75, 0.9), (0.9, 0.95)}; FastV and random r in {0.75, 0.9}; VTW k in {L//4, min(L-1, 3L//4)}; "
    "VisiPruner l2_threshold in {0.1, 0.4}."
)


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoConfig:
    """One configuration of the demo.

    Attributes
    ----------
    spec : MethodSpec
        The method and its parameters (what the eval runner and the timing run).
    paper_default : bool
        Whether it is the method's paper default scaled to the model depth.
    """

    spec: MethodSpec
    paper_default: bool


def method_budgets(name: str, num_layers: int) -> list[dict[str, Any]]:
    """Parameters of the configurations a method runs with when named alone.

    Parameters
    ----------
    name : str
        Registered method name.
    num_layers : int
        Decoder layers of the model (``L``).

    Returns
    -------
    list of dict
        The paper default scaled to ``L`` first (:func:`himap_vlm.apps.bench.runner.default_method_args`),
        then the budgets of the module docstring's table (none for ``dense`` and for methods
        the table does not list). Some may not fit a very shallow model: the caller checks.
    """
    from himap_vlm.core.methods import get_method

    cls = get_method(name)
    return [dict(cls.defaults_for(num_layers)), *cls.budgets(num_layers)]


def _default_spec(name: str, num_layers: int) -> MethodSpec:
    from himap_vlm.apps.bench.runner import default_method_args
    from himap_vlm.core.methods.spec import MethodSpec

    return MethodSpec(name, default_method_args(name, num_layers))


def _fits(spec: MethodSpec, num_layers: int) -> str | None:
    """``None`` if the configuration fits a model of ``num_layers`` layers, else why not."""
    from himap_vlm.core.methods.spec import MethodSpecError

    try:
        spec.build().validate_for_model(num_layers)
    except (MethodSpecError, ValueError) as exc:
        return str(exc)
    return None


def demo_configurations(
    methods: str | Iterable[str] | None, num_layers: int
) -> tuple[list[DemoConfig], list[dict[str, str]]]:
    """Expand a method list into the demo's configurations.

    Parameters
    ----------
    methods : str, iterable of str, or None
        Comma-separated entries (``"dense,himap,fastv(k=2,r=0.75)"``; several strings are
        concatenated). A name alone gives the method's paper default and budgets
        (:func:`method_budgets`); ``NAME(KEY=VALUE,...)`` gives that configuration only.
        ``None``: every registered method (:data:`himap_vlm.core.methods.METHODS`).
    num_layers : int
        Decoder layers of the model.

    Returns
    -------
    configs : list of DemoConfig
        Dense first (added when missing), then in the order given; duplicates removed.
    skipped : list of dict
        ``{"label", "reason"}`` for budgets that do not fit the model's depth.

    Raises
    ------
    himap_vlm.core.methods.spec.MethodSpecError
        For a syntax error, an unknown method or parameter, or an explicit configuration that
        does not fit the model (a ``ValueError``).
    """
    from himap_vlm.core.methods import METHODS
    from himap_vlm.core.methods.spec import MethodSpec, MethodSpecError, _split_top_level

    if methods is None:
        texts = [",".join(METHODS)]
    else:
        texts = [methods] if isinstance(methods, str) else list(methods)
    entries: list[MethodSpec] = []
    for text in texts:
        for part in _split_top_level(text, ",", "methods"):
            if not part.strip():
                raise MethodSpecError(f"methods: empty entry in {text!r} (stray comma?)")
            entries.append(MethodSpec.parse(part))
    if not entries:
        raise MethodSpecError("methods: give at least one method (e.g. dense,himap,fastv)")

    configs: list[DemoConfig] = []
    skipped: list[dict[str, str]] = []
    seen: set[str] = set()

    def add(spec: MethodSpec, paper_default: bool) -> None:
        if spec.slug not in seen:
            seen.add(spec.slug)
            configs.append(DemoConfig(spec, paper_default))

    if all(e.name != "dense" for e in entries):
        add(MethodSpec("dense"), True)
    for entry in entries:
        if entry.params:
            reason = _fits(entry, num_layers)
            if reason is not None:
                raise MethodSpecError(reason)
            add(entry, entry.config == _default_spec(entry.name, num_layers).config)
            continue
        for i, params in enumerate(method_budgets(entry.name, num_layers)):
            spec = MethodSpec(entry.name, params)
            reason = _fits(spec, num_layers)
            if reason is not None:
                skipped.append({"label": spec.label, "reason": reason})
                continue
            add(spec, i == 0)
    configs.sort(key=lambda c: c.spec.name != "dense")  # stable: dense first, the rest as given
    return configs, skipped


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def synthetic_samples(n: int, image_size: int, seed: int = 0) -> list[Sample]:
    """The first ``n`` questions of the synthetic ``test`` split, as eval-runner samples.

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
        ``meta`` holds ``family``, ``qtype`` and ``prompt`` (the question itself: the format the
        tiny LLaVA was trained on, so the ``synthetic`` task adds no instruction).
    """
    from himap_vlm.apps.data.synthetic import SceneQAConfig, load_synthetic
    from himap_vlm.apps.eval.tasks.base import Sample

    config = SceneQAConfig(image_size=max(int(image_size), 8 * SceneQAConfig.grid), seed=seed)
    return [
        Sample(
            id=str(r["id"]),
            image=r["image"],
            question=r["question"],
            answer=r["answer"],
            meta={"family": r["family"], "qtype": r["qtype"], "prompt": r["question"]},
        )
        for r in load_synthetic("test", n, config)
    ]


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class DemoRow:
    """One configuration's numbers.

    Attributes
    ----------
    label, method, slug : str
        ``name(k=v,...)``, the method, and the result folder name.
    params, config : dict
        Parameters given, and the resolved configuration (defaults filled in).
    paper_default : bool
        The method's paper default scaled to the model depth.
    n : int
        Questions answered.
    accuracy : float or None
        Percent correct.
    accuracy_by_family : dict
        Percent correct per question family.
    flops_ratio, flops_ratio_paper : float or None
        Prefill FLOPs over dense's (exact and papers' conventions) on the evaluated questions.
    prefill_speedup, prefill_speedup_p25, prefill_speedup_p75 : float or None
        Median and quartiles of the paired prefill speedups vs dense.
    prefill_ms : float or None
        Median language-model prefill time (batch 1).
    mean_image_tokens_per_layer : list of float
        Image tokens in each decoder layer, averaged over the questions.
    predictions : str
        The runner's ``predictions.jsonl`` of this configuration.
    """

    label: str
    method: str
    slug: str
    params: dict[str, Any]
    config: dict[str, Any]
    paper_default: bool
    n: int
    accuracy: float | None
    accuracy_by_family: dict[str, float]
    flops_ratio: float | None
    flops_ratio_paper: float | None
    prefill_speedup: float | None
    prefill_speedup_p25: float | None
    prefill_speedup_p75: float | None
    prefill_ms: float | None
    mean_image_tokens_per_layer: list[float] = field(default_factory=list)
    predictions: str = ""


@dataclass
class DemoResult:
    """Everything a demo run produced (what ``demo.json`` holds).

    Attributes
    ----------
    model : dict
        Source, class, depth, dimensions, image tokens, parameters.
    settings : dict
        Questions, seed, batch size, generation and timing settings, the configuration rule.
    rows : list of DemoRow
        Dense first.
    skipped : list of dict
        Budgets that did not fit the model (``label``, ``reason``).
    timing : dict
        Environment, timing settings, per-configuration summaries and every raw measurement
        (:class:`himap_vlm.apps.bench.runner.BenchResult`).
    seconds : dict
        Wall time of the data, accuracy, timing and plotting phases and in total.
    eval_dir : Path
        The runner's results (``OUT/eval/synthetic/<model>``).
    json_path, png_path : Path or None
        The files written.
    """

    model: dict[str, Any]
    settings: dict[str, Any]
    rows: list[DemoRow]
    skipped: list[dict[str, str]]
    timing: dict[str, Any]
    seconds: dict[str, float]
    eval_dir: Path
    json_path: Path | None = None
    png_path: Path | None = None

    @property
    def dense(self) -> DemoRow:
        """The dense row."""
        return next(r for r in self.rows if r.method == "dense")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "model": self.model,
            "settings": self.settings,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "skipped": self.skipped,
            "timing": self.timing,
            "seconds": self.seconds,
            "eval_dir": str(self.eval_dir),
            "json": None if self.json_path is None else str(self.json_path),
            "png": None if self.png_path is None else str(self.png_path),
        }

    def table(self, by_family: bool = False) -> Table:
        """A rich table: configuration, accuracy (and per family), FLOPs ratio, prefill speedup."""
        from rich.table import Table

        s = self.settings
        t = s["timing"]
        table = Table(
            title=(
                f"himap demo · {self.model['label']} ({self.model['num_layers']} layers, "
                f"{self.model['image_tokens']} image tokens) · {s['n']} held-out synthetic questions"
            ),
            caption=(
                "* paper default scaled to the model depth. FLOPs: prefill FLOPs vs dense (exact convention, "
                "tokens each layer really processed). "
                + (
                    "prefill x: median of paired dense/pruned language-model prefill times, batch 1, "
                    f"{t['samples']} questions x {t['repeats']} rounds after {t['warmup']} warm-up round(s), "
                    f"this process, torch threads: {self.timing.get('environment', {}).get('torch_threads', '?')}."
                    if t["samples"]
                    else "prefill timing skipped."
                )
            ),
        )
        table.add_column("configuration", overflow="fold")
        table.add_column("accuracy", justify="right")
        table.add_column("Δ vs dense", justify="right")
        families = s.get("families", []) if by_family else []
        for fam in families:
            table.add_column(fam, justify="right")
        table.add_column("FLOPs", justify="right")
        table.add_column("prefill x", justify="right")
        base = self.dense.accuracy
        for r in self.rows:
            delta = (
                "-"
                if r.accuracy is None or base is None or r.method == "dense"
                else f"{r.accuracy - base:+.1f}"
            )
            cells = [
                r.label + (" *" if r.paper_default and r.method != "dense" else ""),
                _pct(r.accuracy),
                delta,
                *[_pct(r.accuracy_by_family.get(f)) for f in families],
                "-" if r.flops_ratio is None else f"{100 * r.flops_ratio:.1f}%",
                "-" if r.prefill_speedup is None else f"{r.prefill_speedup:.2f}x",
            ]
            table.add_row(*cells)
        return table

    def print(self, console: Console | None = None, by_family: bool = False) -> None:
        """Print :meth:`table`, skipped budgets and where the files are."""
        from rich.console import Console

        console = console or Console()
        console.print(self.table(by_family))
        for sk in self.skipped:
            console.print(f"skipped {sk['label']}: {sk['reason']}")
        written = [str(p) for p in (self.json_path, self.png_path) if p is not None]
        if written:
            console.print(f"wrote {' and '.join(written)}; predictions under {self.eval_dir}")
        console.print(f"{self.seconds.get('total', 0):.0f} s in total")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _time_prefill(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    configs: Sequence[DemoConfig],
    *,
    repeats: int,
    warmup: int,
    tick: Callable[[str], None],
) -> Any:
    """Paired, interleaved prefill timings of every configuration (``himap bench``'s runner)."""
    from himap_vlm.apps.bench.runner import RowSpec, run_benchmark
    from himap_vlm.apps.eval.tasks import get_task
    from himap_vlm.apps.prompting import build_inputs

    task = get_task(TASK)
    rows = [RowSpec(c.spec.label, c.spec.name, dict(c.spec.params)) for c in configs]
    inputs = [dict(build_inputs(processor, [s.load_image()], task.prompt(s), model=model)) for s in samples]
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

    Returns
    -------
    DemoResult

    Raises
    ------
    ValueError
        For bad counts, or a method list that cannot be parsed or does not fit the model
        (:class:`~himap_vlm.core.methods.spec.MethodSpecError`).
    """
    from himap_vlm.apps.eval.runner import evaluate, model_label
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
    configs, skipped = demo_configurations(methods, num_layers)
    label = model_label(model, model_name)
    info = _model_info(model, model_source, label, embedded)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    samples = synthetic_samples(n, int(info["image_size"] or 48), seed)
    t_data = time.perf_counter() - t0

    eval_root = out / EVAL_SUBDIR
    shutil.rmtree(eval_root / TASK / label, ignore_errors=True)  # the demo always recomputes
    t0 = time.perf_counter()
    results = evaluate(
        model,
        processor,
        TASK,
        samples,
        [c.spec for c in configs],
        eval_root,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        model_name=label,
        model_source=model_source,
        progress=progress,
        console=console,
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
                model, processor, timed, configs, repeats=timing_repeats, warmup=warmup, tick=bar.tick
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
            "rule": CONFIG_RULE,
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


# ---------------------------------------------------------------------------------------------
# the plot
# ---------------------------------------------------------------------------------------------
_MARKERS = "osD^vP*X<>"


def plot_demo(result: DemoResult | Mapping[str, Any], path: str | Path) -> Path:
    """Write a PNG of accuracy against the prefill FLOPs ratio, one series per method.

    Each method's configurations are joined in FLOPs order; its paper default has a black edge.
    Dense is a black star at 100 % with a dotted horizontal line at its accuracy.

    Parameters
    ----------
    result : DemoResult or dict
        A result, or ``demo.json``'s content.
    path : str or Path
        Output file (``.png``).

    Returns
    -------
    Path
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    data = result.to_dict() if isinstance(result, DemoResult) else dict(result)
    rows = [r for r in data["rows"] if r.get("accuracy") is not None and r.get("flops_ratio") is not None]
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    for i, method in enumerate(methods):
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["flops_ratio"])
        colour = colours[i % len(colours)]
        marker = _MARKERS[i % len(_MARKERS)]
        xs = [100 * r["flops_ratio"] for r in pts]
        ys = [r["accuracy"] for r in pts]
        ax.plot(xs, ys, marker=marker, color=colour, lw=1.2, ms=6, label=method)
        for r, x, y in zip(pts, xs, ys, strict=True):
            if r.get("paper_default"):
                ax.plot(x, y, marker=marker, color=colour, ms=10, mec="black", mew=1.5, ls="none")
    for r in rows:
        if r["method"] == "dense":
            ax.axhline(r["accuracy"], color="0.4", lw=0.8, ls=":")
            ax.plot(
                100 * r["flops_ratio"],
                r["accuracy"],
                marker="*",
                color="black",
                ms=14,
                ls="none",
                label="dense",
            )
    ax.plot(
        [], [], marker="o", color="white", mec="black", mew=1.5, ls="none", label="paper default (scaled)"
    )
    accs = [r["accuracy"] for r in rows]
    if accs:
        lo, hi = min(accs), max(accs)
        pad = max(2.0, 0.08 * (hi - lo))
        ax.set_ylim(max(-1.0, lo - pad), min(101.0, hi + pad))
    model = data.get("model", {})
    settings = data.get("settings", {})
    ax.set_title(
        f"himap demo · {model.get('label', '')} · {settings.get('n', '?')} held-out questions", fontsize=10
    )
    ax.set_xlabel("prefill FLOPs vs dense (exact convention, %)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
