"""What a demo run produced: :class:`DemoRow` per configuration, :class:`DemoResult` (``demo.json``), the table."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = ["DemoResult", "DemoRow"]


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
        Questions, seed, batch size, generation and timing settings, the configuration rule
        (``rule``: :func:`~himap_vlm.apps.demo.configs.configuration_rule`, from the methods) and
        the prompts (``prompting``: :meth:`himap_vlm.apps.eval.prompts.PromptPolicy.to_dict`).
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
                "* the method's defaults_for(L): its paper setting scaled to the model depth. FLOPs: prefill FLOPs vs dense (exact convention, "
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
        """Print :meth:`table`, how the configurations were chosen, the prompts, skipped budgets, the files."""
        from rich.console import Console

        console = console or Console()
        console.print(self.table(by_family))
        rule = self.settings.get("rule") or []
        if rule:
            from .configs import rule_lines

            layers = self.model.get("num_layers")
            console.print(f"configurations (* = defaults_for(L), L = {layers}; from the method registry):")
            for line in rule_lines(rule, layers):
                console.print(f"  {line}", markup=False, highlight=False)
        if self.settings.get("prompting"):
            from himap_vlm.apps.eval.prompts import describe

            console.print(describe(self.settings["prompting"]), markup=False, highlight=False)
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

