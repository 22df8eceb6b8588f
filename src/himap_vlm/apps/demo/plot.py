"""The demo's figure: accuracy against the prefill FLOPs ratio, one series per method."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .results import DemoResult

__all__ = ["plot_demo"]

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
