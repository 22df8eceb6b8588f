"""Train the tiny LLaVA of himap from scratch on the synthetic scene-QA benchmark (CPU).

The model is a stock :class:`~transformers.LlavaForConditionalGeneration` (shape in
:class:`himap_vlm.models.tiny_llava.TrainedTinyLlavaSpec`: 48 px images, patch 4 -> 144 image tokens,
CLIP vision tower, 8-layer Llama text model). Training data are fresh train-split scenes
every step (the train split is effectively infinite), each scene written as a multi-turn
conversation with one question per family in random order; the loss is on answer tokens
(and the EOS after them) only. AdamW, linear warmup then cosine decay.

Reproducible: batch ``s`` is a pure function of ``(--seed, s)``, the initialisation of
``--seed``. Resumable: ``--out-dir/checkpoint.pt`` (model, optimizer, RNG states, step,
elapsed time, history) is written every ``--ckpt-minutes`` and read back automatically when
the script is started again with the same ``--out-dir``.

Outputs in ``--out-dir``: ``checkpoint.pt``, ``best/`` (``save_pretrained`` of the model with
the best validation accuracy so far, plus processor files), ``final/`` (at the end),
``history.jsonl`` (one line per validation), and the log on stdout.

A run can start from the weights of an earlier one (``--init-from DIR``, its ``best/`` or
``final/``) with its own data mix and schedule; the shipped model is five such phases, run by
``scripts/train_tiny_llava_recipe.sh`` (``make train-model``; the why of each phase is in
``scripts/MODEL_CARD.md``).

Example (one run)::

    nohup nice -n 10 .venv/bin/python scripts/train_tiny_llava.py --out-dir runs/tiny-llava \\
        --threads 1 > runs/tiny-llava/train.log 2>&1 &
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from training_common import log, record_validation, save_checkpoint

from himap_vlm.apps.data.synthetic import (
    COLORS,
    FAMILIES,
    NUMBER_WORDS,
    RELATIONS,
    SHAPES,
    SIZES,
    SceneQAConfig,
    generate_questions,
    generate_scenes,
    load_synthetic,
)
from himap_vlm.models.tiny_llava import (
    TrainedTinyLlavaSpec,
    build_model,
    build_processor,
    format_conversation,
    format_prompt,
)

CHUNK_SCENES = 4096  # training scenes are generated in chunks of this many (one config seed each)
DESCRIBE_QUESTION = "What is in the image?"
RELATION_WORDS = tuple(r.split()[0] for r in RELATIONS)  # left, right, above, below: spatial_<word> qtypes


def describe(objects: list[dict[str, Any]], positions: bool = False) -> str:
    """Scene description used as an auxiliary training answer: objects in reading order.

    ``"small red circle . large blue square"`` (objects sorted by grid row, then column); with
    ``positions``, each object is followed by its grid row and column as number words
    (``"small red circle one three"``: first row, third column), so that answering needs the
    position of each object read from the image -- the retrieval the spatial questions need.
    """
    ordered = sorted(objects, key=lambda o: (o["row"], o["col"]))
    where = (lambda o: f" {NUMBER_WORDS[o['row']]} {NUMBER_WORDS[o['col']]}") if positions else (lambda o: "")
    return " . ".join(f"{o['size']} {o['color']} {o['shape']}{where(o)}" for o in ordered)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    spec = TrainedTinyLlavaSpec()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0, help="init, data and everything else")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    # shape
    p.add_argument("--image-size", type=int, default=spec.image_size)
    p.add_argument("--patch-size", type=int, default=spec.patch_size)
    p.add_argument("--vision-hidden", type=int, default=spec.vision_hidden)
    p.add_argument("--vision-intermediate", type=int, default=spec.vision_intermediate)
    p.add_argument("--vision-layers", type=int, default=spec.vision_layers)
    p.add_argument("--vision-heads", type=int, default=spec.vision_heads)
    p.add_argument("--hidden-size", type=int, default=spec.hidden_size)
    p.add_argument("--intermediate-size", type=int, default=spec.intermediate_size)
    p.add_argument("--num-layers", type=int, default=spec.num_layers)
    p.add_argument("--num-heads", type=int, default=spec.num_heads)
    p.add_argument("--num-kv-heads", type=int, default=spec.num_kv_heads)
    # optimisation
    p.add_argument("--batch-size", type=int, default=32, help="scenes (conversations) per step")
    p.add_argument(
        "--curriculum",
        default="",
        help="max objects per scene by step, e.g. '1:100,2:250,3:400' (then 4); empty: none",
    )
    p.add_argument(
        "--describe",
        action="store_true",
        help="add a last turn 'What is in the image?' answered with the object list (auxiliary loss)",
    )
    p.add_argument(
        "--describe-positions",
        action="store_true",
        help="with --describe: each object's row and column (number words) after its name",
    )
    p.add_argument(
        "--spatial-relations",
        default="",
        help=f"train spatial questions only about these relations (comma list of {', '.join(RELATION_WORDS)}; "
        "default all): asking one direction per axis first gives the yes/no answer a linear "
        "dependence on the two positions, which the balanced mix of opposite relations cancels",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start stage 2 from the weights of a saved run (its best/ or final/ directory; same "
        "shape) instead of stage 1: a second training phase with its own schedule and data mix",
    )
    p.add_argument(
        "--families", default="", help="comma-separated question families to train on (default all)"
    )
    p.add_argument(
        "--turns",
        type=int,
        default=len(FAMILIES),
        help="questions per scene (<= 20): rounds of one question per family in random order, truncated",
    )
    p.add_argument(
        "--question-loss",
        action="store_true",
        help="loss on every text token (questions too), not only on the answers",
    )
    p.add_argument(
        "--init-std",
        type=float,
        default=0.0,
        help="re-initialise the language model's matrices (and head) with this std (0: keep the "
        "config's 0.02); larger values leave the blind-guess plateau much sooner",
    )
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--max-steps", type=int, default=3000, help="length of the cosine schedule")
    p.add_argument(
        "--max-minutes", type=float, default=0.0, help="stop after this much training time (0: none)"
    )
    p.add_argument(
        "--stop-step",
        type=int,
        default=0,
        help="stop (and write final/) at this step, the schedule still running to --max-steps (0: "
        "at --max-steps); to end a phase early reproducibly",
    )
    p.add_argument("--grad-clip", type=float, default=1.0)
    # stage 1: vision pretraining
    p.add_argument(
        "--vision-steps",
        type=int,
        default=0,
        help="stage 1a: steps of supervised vision pretraining (per-patch cell labels); 0 skips it",
    )
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument(
        "--projector-steps",
        type=int,
        default=0,
        help="stage 1b: steps aligning the projector to word embeddings (tower frozen; embeddings "
        "frozen afterwards); 0 skips it",
    )
    p.add_argument(
        "--position-codes",
        choices=["linear", "random"],
        default="linear",
        help="stage 1b row/column codes: one direction per axis (ordered) or a random vector per cell",
    )
    p.add_argument(
        "--freeze-projector", action="store_true", help="stage 2 keeps the stage-1b projector fixed"
    )
    p.add_argument("--vision-batch", type=int, default=128, help="images per vision pretraining step")
    p.add_argument(
        "--freeze-vision",
        action="store_true",
        help="stage 2 trains only the projector and the language model",
    )
    # evaluation / checkpoints
    p.add_argument("--eval-every", type=int, default=100, help="steps between validations")
    p.add_argument("--val-n", type=int, default=500, help="validation questions")
    p.add_argument("--target", type=float, default=0.97, help="stop when validation accuracy reaches this")
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)
    bad = set(filter(None, args.spatial_relations.split(","))) - set(RELATION_WORDS)
    if bad:
        p.error(f"--spatial-relations: unknown relation(s) {sorted(bad)}; use {', '.join(RELATION_WORDS)}")
    if not 1 <= args.turns <= 4 * len(FAMILIES):
        p.error(f"--turns must be in [1, {4 * len(FAMILIES)}]")
    return args


def spec_from_args(args: argparse.Namespace) -> TrainedTinyLlavaSpec:
    """The model shape named by the arguments."""
    return TrainedTinyLlavaSpec(
        image_size=args.image_size,
        patch_size=args.patch_size,
        vision_hidden=args.vision_hidden,
        vision_intermediate=args.vision_intermediate,
        vision_layers=args.vision_layers,
        vision_heads=args.vision_heads,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        seed=args.seed,
    )


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def parse_curriculum(text: str) -> list[tuple[int, int]]:
    """Parse ``"1:100,2:250"`` into ``[(max_objects, until_step), ...]`` (sorted by step)."""
    stages = []
    for part in filter(None, (t.strip() for t in text.split(","))):
        objects, until = part.split(":")
        stages.append((int(objects), int(until)))
    return sorted(stages, key=lambda st: st[1])


class TrainStream:
    """Training batches as a pure function of ``(seed, step)``.

    Scene ``g`` (global index ``step * batch_size + i``) is scene ``g % CHUNK_SCENES`` of the
    train split generated with config seed ``1 + seed * 100_000 + g // CHUNK_SCENES`` (and the
    curriculum's ``max_objects`` of the step); splits are content-disjoint whatever the seed,
    so no validation or test scene is ever trained on.

    Parameters
    ----------
    curriculum : list of (max_objects, until_step)
        Scenes of steps before ``until_step`` have at most ``max_objects`` objects (the first
        matching stage applies); afterwards the benchmark default (4).
    describe : bool
        Append a last turn ``"What is in the image?"`` answered by :func:`describe` (an
        auxiliary, caption-like target: many image-grounded tokens per scene).
    """

    def __init__(
        self,
        seed: int,
        batch_size: int,
        turns: int,
        image_size: int,
        curriculum: list[tuple[int, int]] | None = None,
        describe: bool = False,
        families: tuple[str, ...] | None = None,
        describe_positions: bool = False,
        spatial_relations: tuple[str, ...] | None = None,
    ) -> None:
        self.seed = seed
        self.batch_size = batch_size
        self.turns = turns
        self.image_size = image_size
        self.curriculum = curriculum or []
        self.describe = describe
        self.describe_positions = describe_positions
        self.spatial_qtypes = {f"spatial_{r}" for r in spatial_relations} if spatial_relations else None
        self.families = tuple(families or FAMILIES)
        self._key: tuple[int, int] | None = None
        self._chunk: list[dict[str, Any]] = []
        self._config: SceneQAConfig | None = None

    def max_objects(self, step: int) -> int:
        """Maximum objects per scene at a step."""
        for objects, until in self.curriculum:
            if step < until:
                return objects
        return SceneQAConfig().max_objects

    def _scene(self, g: int, step: int) -> tuple[dict[str, Any], SceneQAConfig]:
        key = (g // CHUNK_SCENES, self.max_objects(step))
        if key != self._key:
            families = FAMILIES if key[1] >= 2 else tuple(f for f in FAMILIES if f != "spatial")
            self._config = SceneQAConfig(
                image_size=self.image_size,
                seed=1 + self.seed * 100_000 + key[0],
                max_objects=key[1],
                families=families,
            )
            self._chunk = generate_scenes(CHUNK_SCENES, "train", self._config)
            self._key = key
        assert self._config is not None
        return self._chunk[g % CHUNK_SCENES], self._config

    def _allowed(self, q: dict[str, Any], scene, rng, config) -> dict[str, Any] | None:
        """``q``, or (for a spatial question about another relation) a redraw asking an allowed one."""
        for _ in range(16):
            if q["family"] != "spatial" or q["qtype"] in self.spatial_qtypes:
                return q
            redraw = generate_questions(scene, rng, ["spatial"], config=config)
            if not redraw:
                return None
            q = redraw[0]
        return None

    def batch(self, step: int) -> tuple[list[Image.Image], list[str], list[list[str]]]:
        """Images, conversation texts and the families asked (in turn order) of one step."""
        images, texts, families = [], [], []
        for i in range(self.batch_size):
            g = step * self.batch_size + i
            scene, config = self._scene(g, step)
            rng = np.random.default_rng([self.seed, 7, g])
            fams = self.families
            rounds = -(-self.turns // len(fams))  # each round asks every family once, shuffled
            order = [fams[int(k)] for _ in range(rounds) for k in rng.permutation(len(fams))]
            qs = generate_questions(scene, rng, order, config=config)[: self.turns]
            if self.spatial_qtypes is not None:
                kept = [self._allowed(q, scene, rng, config) for q in qs]
                unique = {q["question"]: q for q in kept if q is not None}  # a repeat could copy its answer
                qs = list(unique.values())
            turns = [(q["question"], q["answer"]) for q in qs]
            if self.describe:  # last, so that no question turn can read the answer from it
                turns.append((DESCRIBE_QUESTION, describe(scene["objects"], self.describe_positions)))
            images.append(scene["image"])
            texts.append(format_conversation(turns))
            families.append([q["family"] for q in qs] + (["describe"] if self.describe else []))
        return images, texts, families


def answer_labels(input_ids: torch.Tensor, assistant_id: int, colon_id: int, eos_id: int) -> torch.Tensor:
    """Labels on answer tokens (from after ``ASSISTANT :`` up to and including EOS); -100 elsewhere."""
    starts = torch.zeros_like(input_ids)
    starts[:, 2:] = ((input_ids[:, :-2] == assistant_id) & (input_ids[:, 1:-1] == colon_id)).long()
    eos = (input_ids == eos_id).long()
    inside = starts.cumsum(1) > (eos.cumsum(1) - eos)  # an answer started and its EOS not yet passed
    return torch.where(inside, input_ids, torch.full_like(input_ids, -100))


def encode_train(
    processor, images: list[Image.Image], texts: list[str], question_loss: bool = False
) -> dict[str, torch.Tensor]:
    """Right-padded training batch with answer-only labels (``question_loss``: every text token)."""
    tok = processor.tokenizer
    tok.padding_side = "right"
    try:
        enc = processor(images=images, text=texts, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = "left"
    enc["labels"] = answer_labels(
        enc["input_ids"],
        tok.convert_tokens_to_ids("ASSISTANT"),
        tok.convert_tokens_to_ids(":"),
        tok.eos_token_id,
    )
    if question_loss:  # also predict the questions: their content words must be read off the image
        ids = enc["input_ids"]
        text = (ids != tok.pad_token_id) & (ids != tok.convert_tokens_to_ids("<image>"))
        enc["labels"] = torch.where(text, ids, torch.full_like(ids, -100))
    return dict(enc)


# ----------------------------------------------------------------------------------------------
# Stage 1: the vision side, supervised directly (LLaVA's alignment stage, with explicit targets)
#   1a  vision tower + linear per-patch heads: what is in the patch's grid cell, and where
#   1b  projector (tower frozen): each patch written as word embeddings of its cell's object
# ----------------------------------------------------------------------------------------------


def vision_heads(grid: int) -> dict[str, int]:
    """Class count of each per-patch label of stage 1a (class 0 of shape/colour/size: empty cell)."""
    return {
        "shape": len(SHAPES) + 1,
        "color": len(COLORS) + 1,
        "size": len(SIZES) + 1,
        "row": grid,
        "col": grid,
    }


def patch_targets(objects: list[dict[str, Any]], image_size: int, patch_size: int, grid: int) -> torch.Tensor:
    """Per-patch labels of a scene, shape ``(num_patches, 5)``: shape, colour, size, row, col.

    Every patch is labelled with the object of the grid cell its centre falls in (0 = empty cell
    for the three attribute heads), so each object is carried by all the patches of its cell.
    """
    side = image_size // patch_size
    centres = ((torch.arange(side) * patch_size + patch_size / 2) * grid // image_size).long()
    cell_r = centres[:, None].expand(side, side)
    cell_c = centres[None, :].expand(side, side)
    table = torch.zeros(grid, grid, 3, dtype=torch.long)
    for o in objects:
        table[o["row"], o["col"]] = torch.tensor(
            [SHAPES.index(o["shape"]) + 1, COLORS.index(o["color"]) + 1, SIZES.index(o["size"]) + 1]
        )
    attrs = table[cell_r, cell_c]  # (side, side, 3)
    return torch.cat([attrs, cell_r[..., None], cell_c[..., None]], dim=-1).reshape(side * side, 5)


def word_targets(
    model, tok, basic: torch.Tensor, grid: int, seed: int, position_codes: str = "linear"
) -> torch.Tensor:
    """Stage 1b regression targets: each patch as a bag of the language model's word embeddings.

    An occupied cell's patches -> ``E[size] + E[color] + E[shape]``, an empty cell's -> 0; plus
    row and column codes (seeded, same scale as the embeddings) so that positions stay readable:
    ``"linear"`` puts row ``r`` at ``(r - (grid - 1) / 2) * u_row`` (and likewise for columns),
    so "left of" is a comparison along one direction; ``"random"`` gives each row and column its
    own random vector. ``basic`` is :func:`patch_targets` output ``(..., 5)``; returns
    ``(..., hidden_size)``.
    """
    emb = model.model.language_model.embed_tokens.weight.detach()
    hidden = emb.shape[1]
    gen = torch.Generator().manual_seed(seed)
    if position_codes == "random":
        pos = torch.randn(2, grid, hidden, generator=gen) * float(emb.std())
    else:
        axis = torch.randn(2, 1, hidden, generator=gen) * float(emb.std())
        pos = (torch.arange(grid, dtype=torch.float32) - (grid - 1) / 2)[None, :, None] * axis

    def table(words: tuple[str, ...]) -> torch.Tensor:
        return torch.cat([torch.zeros(1, hidden), emb[tok.convert_tokens_to_ids(list(words))]])

    shape, color, size, row, col = basic.unbind(-1)
    return table(SHAPES)[shape] + table(COLORS)[color] + table(SIZES)[size] + pos[0][row] + pos[1][col]


class VisionProbe(torch.nn.Module):
    """Linear per-patch heads on the vision tower's output (stage 1a only; not shipped)."""

    def __init__(self, hidden: int, grid: int) -> None:
        super().__init__()
        self.sizes = vision_heads(grid)
        self.linear = torch.nn.Linear(hidden, sum(self.sizes.values()))

    def forward(self, feats: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Summed cross-entropy over the heads, and per-head accuracy."""
        logits = self.linear(feats).split(list(self.sizes.values()), dim=-1)
        loss = feats.new_zeros(())
        acc = {}
        for h, (name, lg) in enumerate(zip(self.sizes, logits, strict=True)):
            t = targets[..., h]
            loss = loss + torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), t.reshape(-1))
            acc[name] = round(float((lg.argmax(-1) == t).float().mean()), 4)
        return loss, acc


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch features the projector sees (selected layer, CLS dropped): ``(B, P, vision_hidden)``."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer][:, 1:]


def run_stage(
    name: str,
    model,
    processor,
    args: argparse.Namespace,
    spec: TrainedTinyLlavaSpec,
    params: list[torch.nn.Parameter],
    loss_fn,
    steps: int,
    seed_offset: int,
) -> dict[str, Any]:
    """One supervised stage-1 loop: AdamW, warmup + cosine, fresh train scenes every step.

    ``loss_fn(pixel_values, patch_targets) -> (loss, metrics)``. Scenes come from config seeds
    ``1 + seed * 100_000 + seed_offset + chunk`` of the train split (disjoint from stage 2's);
    the summary reports the metrics on 512 validation scenes.
    """
    grid = SceneQAConfig().grid
    opt = torch.optim.AdamW(params, lr=args.vision_lr, betas=(0.9, 0.98), weight_decay=0.0)
    ip = processor.image_processor

    def batch(scenes: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        pix = ip([s["image"] for s in scenes], return_tensors="pt")["pixel_values"]
        tgt = [patch_targets(s["objects"], spec.image_size, spec.patch_size, grid) for s in scenes]
        return pix, torch.stack(tgt)

    val = batch(generate_scenes(512, "validation", SceneQAConfig(image_size=spec.image_size, seed=0)))
    chunk: list[dict[str, Any]] = []
    chunk_key = -1
    warm = max(1, steps // 20)
    t0 = time.perf_counter()
    for step in range(steps):
        lr = args.vision_lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr
        scenes = []
        for gi in range(step * args.vision_batch, (step + 1) * args.vision_batch):
            if gi // CHUNK_SCENES != chunk_key:
                chunk_key = gi // CHUNK_SCENES
                seed = 1 + args.seed * 100_000 + seed_offset + chunk_key
                chunk = generate_scenes(
                    CHUNK_SCENES, "train", SceneQAConfig(image_size=spec.image_size, seed=seed)
                )
            scenes.append(chunk[gi % CHUNK_SCENES])
        loss, metrics = loss_fn(*batch(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.log_every == 0:
            log(f"{name} step {step + 1} loss {loss.item():.4f} lr {lr:.2e} train {metrics}")
    with torch.no_grad():
        _, metrics = loss_fn(*val)
    summary = {"steps": steps, "minutes": round((time.perf_counter() - t0) / 60, 2), "validation": metrics}
    log(f"{name} done: {summary}")
    return summary


def pretrain_vision(model, processor, args: argparse.Namespace, spec: TrainedTinyLlavaSpec) -> dict[str, Any]:
    """Stage 1a: train the vision tower with :class:`VisionProbe` heads (per-patch accuracy)."""
    probe = VisionProbe(spec.vision_hidden, SceneQAConfig().grid)
    tower = model.model.vision_tower
    params = list(tower.parameters()) + list(probe.parameters())

    def loss_fn(pix: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return probe(vision_features(model, pix), tgt)

    tower.train()
    return run_stage("vision", model, processor, args, spec, params, loss_fn, args.vision_steps, 50_000)


def align_projector(model, processor, args: argparse.Namespace, spec: TrainedTinyLlavaSpec) -> dict[str, Any]:
    """Stage 1b: train the projector (tower frozen) to write each patch as word embeddings.

    The target (:func:`word_targets`) puts image tokens in the language model's own embedding
    space, so "red circle" in a question can be matched against image tokens by the same
    identity circuits that match words in text; the word embeddings stay frozen afterwards.
    Reported: relative MSE on validation scenes.
    """
    grid = SceneQAConfig().grid
    model.model.vision_tower.requires_grad_(False)
    proj = model.model.multi_modal_projector
    tok = processor.tokenizer

    def loss_fn(pix: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            feats = vision_features(model, pix)
            target = word_targets(model, tok, tgt, grid, args.seed + 17, args.position_codes)
        mse = (proj(feats) - target).pow(2).mean()
        return mse, {"relative_mse": round(float(mse.detach() / target.pow(2).mean()), 5)}

    params = list(proj.parameters())
    return run_stage("align", model, processor, args, spec, params, loss_fn, args.projector_steps, 60_000)


# ----------------------------------------------------------------------------------------------
# Validation (answer-token argmax, single turn, same prompt as inference)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_accuracy(
    model, processor, records: list[dict[str, Any]], *, blank: bool = False, batch_size: int = 64
) -> dict[str, float]:
    """Accuracy of the argmax next token after the prompt, per family and overall.

    Every answer is one token, so this equals greedy decoding of the first generated token.
    Spatial questions are also reported per relation asked (``spatial_left``, ...; not part of
    ``all``): a model that reads positions but ignores the relation word shows up there.
    ``blank=True`` replaces every image by the plain background (no objects).
    """
    was_training = model.training
    model.eval()
    tok = processor.tokenizer
    answer_ids = tok.convert_tokens_to_ids([r["answer"] for r in records])
    hits: dict[str, list[bool]] = defaultdict(list)
    by_relation: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [Image.new("RGB", r["image"].size, (32, 32, 32)) if blank else r["image"] for r in chunk]
        enc = processor(
            images=images,
            text=[format_prompt(r["question"]) for r in chunk],
            padding=True,
            return_tensors="pt",
        )
        logits = model(**enc, logits_to_keep=1).logits[:, -1]  # left padding: last = last prompt token
        pred = logits.argmax(-1).tolist()
        for r, p, a in zip(chunk, pred, answer_ids[start : start + batch_size], strict=True):
            hits[r["family"]].append(p == a)
            if r["family"] == "spatial":
                by_relation[r["qtype"]].append(p == a)
    model.train(was_training)
    out = {f: float(np.mean(v)) for f, v in sorted(hits.items())}
    out["all"] = float(np.mean([h for v in hits.values() for h in v]))
    out.update({q: round(float(np.mean(v)), 3) for q, v in sorted(by_relation.items())})
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def save_pretrained(model, processor, out: Path, info: dict[str, Any]) -> None:
    """``save_pretrained`` of model (safetensors) and processor, plus ``training_info.json``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to ``--lr``, then cosine to ``--lr * --min-lr-ratio`` at ``--max-steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def cached_stage(path: Path, key: dict[str, Any], module: torch.nn.Module, run) -> dict[str, Any]:
    """Run a stage-1 part (``run() -> summary``) or read its result back from ``path``.

    The cache holds ``module``'s state dict; it is used only when its ``key`` (the settings
    that determine the result) equals ``key``.
    """
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=False)
        if cached["key"] == key:
            module.load_state_dict(cached["state"] if "state" in cached else cached[_LEGACY[path.name]])
            log(f"{path.name} read back: {cached['summary']}")
            return cached["summary"]
    summary = run()
    save_checkpoint(path, {"key": key, "state": module.state_dict(), "summary": summary})
    return summary


_LEGACY = {"vision_stage.pt": "vision_tower", "projector_stage.pt": "projector"}


def init_from(model, path: Path, spec: TrainedTinyLlavaSpec) -> dict[str, Any] | None:
    """Load the weights of a saved run (``save_pretrained`` directory) into ``model``.

    Returns that run's ``training_info.json`` summary (its stage-1 results and where it
    stopped), which the new run records as its own starting point.
    """
    info_path = path / "training_info.json"
    weights = path / "model.safetensors"
    if not weights.is_file() or not info_path.is_file():
        raise SystemExit(f"--init-from {path}: expected model.safetensors and training_info.json there")
    info = json.loads(info_path.read_text())
    shape = {k: v for k, v in spec.to_dict().items() if k != "seed"}  # the seed only drew the init
    if {k: v for k, v in info.get("spec", {}).items() if k != "seed"} != shape:
        raise SystemExit(f"--init-from {path} has shape {info.get('spec')}, arguments give {spec.to_dict()}")
    from transformers import LlavaForConditionalGeneration

    saved = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)  # safetensors
    model.load_state_dict(saved.state_dict())  # strict: same shape, same parameter names
    log(f"initialised from {path} (its step {info.get('step')}, val {info.get('val')})")
    return {"init_from": str(path), "step": info.get("step"), "train_minutes": info.get("train_minutes"),
            "vision_pretraining": info.get("vision_pretraining")}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Main loop
# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Train (or resume) and return an exit status."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.out_dir / "checkpoint.pt"
    spec = spec_from_args(args)

    random.seed(args.seed)
    np.random.seed(args.seed)
    model = build_model(spec)
    processor = build_processor(spec)
    if args.init_std > 0:
        gen = torch.Generator().manual_seed(args.seed)
        lm_matrices = [w for w in model.model.language_model.parameters() if w.dim() == 2]
        for w in [*lm_matrices, model.lm_head.weight]:
            with torch.no_grad():
                w.normal_(0.0, args.init_std, generator=gen)
    vision_summary: dict[str, Any] | None = None
    if args.init_from is not None and not ckpt_path.exists():  # a later phase: weights of a saved run
        vision_summary = init_from(model, args.init_from, spec)
    elif not ckpt_path.exists():  # stage 1 (each part cached in --out-dir, keyed by its settings)
        base = {"spec": spec.to_dict(), "lr": args.vision_lr, "batch": args.vision_batch}
        tower_summary = proj_summary = None
        if args.vision_steps > 0:
            tower_summary = cached_stage(
                args.out_dir / "vision_stage.pt",
                {**base, "steps": args.vision_steps},
                model.model.vision_tower,
                lambda: pretrain_vision(model, processor, args, spec),
            )
        if args.projector_steps > 0:
            key = {**base, "steps": args.projector_steps, "vision": tower_summary, "align": True,
                   "init_std": args.init_std, **({"positions": args.position_codes}
                                                 if args.position_codes != "random" else {})}  # fmt: skip
            proj_summary = cached_stage(
                args.out_dir / "projector_stage.pt",
                key,
                model.model.multi_modal_projector,
                lambda: align_projector(model, processor, args, spec),
            )
        if tower_summary or proj_summary:
            vision_summary = {"tower": tower_summary, "projector": proj_summary}
    model.model.vision_tower.requires_grad_(not args.freeze_vision)
    if args.freeze_projector:
        model.model.multi_modal_projector.requires_grad_(False)
    if args.projector_steps > 0 or args.init_from is not None:  # projector aligned to the embeddings
        model.model.language_model.embed_tokens.requires_grad_(False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in trainable if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in trainable if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    step, elapsed, best = 0, 0.0, -1.0
    history: list[dict[str, Any]] = []
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["spec"] != spec.to_dict():
            raise SystemExit(
                f"checkpoint {ckpt_path} has shape {state['spec']}, arguments give {spec.to_dict()}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        step, elapsed, best, history = state["step"], state["elapsed"], state["best"], state["history"]
        vision_summary = state.get("vision")
        log(f"resumed from {ckpt_path} at step {step} ({elapsed / 60:.1f} min trained, best val {best:.3f})")

    n_params = sum(p.numel() for p in model.parameters())
    log(f"spec {spec.to_dict()}; {n_params / 1e6:.3f}M parameters; {spec.num_image_tokens} image tokens")
    log(f"args {json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})}")
    val = load_synthetic("validation", args.val_n, SceneQAConfig(image_size=args.image_size, seed=0))
    stream = TrainStream(
        args.seed,
        args.batch_size,
        args.turns,
        args.image_size,
        parse_curriculum(args.curriculum),
        describe=args.describe,
        families=tuple(args.families.split(",")) if args.families else None,
        describe_positions=args.describe_positions,
        spatial_relations=tuple(args.spatial_relations.split(",")) if args.spatial_relations else None,
    )

    def state_dict() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "step": step,
            "elapsed": elapsed,
            "best": best,
            "history": history,
            "vision": vision_summary,
            "spec": spec.to_dict(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }

    def info(extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": step,
            "train_minutes": round(elapsed / 60, 2),
            "spec": spec.to_dict(),
            "parameters": n_params,
            "command": " ".join(sys.argv),
            "vision_pretraining": vision_summary,
            **extra,
        }

    model.train()
    last_ckpt = time.time()
    window_loss, window_t, window_n = 0.0, 0.0, 0
    stop_step = min(args.stop_step or args.max_steps, args.max_steps)
    reason = "max steps" if stop_step == args.max_steps else "stop step"
    while step < stop_step:
        if args.max_minutes and elapsed >= args.max_minutes * 60:
            reason = "max minutes"
            break
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, texts, _ = stream.batch(step)
        batch = encode_train(processor, images, texts, args.question_loss)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        dt = time.perf_counter() - t0
        elapsed += dt
        window_loss, window_t, window_n = window_loss + loss.item(), window_t + dt, window_n + 1
        if step % args.log_every == 0:
            log(
                f"step {step} loss {window_loss / window_n:.4f} lr {lr:.2e} {window_t / window_n:.2f} s/step "
                f"seq {batch['input_ids'].shape[1]} trained {elapsed / 60:.1f} min"
            )
            window_loss, window_t, window_n = 0.0, 0.0, 0
        done = False
        if step % args.eval_every == 0 or step == stop_step:
            te = time.perf_counter()
            acc = answer_accuracy(model, processor, val)
            entry = {"step": step, "train_minutes": round(elapsed / 60, 2), "val": acc}
            if step % (4 * args.eval_every) == 0 or acc["all"] >= args.target:
                entry["val_blank"] = answer_accuracy(model, processor, val, blank=True)
            record_validation(args.out_dir, history, entry, time.perf_counter() - te)
            if acc["all"] > best:
                best = acc["all"]
                save_pretrained(model, processor, args.out_dir / "best", info({"val": acc}))
            if acc["all"] >= args.target:
                reason, done = f"validation accuracy {acc['all']:.3f} >= target {args.target}", True
        if done or time.time() - last_ckpt >= args.ckpt_minutes * 60:
            save_checkpoint(ckpt_path, state_dict())
            last_ckpt = time.time()
        if done:
            break
    save_checkpoint(ckpt_path, state_dict())
    final_acc = answer_accuracy(model, processor, val)
    final_blank = answer_accuracy(model, processor, val, blank=True)
    save_pretrained(
        model, processor, args.out_dir / "final", info({"val": final_acc, "val_blank": final_blank})
    )
    log(
        f"stopped ({reason}) at step {step} after {elapsed / 60:.1f} min; val {final_acc} blank {final_blank}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
