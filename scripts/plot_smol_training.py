"""Learning curves of the smol-llava recipe: training loss and validation accuracy per family.

Reads each phase's ``train.log`` (``step N loss X`` lines) and ``history.jsonl`` (one validation per
line), written by ``scripts/train_smol_llava.py``, and draws them on one step axis (phases one after
the other) next to the 90 % bar of the issue that asked for the model::

    .venv/bin/python scripts/plot_smol_training.py runs/smol-llava runs/smol-llava-p2 \\
        --out docs/study/smol-llava/training_curves.png

Also writes the numbers as JSON next to the figure (same name, ``.json``).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSS_LINE = re.compile(r"\] step (\d+) loss ([0-9.]+)")
FAMILIES = ("exists", "attribute", "count", "spatial", "choice")
QUALITY_BAR = 0.90


def read_phase(run: Path) -> dict:
    """Loss and validation history of one phase's output folder."""
    loss = {}
    log = run / "train.log"
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            match = LOSS_LINE.search(line)
            if match:
                loss[int(match.group(1))] = float(match.group(2))  # a resumed run repeats steps: last wins
    history = []
    if (run / "history.jsonl").is_file():
        history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]
    return {"run": str(run), "loss": sorted(loss.items()), "val": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="phase output folders, in recipe order")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()
    phases = [read_phase(run) for run in args.runs]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.2))
    offset = 0
    for i, phase in enumerate(phases):
        if phase["loss"]:
            steps, values = zip(*phase["loss"], strict=True)
            ax_loss.plot([offset + s for s in steps], values, color=f"C{i}", label=Path(phase["run"]).name)
        for family_index, family in enumerate((*FAMILIES, "all")):
            points = [(offset + h["step"], h["val"][family]) for h in phase["val"] if family in h["val"]]
            if points:
                xs, ys = zip(*points, strict=True)
                style = {"color": "black", "linewidth": 2.5} if family == "all" else {"color": f"C{family_index}"}
                ax_acc.plot(xs, ys, marker="o", label=family if i == 0 else None, **style)
        last = max([s for s, _ in phase["loss"]] + [h["step"] for h in phase["val"]], default=0)
        if i < len(phases) - 1:
            ax_loss.axvline(offset + last, color="grey", linestyle=":")
            ax_acc.axvline(offset + last, color="grey", linestyle=":")
        offset += last
    ax_acc.axhline(QUALITY_BAR, color="red", linestyle="--", label="bar (90 %)")
    ax_loss.set(xlabel="training step (phases concatenated)", ylabel="loss (answer tokens)", title="training loss")
    ax_acc.set(
        xlabel="training step (phases concatenated)",
        ylabel="validation accuracy",
        ylim=(0, 1),
        title="validation accuracy per family (first answer token)",
    )
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    args.out.with_suffix(".json").write_text(json.dumps(phases, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
