"""Side-by-side figures of the two conventions (``himap analyze --convention both``).

Each function takes ``{"authors": result, "paper": result}`` (results of the same samples) and
writes one PNG whose panels put the conventions next to each other on comparable axes:

* :func:`compare_saliency_groups` (Fig. 3) and :func:`compare_visual_flows` (Fig. 4): the raw
  mean ± std of each convention on a shared log axis, then both conventions min-max scaled
  (the published figures' scaling; solid = authors, dashed = paper) — or, for the flows, the
  ratio ``log10(S_vt / S_vv)`` of the means per layer, whose sign says which flow dominates.
* :func:`compare_saliency_block_layers`: the nine block shares over layers for each convention on
  one colour scale, and their difference.
* :func:`compare_blocking` (Fig. 5): rows score consistency / answer retained / output unchanged,
  one column per convention, shared ``[0, 1]`` axis; the convention's label metric is marked.
* :func:`compare_bias_ratio` (Fig. 6): ``D_l`` of both conventions as paired bars.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from himap_vlm.apps.analysis.blocking_result import BlockingResult
from himap_vlm.apps.analysis.conventions import CONVENTIONS, get_convention
from himap_vlm.apps.analysis.groups import GROUPS
from himap_vlm.apps.analysis.plots import (
    COLORS,
    LABELS,
    _all_positive,
    _curves,
    _figure,
    _save,
    block_share_rows,
    blocked_layers_label,
    joint_minmax,
    window_text,
)
from himap_vlm.apps.analysis.saliency import SaliencyResult

STYLE = {"authors": "-", "paper": "--"}
TITLE = {c: get_convention(c).title for c in CONVENTIONS}
_DESCRIPTION = "side by side; conventions: authors (authors' code) and paper (paper text)"


def _pair(results: Mapping[str, Any], kind: type) -> tuple[Any, Any]:
    missing = [c for c in CONVENTIONS if c not in results]
    if missing:
        raise ValueError(f"a comparison needs results of both conventions; missing {missing}")
    for c in CONVENTIONS:
        r = results[c]
        if not isinstance(r, kind):
            raise TypeError(f"results[{c!r}] is a {type(r).__name__}, expected {kind.__name__}")
        if r.convention != c:
            raise ValueError(f"results[{c!r}] was computed with convention {r.convention!r}")
    return results["authors"], results["paper"]


def _raw_panels(axes: Any, pair: tuple[SaliencyResult, SaliencyResult], keys: tuple[str, ...], what: str,
                ylabel: str) -> None:
    log = _all_positive([r.per_layer[k] for r in pair for k in keys])
    for ax, r in zip(axes, pair, strict=True):
        _curves(ax, range(r.num_layers), {k: (r.per_layer[k], r.per_layer_std[k]) for k in keys},
                ylabel=ylabel, title=f"{TITLE[r.convention]}: {what}, raw (n={r.n_samples})", log=log)
    if log:  # one log axis for both conventions: the gap between them is part of the comparison
        lo = min(ax.get_ylim()[0] for ax in axes)
        hi = max(ax.get_ylim()[1] for ax in axes)
        for ax in axes:
            ax.set_ylim(lo, hi)


def _scaled_panel(ax: Any, pair: tuple[SaliencyResult, SaliencyResult], keys: tuple[str, ...]) -> None:
    for r in pair:
        scaled, _, _ = joint_minmax({k: r.per_layer[k] for k in keys})
        for k in keys:
            ok = np.isfinite(scaled[k])
            ax.plot(np.arange(r.num_layers)[ok], scaled[k][ok], STYLE[r.convention], marker="o", ms=3,
                    color=COLORS.get(k), label=f"{LABELS.get(k, k)} — {r.convention}")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean, min-max scaled jointly per convention")
    ax.set_title("both, scaled as the published figures\n(solid: authors' code, dashed: paper text)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=1)


def compare_saliency_groups(results: Mapping[str, SaliencyResult], path: str | Path) -> Path:
    """Fig. 3 for both conventions: raw per convention (shared log axis), then both scaled."""
    pair = _pair(results, SaliencyResult)
    fig, axes = _figure(3, 1, size=(5.2, 4.0))
    _raw_panels(axes[0, :2], pair, GROUPS, "modality importance", "saliency (mean row sum per token)")
    _scaled_panel(axes[0, 2], pair, GROUPS)
    fig.suptitle("Modality importance per layer (HiMAP Fig. 3): authors' code vs paper text", fontsize=11)
    return _save(fig, path, f"HiMAP Fig. 3; {_DESCRIPTION}")


def flow_log_ratio(result: SaliencyResult) -> np.ndarray:
    """``log10(mean S_vt / mean S_vv)`` per layer, shape (L,): > 0 where the visual→textual flow dominates."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(result.per_layer["s_vt"] / result.per_layer["s_vv"])


def compare_visual_flows(results: Mapping[str, SaliencyResult], path: str | Path) -> Path:
    """Fig. 4 for both conventions: raw ``S_vv``/``S_vt`` per convention, then ``log10(S_vt/S_vv)``."""
    pair = _pair(results, SaliencyResult)
    fig, axes = _figure(3, 1, size=(5.2, 4.0))
    _raw_panels(axes[0, :2], pair, ("s_vv", "s_vt"), "visual flows", "summed saliency")
    ax = axes[0, 2]
    for r in pair:
        ratio = flow_log_ratio(r)
        ok = np.isfinite(ratio)
        below = np.flatnonzero(ok & (ratio <= 0)).tolist()
        if not below:
            note = "S_vt > S_vv at every layer"
        elif len(below) <= 8:
            note = f"S_vv ≥ S_vt at layers {', '.join(map(str, below))}"
        else:
            note = f"S_vv ≥ S_vt at {len(below)} layers, first {below[0]}"
        ax.plot(np.arange(r.num_layers)[ok], ratio[ok], STYLE[r.convention], marker="o", ms=3,
                color=COLORS[r.convention], label=f"{TITLE[r.convention]} ({note})")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.text(0.02, 0.97, "↑ S_vt dominates", transform=ax.transAxes, va="top", fontsize=8, color="gray")
    ax.text(0.02, 0.03, "↓ S_vv dominates", transform=ax.transAxes, va="bottom", fontsize=8, color="gray")
    ax.set_xlabel("layer")
    ax.set_ylabel(r"$\log_{10}(S_{vt}/S_{vv})$ (means over samples)")
    ax.set_title("which visual flow dominates", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle("Visual information flows per layer (HiMAP Fig. 4): authors' code vs paper text", fontsize=11)
    return _save(fig, path, f"HiMAP Fig. 4; {_DESCRIPTION}")


def compare_saliency_block_layers(results: Mapping[str, SaliencyResult], path: str | Path) -> Path:
    """Block shares over layers for both conventions (one colour scale) and authors − paper."""
    pair = _pair(results, SaliencyResult)
    rows = [block_share_rows(r) for r in pair]
    n_layers = pair[0].num_layers
    fig, axes = _figure(1, 3, size=(max(6.0, 0.35 * n_layers + 3.0), 2.9))
    vmax = max(float(np.nanmax(d)) if np.isfinite(d).any() else 0.0 for d, _ in rows) or 1.0
    for ax, r, (data, labels) in zip(axes[:2, 0], pair, rows, strict=True):
        image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_yticks(range(9), labels, fontsize=7)
        ax.set_title(f"{TITLE[r.convention]}: share of layer saliency per block (source→receiver)", fontsize=9)
        fig.colorbar(image, ax=ax, label="share")
    diff = rows[0][0] - rows[1][0]
    lim = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 1.0
    ax = axes[2, 0]
    image = ax.imshow(diff, aspect="auto", cmap="RdBu_r", vmin=-(lim or 1.0), vmax=lim or 1.0)
    ax.set_yticks(range(9), rows[0][1], fontsize=7)
    ax.set_title("authors' code − paper text", fontsize=9)
    ax.set_xlabel("layer")
    fig.colorbar(image, ax=ax, label="difference of shares")
    return _save(fig, path, f"saliency block shares; {_DESCRIPTION}")


def _metric_title(r: BlockingResult, metric: str) -> str:
    conv = get_convention(r.convention)
    title = LABELS[metric]
    if metric == "answer_retained":
        title += f" ({conv.answer_rule.replace('_', '-')} rule)"
    if metric == r.label_metric:
        title += " — label consistency here"
    return title


def compare_blocking(results: Mapping[str, BlockingResult], path: str | Path) -> Path:
    """Fig. 5 for both conventions: rows = metrics, columns = conventions, shared [0, 1] axis."""
    pair = _pair(results, BlockingResult)
    metrics = ("score_consistency", "answer_retained", "output_unchanged")
    fig, axes = _figure(2, 3, size=(6.0, 3.3))
    for col, r in enumerate(pair):
        used = r.n_samples if r.n_used == r.n_samples else f"{r.n_used} of {r.n_samples}"
        for row, metric in enumerate(metrics):
            ax = axes[row, col]
            mean, std = r.mean(metric), r.std(metric)
            head = f"{TITLE[r.convention]} (n={used}, {r.max_new_tokens} new tokens)\n" if row == 0 else ""
            _curves(ax, r.layers, {f: (mean[f], std[f]) for f in r.flows}, ylabel=LABELS[metric],
                    title=head + _metric_title(r, metric), bounds=(0.0, 1.0))
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel(blocked_layers_label(r))
    fig.suptitle("Flow blocking (HiMAP Fig. 5): authors' code vs paper text", fontsize=11)
    return _save(fig, path, f"HiMAP Fig. 5; {_DESCRIPTION}")


def compare_bias_ratio(results: Mapping[str, BlockingResult], path: str | Path) -> Path | None:
    """Fig. 6 for both conventions: ``D_l`` as paired bars (``None`` unless both have img2img and img2txt)."""
    pair = _pair(results, BlockingResult)
    ratios = [r.bias_ratio() for r in pair]
    if any(v is None for v in ratios):
        return None
    fig, axes = _figure(size=(max(6.0, 0.45 * len(pair[0].layers) + 3.0), 3.8))
    ax = axes[0, 0]
    for k, (r, ratio) in enumerate(zip(pair, ratios, strict=True)):
        x = np.asarray(r.layers, dtype=float) + (k - 0.5) * 0.4
        ok = np.isfinite(ratio)
        ax.bar(x[ok], ratio[ok], width=0.4, color=COLORS[r.convention], alpha=0.85,
               label=f"{TITLE[r.convention]} (blocked: {window_text(r)})")
        for xi in x[~ok]:
            ax.annotate("n/a", (xi, 0), ha="center", va="bottom", fontsize=7, color=COLORS[r.convention],
                        rotation=90)
    ax.axhline(0.0, color="black", lw=0.8)
    layers = np.asarray(pair[0].layers)
    every = np.concatenate([np.asarray(r.layers) for r in pair])
    ax.set_xlim(every.min() - 0.7, every.max() + 0.7)  # keeps the "n/a" marks of the outer layers in view
    if len(layers) <= 40:
        ax.set_xticks(layers if len(layers) <= 16 else layers[:: max(1, len(layers) // 16)])
    ax.set_xlabel("first blocked layer l")
    ax.set_ylabel(r"$D_l = \log(E_{vv}/E_{vt})$")
    ax.set_title("Bias ratio (HiMAP Fig. 6), authors' code vs paper text\n> 0: intra-visual flow dominates",
                 fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path, f"HiMAP Fig. 6; {_DESCRIPTION}")


def save_comparison_figures(
    saliency: Mapping[str, SaliencyResult] | None,
    blocking: Mapping[str, BlockingResult] | None,
    out_dir: str | Path,
) -> list[Path]:
    """Write every side-by-side figure that the given results allow; returns the paths written."""
    out = Path(out_dir)
    paths: list[Path | None] = []
    if saliency:
        paths += [
            compare_saliency_groups(saliency, out / "compare_saliency_groups.png"),
            compare_visual_flows(saliency, out / "compare_saliency_flows.png"),
            compare_saliency_block_layers(saliency, out / "compare_saliency_blocks_layers.png"),
        ]
    if blocking:
        paths += [
            compare_blocking(blocking, out / "compare_blocking_consistency.png"),
            compare_bias_ratio(blocking, out / "compare_bias_ratio.png"),
        ]
    return [p for p in paths if p is not None]
