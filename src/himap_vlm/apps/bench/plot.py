"""The benchmark plot: measured speedups against the FLOPs ratio, next to the ideal 1/x."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from himap_vlm.apps.bench.summary import BenchResult

__all__ = ["as_dicts", "plot_speedup"]

_MARKERS = "osD^vP*X<>"


def as_dicts(results: Sequence[BenchResult | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Results as the dicts of ``bench.json``'s ``runs`` (``BenchResult.to_dict()``)."""
    return [r.to_dict() if isinstance(r, BenchResult) else dict(r) for r in results]


def plot_speedup(
    results: Sequence[BenchResult | Mapping[str, Any]], path: str | Path, title: str | None = None
) -> Path:
    """Write a PNG of measured speedups against the exact prefill FLOPs ratio.

    Left: the language-model prefill speedup (median of paired ratios vs dense, quartile bars)
    next to the FLOPs-ideal ``1 / ratio``. Right: the end-to-end speedup (prefill and every
    generated token), where the reference-style rows pay for having no KV cache.

    Parameters
    ----------
    results : sequence of BenchResult or dict
        One per model / image-token count (a sweep gives several: colours tell them apart);
        dicts as in ``bench.json``'s ``runs``.
    path : str or Path
        Output file (``.png``).
    title : str, optional

    Returns
    -------
    Path
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs = as_dicts(results)
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(12.0, 5.6), dpi=120)
    xs = [s["flops_ratio"] for r in runs for s in r["summary"]]
    lo = max(0.02, min([*xs, 1.0]) * 0.8)
    grid = [lo + (1.05 - lo) * i / 200 for i in range(201)]
    methods = list(dict.fromkeys(s["method"] for r in runs for s in r["summary"]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = (
        ("prefill_speedup", "language-model prefill speedup vs dense"),
        ("e2e_speedup", "end-to-end speedup vs dense"),
    )
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        ax.plot(grid, [1 / x for x in grid], color="0.5", lw=1, ls="--", label="FLOPs-ideal (1 / ratio)")
        ax.axhline(1.0, color="0.8", lw=0.8)
        for k, run in enumerate(runs):
            colour = colours[k % len(colours)]
            n_img = run["settings"].get("image_tokens")
            for s in run["summary"]:
                sp = s[key]
                if sp["median"] is None:
                    continue
                marker = _MARKERS[methods.index(s["method"]) % len(_MARKERS)]
                ref = s["style"] == "reference"
                yerr = [[sp["median"] - sp["p25"]], [sp["p75"] - sp["median"]]]
                ax.errorbar(
                    s["flops_ratio"],
                    sp["median"],
                    yerr=yerr,
                    fmt=marker,
                    color=colour,
                    mfc="none" if ref else colour,
                    ms=8,
                    capsize=3,
                    label=f"{s['row']} · {n_img} img tokens" if len(runs) > 1 else s["row"],
                )
        ax.set_xlabel("prefill FLOPs ratio (exact convention, pruned / dense)")
        ax.set_ylabel(f"{ylabel} (median, IQR)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    ncol = 4 if len(runs) > 1 else 7
    rows = -(-len(labels) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    axes[0].set_title("prefill: measured vs FLOPs-ideal", fontsize=10)
    axes[1].set_title("end to end (prefill + generated tokens)", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, min(0.4, 0.035 * rows + 0.02), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
