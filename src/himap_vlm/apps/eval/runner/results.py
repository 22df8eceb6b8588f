"""What a run returns: :class:`ConfigResult` per configuration and :class:`EvalResults` per run."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


@dataclass
class ConfigResult:
    """The outcome of one method configuration.

    Attributes
    ----------
    slug : str
        Folder name of the configuration.
    label : str
        ``name(k=v,...)`` as given.
    method : str
        Method name.
    config : dict
        Resolved method configuration.
    directory : Path
        The configuration's result folder.
    metrics : dict
        The task's metrics (:meth:`Task.metrics`) over the samples of the run.
    primary_metric : str
        The key of :attr:`metrics` the papers report.
    score : float or None
        ``metrics[primary_metric]`` (``None`` if absent).
    n_samples : int
        Samples with a prediction.
    n_missing : int
        Samples of the run without a prediction (0 after a complete run).
    flops_ratio, flops_ratio_paper : float or None
        Prefill FLOPs relative to dense, exact and paper conventions (see module docstring).
    mean_image_tokens_per_layer : list of float
        Image tokens present in each decoder layer, averaged over samples.
    samples_per_second : float or None
        Generation throughput of rank 0 in the run that finished the configuration (``None``
        when nothing was generated in that run).
    """

    slug: str
    label: str
    method: str
    config: dict[str, Any]
    directory: Path
    metrics: dict[str, Any]
    primary_metric: str
    score: float | None
    n_samples: int
    n_missing: int = 0
    flops_ratio: float | None = None
    flops_ratio_paper: float | None = None
    mean_image_tokens_per_layer: list[float] = field(default_factory=list)
    samples_per_second: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``metrics.json`` holds)."""
        out = dataclasses.asdict(self)
        out["directory"] = str(self.directory)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfigResult:
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["directory"] = Path(kwargs["directory"])
        return cls(**kwargs)


@dataclass
class EvalResults:
    """All configurations of one run (one task, one model).

    Attributes
    ----------
    task : str
    model : str
        The model's folder name under the task.
    directory : Path
        ``<out_dir>/<task>/<model>``.
    configs : list of ConfigResult
        In the order the methods were given.
    summary_csv : Path or None
        The CSV across configurations (``None`` on ranks other than 0 before merging).
    prompting : dict or None
        The prompt rule of the run and what it left out
        (:meth:`himap_vlm.apps.eval.prompts.PromptPolicy.to_dict`).
    """

    task: str
    model: str
    directory: Path
    configs: list[ConfigResult]
    summary_csv: Path | None = None
    prompting: dict[str, Any] | None = None

    def __getitem__(self, key: int | str) -> ConfigResult:
        if isinstance(key, int):
            return self.configs[key]
        for c in self.configs:
            if key in (c.slug, c.label):
                return c
        raise KeyError(f"no configuration {key!r}; have: {', '.join(c.label for c in self.configs)}")

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per configuration: the summary CSV's rows."""
        rows = []
        extra: list[str] = []
        for c in self.configs:
            for k, v in c.metrics.items():
                if _is_scalar(v) and k not in extra:
                    extra.append(k)
        for c in self.configs:
            row: dict[str, Any] = {
                "task": self.task,
                "model": self.model,
                "method": c.method,
                "label": c.label,
                "slug": c.slug,
                "n": c.n_samples,
                "n_missing": c.n_missing,
                "primary_metric": c.primary_metric,
                "score": c.score,
                "flops_ratio": c.flops_ratio,
                "flops_ratio_paper": c.flops_ratio_paper,
                "samples_per_second": c.samples_per_second,
            }
            for k in extra:
                row[f"metric:{k}"] = c.metrics.get(k)
            rows.append(row)
        return rows

    def table(self) -> Table:
        """A rich table: configuration, samples, primary score, FLOPs ratios, throughput."""
        from rich.table import Table

        primary = {c.primary_metric for c in self.configs}
        score_name = primary.pop() if len(primary) == 1 else "score"
        table = Table(title=f"himap eval · {self.task} · {self.model}")
        table.add_column("configuration", overflow="fold")
        table.add_column("n", justify="right")
        table.add_column(score_name, justify="right")
        table.add_column("FLOPs ratio (exact)", justify="right")
        table.add_column("FLOPs ratio (paper)", justify="right")
        table.add_column("samples/s", justify="right")
        for c in self.configs:
            n = str(c.n_samples) + (f" ({c.n_missing} missing)" if c.n_missing else "")
            table.add_row(
                c.label,
                n,
                "-" if c.score is None else f"{c.score:.2f}",
                _pct(c.flops_ratio),
                _pct(c.flops_ratio_paper),
                "-" if c.samples_per_second is None else f"{c.samples_per_second:.2f}",
            )
        return table

    def print(self, console: Console | None = None) -> None:
        """Print :meth:`table` and where the results are."""
        from rich.console import Console

        console = console or Console()
        console.print(self.table())
        if self.prompting:
            from himap_vlm.apps.eval.prompts import describe

            console.print(describe(self.prompting), markup=False)
        console.print(f"results: {self.directory}")
        if self.summary_csv is not None:
            console.print(f"summary: {self.summary_csv}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``summary.json`` holds)."""
        return {
            "task": self.task,
            "model": self.model,
            "directory": str(self.directory),
            "summary_csv": None if self.summary_csv is None else str(self.summary_csv),
            "prompting": self.prompting,
            "configs": [c.to_dict() for c in self.configs],
        }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))
