"""Evaluate a trained tiny LLaVA (or smol-llava, or any LLaVA folder) on held-out synthetic scene-QA questions (CPU, offline).

Greedy generation (a few tokens) from the chat-template prompt of each test question, scored
with :func:`himap_vlm.apps.data.synthetic.score`; reported per question family, for the real images
(``dense``) and for blank images of the plain background (``blank``: what the model answers
without looking, i.e. the language prior). A model that uses the image has ``dense`` far above
``blank``.

Example::

    .venv/bin/python scripts/eval_tiny_llava.py runs/tiny-llava/final --n 1000 \\
        --json runs/tiny-llava/eval_test.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from himap_vlm.apps.data.synthetic import FAMILIES, SceneQAConfig, load_synthetic, score
from himap_vlm.models import resolve_model
from himap_vlm.models.tiny_llava import load_trained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "model", type=Path, help="directory written by save_pretrained (e.g. runs/tiny-llava/final)"
    )
    p.add_argument("--split", default="test", choices=["test", "validation"])
    p.add_argument("--n", type=int, default=1000, help="number of questions")
    p.add_argument("--seed", type=int, default=0, help="benchmark seed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-blank", action="store_true", help="skip the blank-image run")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def chat_prompt(processor, question: str) -> str:
    """The prompt of one question, through the processor's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def generate_answers(
    model, processor, records: list[dict[str, Any]], *, blank: bool, batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy answers for the records (left-padded batches)."""
    out: list[str] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [Image.new("RGB", r["image"].size, (32, 32, 32)) if blank else r["image"] for r in chunk]
        texts = [chat_prompt(processor, r["question"]) for r in chunk]
        enc = processor(images=images, text=texts, padding=True, return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        new = gen[:, enc["input_ids"].shape[1] :]
        out.extend(processor.tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


def accuracy_table(records: list[dict[str, Any]], predictions: list[str]) -> dict[str, Any]:
    """Accuracy per family and overall, plus per question type."""
    fam: dict[str, list[bool]] = defaultdict(list)
    qtype: dict[str, list[bool]] = defaultdict(list)
    for r, p in zip(records, predictions, strict=True):
        ok = score(p, r["answer"], r["family"])
        fam[r["family"]].append(ok)
        qtype[r["qtype"]].append(ok)
    result: dict[str, Any] = {f: float(np.mean(fam[f])) for f in FAMILIES if f in fam}
    result["all"] = float(np.mean([h for v in fam.values() for h in v]))
    result["counts"] = {f: len(fam[f]) for f in FAMILIES if f in fam}
    result["by_qtype"] = {k: float(np.mean(v)) for k, v in sorted(qtype.items())}
    return result


def markdown(dense: dict[str, Any], blank: dict[str, Any] | None) -> str:
    """A per-family Markdown table (dense and blank-image accuracy, %)."""
    lines = ["| family | n | dense | blank image |", "|---|---:|---:|---:|"]
    for f in [*FAMILIES, "all"]:
        if f not in dense:
            continue
        n = dense["counts"].get(f, sum(dense["counts"].values()))
        b = f"{100 * blank[f]:.1f}" if blank else "-"
        lines.append(f"| {f} | {n} | {100 * dense[f]:.1f} | {b} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation and print the table."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    model, processor = load_trained(resolve_model(args.model))  # a folder or a named model (smol-llava)
    size = model.config.vision_config.image_size
    records = load_synthetic(args.split, args.n, SceneQAConfig(image_size=size, seed=args.seed))
    t0 = time.perf_counter()
    dense_pred = generate_answers(
        model, processor, records, blank=False, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens
    )
    dense = accuracy_table(records, dense_pred)
    blank = None
    if not args.no_blank:
        blank_pred = generate_answers(
            model,
            processor,
            records,
            blank=True,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
        blank = accuracy_table(records, blank_pred)
    seconds = time.perf_counter() - t0
    print(
        f"model {args.model}; {args.split} split, {len(records)} questions, seed {args.seed}; {seconds:.0f} s"
    )
    print(markdown(dense, blank))
    for r, p in list(zip(records, dense_pred, strict=True))[:5]:
        print(f"  {r['question'].splitlines()[0]!r} -> {p!r} (answer {r['answer']!r})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": str(args.model),
            "split": args.split,
            "n": len(records),
            "seed": args.seed,
            "dense": dense,
            "blank": blank,
            "seconds": round(seconds, 1),
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
