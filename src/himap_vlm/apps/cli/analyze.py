"""``himap analyze``: the information-flow analysis of the papers on a model and a data file.

Writes one JSON file per measurement (``saliency.json``, ``blocking.json``,
``attention_share.json``, ``logit_lens.json``), a ``analysis.json`` index, and PNG figures
(see :mod:`himap_vlm.apps.analysis.plots` and ``docs/analysis.md``).

``--convention authors`` (default; the HiMAP authors' code, which made the published figures) or
``paper`` (the paper's text) selects how the saliency and the flow blocking are computed
(:mod:`himap_vlm.apps.analysis.conventions`). ``both`` computes each: the saliency and blocking
files and figures of each convention go to ``OUT/authors/`` and ``OUT/paper/``, the side-by-side
figures (``compare_*.png``, :mod:`himap_vlm.apps.analysis.plots_compare`) and the
convention-free measurements (attention share, logit lens) to ``OUT/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from himap_vlm.apps.cli._app import app
from himap_vlm.apps.cli._common import fail, load_model

MEASUREMENTS = ("saliency", "blocking", "attention", "logit-lens")
BY_CONVENTION = ("saliency", "blocking")
"""Measurements whose definition depends on the convention."""
CONVENTION_CHOICES = ("authors", "paper", "both")
_FILES = {
    "saliency": "saliency.json",
    "blocking": "blocking.json",
    "attention": "attention_share.json",
    "logit-lens": "logit_lens.json",
}


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text: str | None, option: str) -> list[int] | None:
    if text is None or text.strip().lower() in ("", "all"):
        return None
    try:
        return [int(t) for t in _split(text)]
    except ValueError:
        fail(f"{option} expects comma-separated layer numbers or 'all'; got {text!r}")
    return None  # pragma: no cover


def _fmt(x: Any, digits: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if v != v or v in (float("inf"), float("-inf")):
        return "n/a"
    return f"{v:.{digits}g}" if abs(v) < 1e-2 and v != 0 else f"{v:.{digits}f}"


@app.command("analyze")
def analyze(
    model: str = typer.Option(..., "--model", help="Local model directory, a named model (tiny-llava, smol-llava), or a hub id when online."),
    data: Path = typer.Option(..., "--data", help="JSON/JSONL list of {image, question, answer} records."),
    out: Path = typer.Option(..., "--out", help="Output directory (JSON + PNG figures)."),
    what: str = typer.Option(
        ",".join(MEASUREMENTS), "--what", help="Comma-separated: saliency, blocking, attention, logit-lens."
    ),
    n: int | None = typer.Option(None, "--n", min=1, help="Use the first N records (default: all)."),
    convention: str = typer.Option(
        "authors", "--convention",
        help="authors (the HiMAP authors' code, which made the published figures), paper (the paper's text), "
        "or both (each, plus side-by-side figures).",
    ),
    layers: str | None = typer.Option(
        None, "--layers", help="Blocking: first blocked layer of each run, comma-separated or 'all'."
    ),
    flows: str = typer.Option("img2txt,img2img,img2rnd", "--flows", help="Blocking: img2txt, img2img, img2rnd, none."),
    span: int | None = typer.Option(
        None, "--span", min=1,
        help="Blocking: layers blocked per run (default: the convention's; authors: to the last layer, paper: 1).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the img2rnd control."),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", min=1, help="Blocking: greedy tokens per run (default: authors 8, paper 5)."
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Blocking: runs of a sample generated together."),
    heatmap_layers: str | None = typer.Option(
        None, "--heatmap-layers", help="Saliency block heat maps: layers to show (default: up to 8, evenly spaced)."
    ),
    attn_implementation: str | None = typer.Option(None, "--attn-implementation", help="Load with sdpa, eager, ..."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
) -> None:
    """Saliency, flow blocking, attention share and logit lens per layer, averaged over a data file."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from himap_vlm.apps import analysis
    from himap_vlm.apps.analysis._common import AnalysisSession
    from himap_vlm.apps.analysis.conventions import check_targets
    from himap_vlm.apps.analysis.masking import FLOWS
    from himap_vlm.apps.analysis.plots import save_figures
    from himap_vlm.apps.analysis.plots_compare import save_comparison_figures
    from himap_vlm.apps.data.synthetic import read_jsonl

    chosen = _split(what.replace("logit_lens", "logit-lens"))
    unknown = [w for w in chosen if w not in MEASUREMENTS]
    if unknown or not chosen:
        fail(f"--what: unknown measurement(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MEASUREMENTS)}")
    if convention not in CONVENTION_CHOICES:
        fail(f"--convention: unknown convention {convention!r}; choose from {', '.join(CONVENTION_CHOICES)}")
    conventions = ["authors", "paper"] if convention == "both" else [convention]
    flow_list = _split(flows)
    bad = [f for f in flow_list if f not in FLOWS]
    if bad or not flow_list:
        fail(f"--flows: unknown flow(s) {', '.join(bad) or '(none)'}; choose from {', '.join(FLOWS)}")
    block_layers = _int_list(layers, "--layers")
    heat_layers = _int_list(heatmap_layers, "--heatmap-layers")
    try:
        records = read_jsonl(data)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    if not records:
        fail(f"{data} holds no records")
    records = records[:n] if n else records
    net, processor = load_model(model, attn_implementation, dtype)
    try:
        net.to(torch.device(device))
    except (RuntimeError, AssertionError) as exc:
        fail(f"cannot move the model to {device!r}: {exc}")
    num_layers = AnalysisSession(net).num_layers
    for name, chosen_layers in (("--layers", block_layers), ("--heatmap-layers", heat_layers)):
        for layer in chosen_layers or []:
            if not -num_layers <= layer < num_layers:
                fail(f"{name}: layer {layer} is out of range for a model with {num_layers} decoder layers")
    if heat_layers is not None:
        heat_layers = sorted({layer % num_layers for layer in heat_layers})
    if "saliency" in chosen:  # fail before any model run when a record has no target token
        for conv in conventions:
            try:
                check_targets(processor, [str(r.get("answer", "")) for r in records], conv)
            except ValueError as exc:
                fail(f"saliency ({conv} convention): {exc}")

    console = Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    # (measurement, convention or None) -> result
    results: dict[tuple[str, str | None], Any] = {}
    timings: dict[str, float] = {}
    files: dict[str, Any] = {}

    def runner(name: str, conv: str | None) -> Any:
        if name == "saliency":
            return lambda cb: analysis.saliency(net, processor, records, convention=conv, progress=cb)
        if name == "blocking":
            return lambda cb: analysis.flow_blocking(
                net, processor, records, layers=block_layers, flows=flow_list, convention=conv, span=span,
                seed=seed, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=cb,
            )
        if name == "attention":
            return lambda cb: analysis.attention_share(net, processor, records, progress=cb)
        return lambda cb: analysis.logit_lens(net, processor, records, progress=cb)

    jobs: list[tuple[str, str | None]] = []
    for name in MEASUREMENTS:
        if name in chosen:
            jobs += [(name, c) for c in conventions] if name in BY_CONVENTION else [(name, None)]
    both = len(conventions) > 1
    with Progress(
        TextColumn("[bold]{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        for name, conv in jobs:
            label = name if conv is None else f"{name} ({conv})"
            task = bar.add_task(label, total=len(records))
            t0 = time.perf_counter()
            try:
                result = runner(name, conv)(lambda k, task=task: bar.advance(task, k))
            except ValueError as exc:
                fail(f"{label}: {exc}")
            timings[label] = time.perf_counter() - t0
            results[(name, conv)] = result
            rel = f"{conv}/{_FILES[name]}" if both and conv is not None else _FILES[name]
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False))
            if conv is not None and both:
                files.setdefault(name, {})[conv] = rel
            else:
                files[name] = rel

    def figure_key(name: str) -> str:
        return {"logit-lens": "logit_lens"}.get(name, name)

    figures: list[Path] = []
    for conv in conventions:  # each convention's own figures (in its sub-directory when both)
        own = {figure_key(k): v for (k, c), v in results.items() if c == conv}
        if not both:
            own.update({figure_key(k): v for (k, c), v in results.items() if c is None})
        figures += save_figures(own, out / conv if both else out, heatmap_layers=heat_layers)
    if both:
        figures += save_figures({figure_key(k): v for (k, c), v in results.items() if c is None}, out)
        figures += save_comparison_figures(
            {c: results[("saliency", c)] for c in conventions} if "saliency" in chosen else None,
            {c: results[("blocking", c)] for c in conventions} if "blocking" in chosen else None,
            out,
        )
    index = {
        "model": model,
        "data": str(data),
        "n_samples": len(records),
        "num_layers": num_layers,
        "convention": convention,
        "measurements": [m for m in MEASUREMENTS if m in chosen],
        "files": files,
        "figures": [str(p.relative_to(out)) for p in figures],
        "seconds": timings,
    }
    (out / "analysis.json").write_text(json.dumps(index, indent=1))
    for (name, conv), result in results.items():
        _print_summary(Console(), name, conv, result, Table)
    Console().print(f"wrote {len(results)} JSON file(s) and {len(figures)} figure(s) to {out}")


def _print_summary(console: Any, name: str, conv: str | None, r: Any, table_cls: Any) -> None:
    tag = "" if conv is None else f", {conv} convention"
    if name == "saliency":
        m = r.per_layer
        t = table_cls(title=f"saliency (n={r.n_samples}; mean over samples{tag})")
        for col in ("layer", "sys", "img", "ins", "S_vv", "S_vt"):
            t.add_column(col, justify="right")
        for layer in range(r.num_layers):
            t.add_row(str(layer), *(_fmt(m[k][layer]) for k in ("sys", "img", "ins", "s_vv", "s_vt")))
        console.print(t)
    elif name == "blocking":
        sc = r.mean("score_consistency")
        lc = r.label_consistency
        ratio = r.bias_ratio()
        used = f"n={r.n_samples}" if r.n_used == r.n_samples else f"n={r.n_used} of {r.n_samples} answered correctly"
        t = table_cls(title=f"flow blocking ({used}; score consistency / {r.label_metric}{tag})")
        t.add_column("layer", justify="right")
        for f in r.flows:
            t.add_column(f, justify="right")
        if ratio is not None:
            t.add_column("D_l", justify="right")
        for j, layer in enumerate(r.layers):
            row = [str(layer)] + [f"{_fmt(sc[f][j], 2)} / {_fmt(lc[f][j], 2)}" for f in r.flows]
            if ratio is not None:
                row.append(_fmt(ratio[j], 2))
            t.add_row(*row)
        console.print(t)
        if r.n_used == 0:
            console.print(f"[yellow]blocking{tag}: no sample is answered correctly undisturbed, so the authors' "
                          "means are undefined (n/a); the per-sample values are in the JSON[/yellow]")
    elif name == "attention":
        m = r.per_layer
        t = table_cls(title=f"attention share of the last token (n={r.n_samples})")
        for col in ("layer", *r.groups):
            t.add_column(col, justify="right")
        for layer in range(r.num_layers):
            t.add_row(str(layer), *(_fmt(m[g][layer]) for g in r.groups))
        console.print(t)
    elif name == "logit-lens":
        m = r.per_layer
        top = r.most_common_top1()
        t = table_cls(title=f"logit lens of the last token (n={r.n_samples})")
        for col in ("layer", "answer prob", "answer rank", "= final top-1", "most common top-1"):
            t.add_column(col, justify="right")
        for layer in range(r.num_layers):
            t.add_row(str(layer), _fmt(m["answer_prob"][layer]), _fmt(m["answer_rank"][layer], 1),
                      _fmt(m["matches_final"][layer], 2), repr(top[layer]))
        console.print(t)
