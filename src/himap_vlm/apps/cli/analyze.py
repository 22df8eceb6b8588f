"""``himap analyze``: the information-flow analysis of the papers on a model and a data file.

Writes one JSON file per measurement (``saliency.json``, ``blocking.json``,
``attention_share.json``, ``logit_lens.json``), a ``analysis.json`` index, and PNG figures
(see :mod:`himap_vlm.apps.analysis.plots` and ``docs/analysis.md``).
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
    model: str = typer.Option(..., "--model", help="Local model directory (or hub id when online)."),
    data: Path = typer.Option(..., "--data", help="JSON/JSONL list of {image, question, answer} records."),
    out: Path = typer.Option(..., "--out", help="Output directory (JSON + PNG figures)."),
    what: str = typer.Option(
        ",".join(MEASUREMENTS), "--what", help="Comma-separated: saliency, blocking, attention, logit-lens."
    ),
    n: int | None = typer.Option(None, "--n", min=1, help="Use the first N records (default: all)."),
    layers: str | None = typer.Option(None, "--layers", help="Blocking: layers to block, comma-separated or 'all'."),
    flows: str = typer.Option("img2txt,img2img,img2rnd", "--flows", help="Blocking: img2txt, img2img, img2rnd, none."),
    span: int = typer.Option(1, "--span", min=1, help="Blocking: consecutive layers blocked per run."),
    seed: int = typer.Option(0, "--seed", help="Seed of the img2rnd control."),
    max_new_tokens: int = typer.Option(5, "--max-new-tokens", min=1, help="Blocking: greedy tokens per run."),
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
    from himap_vlm.apps.analysis.blocking import FLOWS
    from himap_vlm.apps.analysis.plots import save_figures
    from himap_vlm.apps.data.synthetic import read_jsonl

    chosen = _split(what.replace("logit_lens", "logit-lens"))
    unknown = [w for w in chosen if w not in MEASUREMENTS]
    if unknown or not chosen:
        fail(f"--what: unknown measurement(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MEASUREMENTS)}")
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

    console = Console(stderr=True)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    runners = {
        "saliency": lambda cb: analysis.saliency(net, processor, records, progress=cb),
        "blocking": lambda cb: analysis.flow_blocking(
            net, processor, records, layers=block_layers, flows=flow_list, span=span, seed=seed,
            max_new_tokens=max_new_tokens, batch_size=batch_size, progress=cb,
        ),
        "attention": lambda cb: analysis.attention_share(net, processor, records, progress=cb),
        "logit-lens": lambda cb: analysis.logit_lens(net, processor, records, progress=cb),
    }
    with Progress(
        TextColumn("[bold]{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        for name in MEASUREMENTS:
            if name not in chosen:
                continue
            task = bar.add_task(name, total=len(records))
            t0 = time.perf_counter()
            try:
                result = runners[name](lambda k, task=task: bar.advance(task, k))
            except ValueError as exc:
                fail(f"{name}: {exc}")
            timings[name] = time.perf_counter() - t0
            results[name] = result
            (out / _FILES[name]).write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False))

    figures = save_figures(
        {{"logit-lens": "logit_lens"}.get(k, k): v for k, v in results.items()}, out, heatmap_layers=heat_layers
    )
    index = {
        "model": model,
        "data": str(data),
        "n_samples": len(records),
        "num_layers": num_layers,
        "measurements": list(results),
        "files": {k: _FILES[k] for k in results},
        "figures": [p.name for p in figures],
        "seconds": timings,
    }
    (out / "analysis.json").write_text(json.dumps(index, indent=1))
    _print_summary(Console(), results, Table)
    Console().print(f"wrote {len(results)} JSON file(s) and {len(figures)} figure(s) to {out}")


def _print_summary(console: Any, results: dict[str, Any], table_cls: Any) -> None:
    if "saliency" in results:
        r = results["saliency"]
        m = r.per_layer
        t = table_cls(title=f"saliency (n={r.n_samples}; mean over samples)")
        for col in ("layer", "sys", "img", "ins", "S_vv", "S_vt"):
            t.add_column(col, justify="right")
        for layer in range(r.num_layers):
            t.add_row(str(layer), *(_fmt(m[k][layer]) for k in ("sys", "img", "ins", "s_vv", "s_vt")))
        console.print(t)
    if "blocking" in results:
        r = results["blocking"]
        sc = r.mean("score_consistency")
        lc = r.mean("label_consistency")
        ratio = r.bias_ratio()
        t = table_cls(title=f"flow blocking (n={r.n_samples}; score / label consistency)")
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
    if "attention" in results:
        r = results["attention"]
        m = r.per_layer
        t = table_cls(title=f"attention share of the last token (n={r.n_samples})")
        for col in ("layer", *r.groups):
            t.add_column(col, justify="right")
        for layer in range(r.num_layers):
            t.add_row(str(layer), *(_fmt(m[g][layer]) for g in r.groups))
        console.print(t)
    if "logit-lens" in results:
        r = results["logit-lens"]
        m = r.per_layer
        top = r.most_common_top1()
        t = table_cls(title=f"logit lens of the last token (n={r.n_samples})")
        for col in ("layer", "answer prob", "answer rank", "= final top-1", "most common top-1"):
            t.add_column(col, justify="right")
        for layer in range(r.num_layers):
            t.add_row(str(layer), _fmt(m["answer_prob"][layer]), _fmt(m["answer_rank"][layer], 1),
                      _fmt(m["matches_final"][layer], 2), repr(top[layer]))
        console.print(t)
