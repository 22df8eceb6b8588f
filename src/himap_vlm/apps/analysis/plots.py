"""Figures of the information-flow analysis, in the style of the papers' figures.

Per-layer curves show the mean over samples with a ±1 std band; heat maps show saliency block
shares (receiving group in rows, source group in columns). The saliency figures of the
``authors`` convention are drawn as the authors' ``output_example/plot_props.py`` draws Fig. 3/4:
the mean over samples of every curve of a figure, min-max scaled *jointly* (one min and one max
over all its curves), as overlapping bars (whiskers: ±1 std, same scaling). Every figure names
the convention that produced it in its title and in the PNG's ``Description`` text chunk.
Every function writes one PNG and returns its path; figures are built with
:class:`matplotlib.figure.Figure` (no pyplot state, no display needed). Side-by-side figures of
the two conventions: :mod:`himap_vlm.apps.analysis.plots_compare`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from himap_vlm.apps.analysis.attention import AttentionShareResult
from himap_vlm.apps.analysis.blocking import BlockingResult
from himap_vlm.apps.analysis.conventions import get_convention
from himap_vlm.apps.analysis.groups import GROUPS
from himap_vlm.apps.analysis.logit_lens import LogitLensResult
from himap_vlm.apps.analysis.saliency import SaliencyResult

COLORS = {
    "sys": "#7f7f7f",
    "img": "#d62728",
    "ins": "#1f77b4",
    "other": "#bcbd22",
    "s_vv": "#d62728",
    "s_vt": "#1f77b4",
    "img2txt": "#1f77b4",
    "img2img": "#d62728",
    "img2rnd": "#2ca02c",
    "none": "#7f7f7f",
    "answer_prob": "#d62728",
    "top1_prob": "#7f7f7f",
    "matches_final": "#2ca02c",
    "answer_rank": "#d62728",
    "authors": "#6a3d9a",
    "paper": "#ff7f00",
}
LABELS = {
    "sys": "system",
    "img": "image",
    "ins": "instruction",
    "other": "between images",
    "s_vv": r"$S_{vv}$ (image→image)",
    "s_vt": r"$S_{vt}$ (image→instruction)",
    "img2txt": "image→instruction blocked",
    "img2img": "image→image blocked",
    "img2rnd": "image→random blocked",
    "none": "nothing blocked",
    "answer_prob": "p(answer token)",
    "top1_prob": "p(top-1 token)",
    "matches_final": "top-1 = final prediction",
    "answer_rank": "rank of the answer token",
    "score_consistency": "score consistency (top-5 Jaccard)",
    "answer_retained": "answer retained",
    "output_unchanged": "output unchanged",
}


def convention_tag(convention: str) -> str:
    """``"authors' code convention"`` / ``"paper text convention"`` for titles."""
    return f"{get_convention(convention).title} convention"


def label_metric_title(convention: str) -> str:
    """Axis label of the convention's "label consistency" metric."""
    metric = get_convention(convention).label_metric
    return f"label consistency = {LABELS[metric]}"


def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 3.6)) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), dpi=110)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: str | Path, description: str = "", tight: bool = True) -> Path:
    """Write ``fig`` as PNG; ``description`` goes into the PNG's ``Description`` text chunk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, metadata={"Title": path.stem, "Description": description, "Software": "himap-vlm"})
    return path


def _curves(
    ax: Any,
    x: Sequence[int],
    series: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    ylabel: str,
    title: str,
    log: bool = False,
    bounds: tuple[float, float] | None = None,
) -> None:
    """Mean curves with ±std bands (clipped to ``bounds``); non-finite points (and, on a log axis,
    zeros) are skipped."""
    x = np.asarray(x)
    for name, (mean, std) in series.items():
        mean, std = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
        ok = np.isfinite(mean) & (mean > 0) if log else np.isfinite(mean)
        if not ok.any():
            continue
        color = COLORS.get(name)
        ax.plot(x[ok], mean[ok], marker="o", ms=3, lw=1.5, color=color, label=LABELS.get(name, name))
        lo, hi = mean - np.nan_to_num(std), mean + np.nan_to_num(std)
        if log:
            lo = np.where(lo > 0, lo, mean * 0.5)
        if bounds is not None:
            lo, hi = np.clip(lo, *bounds), np.clip(hi, *bounds)
        ax.fill_between(x[ok], lo[ok], hi[ok], color=color, alpha=0.18, lw=0)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(x) <= 40:
        ax.set_xticks(x if len(x) <= 16 else x[:: max(1, len(x) // 16)])
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finite values (n/a)", transform=ax.transAxes, ha="center", va="center", color="gray")


def _all_positive(values: Sequence[np.ndarray]) -> bool:
    """Whether a log axis fits: every finite value ``>= 0`` and some ``> 0`` (zeros are not drawn)."""
    vals = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values])
    vals = vals[np.isfinite(vals)]
    return bool(vals.size) and bool((vals >= 0).all()) and bool((vals > 0).any())


def joint_minmax(curves: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float, float]:
    """Scale every curve by one shared ``(x - min) / (max - min)`` over all finite values.

    The authors' ``output_example/plot_props.py`` scales the (groups × layers) array of a figure
    this way. Returns the scaled curves, ``min`` and ``max`` (a zero range scales by 1).
    """
    vals = np.concatenate([np.asarray(v, dtype=float).ravel() for v in curves.values()])
    vals = vals[np.isfinite(vals)]
    if not vals.size:
        return {k: np.asarray(v, dtype=float) for k, v in curves.items()}, float("nan"), float("nan")
    lo, hi = float(vals.min()), float(vals.max())
    scale = hi - lo if hi > lo else 1.0
    return {k: (np.asarray(v, dtype=float) - lo) / scale for k, v in curves.items()}, lo, hi


def saliency_curves(result: SaliencyResult, keys: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``(mean, std)`` per key, shape (L,) each, as the convention's saliency figures draw them.

    ``paper``: raw mean and std over samples. ``authors``: the means min-max scaled jointly over
    ``keys`` (:func:`joint_minmax`), the std divided by the same range.
    """
    mean, std = result.per_layer, result.per_layer_std
    if get_convention(result.convention).figure_scale == "raw":
        return {k: (mean[k], std[k]) for k in keys}
    scaled, lo, hi = joint_minmax({k: mean[k] for k in keys})
    rng = hi - lo if np.isfinite(hi - lo) and hi > lo else 1.0
    return {k: (scaled[k], np.asarray(std[k], dtype=float) / rng) for k in keys}


def _bars(ax: Any, x: Sequence[int], series: Mapping[str, tuple[np.ndarray, np.ndarray]], *, ylabel: str,
          title: str) -> None:
    """Overlapping bars (the authors' plot_props.py style) with ±std whiskers."""
    x = np.asarray(x)
    for name, (mean, std) in series.items():
        mean = np.asarray(mean, dtype=float)
        ok = np.isfinite(mean)
        color = COLORS.get(name)
        ax.bar(x[ok], mean[ok], width=0.75, alpha=0.35, color=color, label=LABELS.get(name, name))
        ax.errorbar(x[ok], mean[ok], yerr=np.nan_to_num(np.asarray(std, dtype=float))[ok], fmt="none",
                    ecolor=color, elinewidth=0.8, capsize=2, alpha=0.8)
    ax.set_ylim(0.0, 1.08)  # whiskers beyond the scaled range are clipped by the axes
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    if len(x) <= 40:
        ax.set_xticks(x if len(x) <= 16 else x[:: max(1, len(x) // 16)])
    ax.legend(fontsize=8)


def _saliency_panel(ax: Any, result: SaliencyResult, keys: Sequence[str], what: str, raw_label: str) -> None:
    series = saliency_curves(result, keys)
    title = f"{what} (n={result.n_samples})\n{convention_tag(result.convention)}"
    if get_convention(result.convention).figure_scale == "joint_minmax":
        title = (f"{what} (n={result.n_samples}), {convention_tag(result.convention)}\n"
                 f"{raw_label}: mean, min-max scaled jointly; whiskers ±1 std")
        _bars(ax, range(result.num_layers), series, ylabel="importance metric (scaled)", title=title)
    else:
        _curves(ax, range(result.num_layers), series, ylabel=raw_label, title=title,
                log=_all_positive([result.per_layer[k] for k in keys]))


def _description(kind: str, convention: str, extra: str = "") -> str:
    conv = get_convention(convention)
    return f"{kind}; convention: {conv.name} ({conv.title}){'; ' + extra if extra else ''}"


def plot_saliency_groups(result: SaliencyResult, path: str | Path) -> Path:
    """HiMAP Fig. 3: importance of the system / image / instruction tokens per layer."""
    fig, axes = _figure()
    _saliency_panel(axes[0, 0], result, GROUPS, "Modality importance per layer", "saliency (mean row sum per token)")
    return _save(fig, path, _description("HiMAP Fig. 3 (saliency per token group)", result.convention))


def plot_visual_flows(result: SaliencyResult, path: str | Path) -> Path:
    """HiMAP Fig. 4: intra-visual (S_vv) and visual→textual (S_vt) flow per layer."""
    fig, axes = _figure()
    _saliency_panel(axes[0, 0], result, ("s_vv", "s_vt"), "Visual information flows per layer", "summed saliency")
    return _save(fig, path, _description("HiMAP Fig. 4 (S_vv, S_vt)", result.convention))


def _default_heatmap_layers(num_layers: int, count: int = 8) -> list[int]:
    if num_layers <= count:
        return list(range(num_layers))
    return sorted({int(round(v)) for v in np.linspace(0, num_layers - 1, count)})


def plot_saliency_blocks(result: SaliencyResult, path: str | Path, layers: Sequence[int] | None = None) -> Path:
    """Saliency block heat maps (sys/img/ins × sys/img/ins) for selected layers.

    Cell ``[X, Y]``: share of the layer's total saliency on pairs with the query (receiver) in
    ``X`` and the key (source) in ``Y``, mean over samples.
    """
    layers = list(layers) if layers is not None else _default_heatmap_layers(result.num_layers)
    share = result.block_share
    ncols = min(4, len(layers))
    nrows = int(np.ceil(len(layers) / ncols))
    fig, axes = _figure(ncols, nrows, size=(2.8, 2.7))
    vmax = np.nanmax(share[layers]) if np.isfinite(share[layers]).any() else 1.0
    names = list(GROUPS)
    image = None
    for k, ax in enumerate(axes.ravel()):
        if k >= len(layers):
            ax.axis("off")
            continue
        layer = layers[k]
        data = share[layer]
        image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=vmax)
        for a in range(3):
            for b in range(3):
                if np.isfinite(data[a, b]):
                    ax.text(b, a, f"{data[a, b]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if data[a, b] < 0.6 * vmax else "black")
        ax.set_xticks(range(3), names, fontsize=7)
        ax.set_yticks(range(3), names, fontsize=7)
        ax.set_title(f"layer {layer}", fontsize=9)
        if k % ncols == 0:
            ax.set_ylabel("query (receiver)", fontsize=7)
        if k // ncols == nrows - 1:
            ax.set_xlabel("key (source)", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="share of layer saliency")
    fig.suptitle(f"Saliency blocks (n={result.n_samples}), {convention_tag(result.convention)}", fontsize=10)
    return _save(fig, path, _description("saliency block shares", result.convention), tight=False)


def block_share_rows(result: SaliencyResult) -> tuple[np.ndarray, list[str]]:
    """The nine block shares as rows over layers: (9, L) array and ``source→receiver`` labels."""
    labels = [f"{GROUPS[b]}→{GROUPS[a]}" for a in range(3) for b in range(3)]
    return result.block_share.reshape(result.num_layers, 9).T, labels


def plot_saliency_block_layers(result: SaliencyResult, path: str | Path) -> Path:
    """All nine block shares (rows) over every layer (columns) in one heat map."""
    data, labels = block_share_rows(result)
    fig, axes = _figure(size=(max(5.0, 0.35 * result.num_layers + 2.5), 3.6))
    ax = axes[0, 0]
    image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_yticks(range(9), labels, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(f"Saliency share per block (source→receiver), n={result.n_samples}\n"
                 f"{convention_tag(result.convention)}", fontsize=10)
    fig.colorbar(image, ax=ax, label="share of layer saliency")
    return _save(fig, path, _description("saliency block shares over layers", result.convention))


def window_text(result: BlockingResult) -> str:
    """Which layers a run that starts at layer ``l`` blocks, in words."""
    spans = {stop - start for start, stop in result.windows}
    if spans == {1}:
        return "layer l only"
    if all(stop == result.num_layers for _, stop in result.windows):
        return "l … last layer"
    return f"{max(spans)} layers from l"


def blocked_layers_label(result: BlockingResult) -> str:
    """x-axis label saying which layers a run blocks."""
    text = window_text(result)
    return "blocked layer" if text == "layer l only" else f"first blocked layer l (blocked: {text})"


def _used_note(result: BlockingResult) -> str:
    if result.n_used == result.n_samples:
        return f"n={result.n_samples}"
    return f"n={result.n_used} of {result.n_samples} (undisturbed correct)"


def plot_blocking(result: BlockingResult, path: str | Path) -> Path:
    """HiMAP Fig. 5: score consistency and the convention's label metric per blocked layer and flow."""
    fig, axes = _figure(2, 1)
    x = result.layers
    for ax, metric, label in (
        (axes[0, 0], "score_consistency", LABELS["score_consistency"]),
        (axes[0, 1], result.label_metric, label_metric_title(result.convention)),
    ):
        mean, std = result.mean(metric), result.std(metric)
        _curves(ax, x, {f: (mean[f], std[f]) for f in result.flows}, ylabel=label,
                title=f"{label}, {_used_note(result)}\n{convention_tag(result.convention)}", bounds=(0.0, 1.0))
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel(blocked_layers_label(result))
    return _save(fig, path, _description("HiMAP Fig. 5 (flow blocking)", result.convention,
                                         f"label metric: {result.label_metric}"))


def plot_bias_ratio(result: BlockingResult, path: str | Path) -> Path | None:
    """HiMAP Fig. 6: bias ratio ``D_l = log(E_vv / E_vt)`` per layer (``None`` without both flows)."""
    ratio = result.bias_ratio()
    if ratio is None:
        return None
    fig, axes = _figure()
    ax = axes[0, 0]
    x = np.asarray(result.layers)
    ok = np.isfinite(ratio)
    colors = ["#d62728" if v > 0 else "#1f77b4" for v in ratio[ok]]
    ax.bar(x[ok], ratio[ok], color=colors)
    ax.axhline(0.0, color="black", lw=0.8)
    for xi in x[~ok]:
        ax.annotate("n/a", (xi, 0), ha="center", va="bottom", fontsize=8, color="gray")
    ax.set_xlim(x.min() - 0.6, x.max() + 0.6)
    if len(x) <= 40:
        ax.set_xticks(x if len(x) <= 16 else x[:: max(1, len(x) // 16)])
    ax.set_xlabel(blocked_layers_label(result))
    ax.set_ylabel(r"$D_l = \log(E_{vv}/E_{vt})$")
    ax.set_title(f"Bias ratio (>0: intra-visual flow dominates), {_used_note(result)}\n"
                 f"{convention_tag(result.convention)}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path, _description("HiMAP Fig. 6 (bias ratio)", result.convention))


def plot_attention_share(result: AttentionShareResult, path: str | Path) -> Path:
    """VTW Fig. 4: the last input token's attention share per token group and layer."""
    fig, axes = _figure()
    mean, std = result.per_layer, result.per_layer_std
    groups = [g for g in result.groups if g != "other" or np.nansum(result.share[g]) > 0]
    _curves(axes[0, 0], range(result.num_layers), {g: (mean[g], std[g]) for g in groups},
            ylabel="attention share of the last token", title=f"Attention share per token group (n={result.n_samples})",
            bounds=(0.0, 1.0))
    axes[0, 0].set_ylim(-0.02, 1.02)
    return _save(fig, path)


def plot_logit_lens(result: LogitLensResult, path: str | Path) -> Path:
    """VisiPruner §3.5/§5.2: answer probability / rank and agreement with the final prediction per layer."""
    fig, axes = _figure(2, 1)
    mean, std = result.per_layer, result.per_layer_std
    x = range(result.num_layers)
    _curves(axes[0, 0], x, {"answer_prob": (mean["answer_prob"], std["answer_prob"]),
                             "top1_prob": (mean["top1_prob"], std["top1_prob"]),
                             "matches_final": (mean["matches_final"], std["matches_final"])},
            ylabel="probability / fraction", title=f"Logit lens of the last input token (n={result.n_samples})",
            bounds=(0.0, 1.0))
    axes[0, 0].set_ylim(-0.02, 1.02)
    top = result.most_common_top1()
    for layer, token in enumerate(top):
        axes[0, 0].annotate(token.strip()[:8], (layer, 1.0), ha="center", va="top", fontsize=6, rotation=90)
    _curves(axes[0, 1], x, {"answer_rank": (mean["answer_rank"], std["answer_rank"])},
            ylabel="rank of the answer token (0 = top)", title="Answer-token rank per layer",
            bounds=(0.0, float("inf")))
    return _save(fig, path)


def save_figures(results: Mapping[str, Any], out_dir: str | Path, heatmap_layers: Sequence[int] | None = None) -> list[Path]:
    """Write every figure of the given results (keys ``saliency``, ``blocking``, ``attention``,
    ``logit_lens``) to ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    paths: list[Path | None] = []
    if "saliency" in results:
        r = results["saliency"]
        paths += [
            plot_saliency_groups(r, out / "saliency_groups.png"),
            plot_visual_flows(r, out / "saliency_flows.png"),
            plot_saliency_blocks(r, out / "saliency_blocks.png", heatmap_layers),
            plot_saliency_block_layers(r, out / "saliency_blocks_layers.png"),
        ]
    if "blocking" in results:
        r = results["blocking"]
        paths += [plot_blocking(r, out / "blocking_consistency.png"), plot_bias_ratio(r, out / "bias_ratio.png")]
    if "attention" in results:
        paths.append(plot_attention_share(results["attention"], out / "attention_share.png"))
    if "logit_lens" in results:
        paths.append(plot_logit_lens(results["logit_lens"], out / "logit_lens.png"))
    return [p for p in paths if p is not None]
