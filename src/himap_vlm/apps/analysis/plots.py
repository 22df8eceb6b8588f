"""Figures of the information-flow analysis, in the style of the papers' figures.

Per-layer curves show the mean over samples with a ±1 std band; heat maps show saliency block
shares (receiving group in rows, source group in columns). Every function writes one PNG and
returns its path; figures are built with :class:`matplotlib.figure.Figure` (no pyplot state, no
display needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from himap_vlm.apps.analysis.attention import AttentionShareResult
from himap_vlm.apps.analysis.blocking import BlockingResult
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
}


def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 3.6)) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), dpi=110)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
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
    """Mean curves with ±std bands (clipped to ``bounds``); non-finite points are skipped."""
    x = np.asarray(x)
    for name, (mean, std) in series.items():
        mean, std = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
        ok = np.isfinite(mean)
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
    ax.legend(fontsize=8)


def _all_positive(result: SaliencyResult, keys: Sequence[str]) -> bool:
    vals = np.concatenate([np.asarray(result.per_layer[k]).ravel() for k in keys])
    vals = vals[np.isfinite(vals)]
    return bool(vals.size) and bool((vals > 0).all())


def plot_saliency_groups(result: SaliencyResult, path: str | Path) -> Path:
    """HiMAP Fig. 3: importance of the system / image / instruction tokens per layer (log scale)."""
    fig, axes = _figure()
    mean, std = result.per_layer, result.per_layer_std
    _curves(
        axes[0, 0],
        range(result.num_layers),
        {g: (mean[g], std[g]) for g in GROUPS},
        ylabel="saliency (mean row sum per token)",
        title=f"Modality importance per layer (n={result.n_samples})",
        log=_all_positive(result, GROUPS),
    )
    return _save(fig, path)


def plot_visual_flows(result: SaliencyResult, path: str | Path) -> Path:
    """HiMAP Fig. 4: intra-visual (S_vv) and visual→textual (S_vt) flow per layer."""
    fig, axes = _figure()
    mean, std = result.per_layer, result.per_layer_std
    _curves(
        axes[0, 0],
        range(result.num_layers),
        {k: (mean[k], std[k]) for k in ("s_vv", "s_vt")},
        ylabel="summed saliency",
        title=f"Visual information flows per layer (n={result.n_samples})",
        log=_all_positive(result, ("s_vv", "s_vt")),
    )
    return _save(fig, path)


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
    names = [g for g in GROUPS]
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
    fig.suptitle(f"Saliency blocks (n={result.n_samples})", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_saliency_block_layers(result: SaliencyResult, path: str | Path) -> Path:
    """All nine block shares (rows) over every layer (columns) in one heat map."""
    share = result.block_share  # (L, 3, 3)
    labels = [f"{GROUPS[b]}→{GROUPS[a]}" for a in range(3) for b in range(3)]
    data = share.reshape(result.num_layers, 9).T
    fig, axes = _figure(size=(max(5.0, 0.35 * result.num_layers + 2.5), 3.6))
    ax = axes[0, 0]
    image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_yticks(range(9), labels, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(f"Saliency share per block (source→receiver), n={result.n_samples}", fontsize=10)
    fig.colorbar(image, ax=ax, label="share of layer saliency")
    return _save(fig, path)


def plot_blocking(result: BlockingResult, path: str | Path) -> Path:
    """HiMAP Fig. 5: score and label consistency after blocking each flow at each layer."""
    fig, axes = _figure(2, 1)
    x = result.layers
    for ax, metric, label in (
        (axes[0, 0], "score_consistency", "score consistency (top-5 Jaccard)"),
        (axes[0, 1], "label_consistency", "label consistency"),
    ):
        mean, std = result.mean(metric), result.std(metric)
        _curves(ax, x, {f: (mean[f], std[f]) for f in result.flows}, ylabel=label,
                title=f"{label}, n={result.n_samples}, span={result.span}", bounds=(0.0, 1.0))
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("blocked layer" if result.span == 1 else f"first blocked layer (+{result.span - 1})")
    return _save(fig, path)


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
    ax.set_xlabel("blocked layer")
    ax.set_ylabel(r"$D_l = \log(E_{vv}/E_{vt})$")
    ax.set_title(f"Bias ratio (>0: intra-visual flow dominates), n={result.n_samples}", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


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
