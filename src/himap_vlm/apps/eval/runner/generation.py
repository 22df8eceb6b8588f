"""Generation of one batch of samples under a pruning run, and the progress bar."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .store import _json_safe

if TYPE_CHECKING:
    import torch
    from rich.console import Console

    from himap_vlm.apps.eval.tasks.base import Sample, Task


def _batches(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield list(indices[start : start + size])


def prompt_layouts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token_id: int
) -> list[list[int]]:
    """``[before, image, after]`` real (non-padding) tokens of each row (:func:`himap_vlm.apps.flops.layout_from_inputs`)."""
    from himap_vlm.apps.flops import layout_from_inputs

    out = []
    for b in range(input_ids.shape[0]):
        lay = layout_from_inputs(input_ids, image_token_id, attention_mask, sample=b)
        out.append([lay.before, lay.image, lay.after])
    return out


class _Progress:
    """A rich progress bar with samples/s (or nothing)."""

    def __init__(self, enabled: bool, total: int, console: Console | None):
        self._bar = None
        if not enabled or total <= 0:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class SpeedColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text(
                    "- samples/s" if not speed else f"{speed:.2f} samples/s", style="progress.data.speed"
                )

        self._bar = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            SpeedColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._bar.add_task("eval", total=total)
        self._bar.start()

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _generate_batch(
    model: Any,
    processor: Any,
    task: Task,
    samples: Sequence[Sample],
    prompts: Sequence[tuple[str, str | None]],
    max_new_tokens: int,
    run: Any,
    image_token_id: int,
    generation_kwargs: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Generate the answers of one batch; ``prompts`` are ``(user turn, instruction appended)`` per sample."""
    import torch

    from himap_vlm.apps.prompting import build_inputs, build_prompt

    texts_in = [p for p, _ in prompts]
    images = []
    for s in samples:
        img = s.load_image()
        images.append([img] if img is not None else [])
    inputs = build_inputs(processor, images, texts_in, model=model, padding_side="left")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
    if pad is not None:
        kwargs["pad_token_id"] = pad
    kwargs.update(generation_kwargs)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)
    length = inputs["input_ids"].shape[1]
    texts = processor.batch_decode(out[:, length:], skip_special_tokens=True)
    mask = inputs.get("attention_mask")
    layouts = prompt_layouts(inputs["input_ids"].cpu(), None if mask is None else mask.cpu(), image_token_id)
    per_layer = run.image_tokens_per_layer  # layers x batch
    records = []
    for b, (sample, (prompt, instruction), text) in enumerate(zip(samples, prompts, texts, strict=True)):
        text = text.strip()
        prediction = task.parse(sample, text)
        try:
            score = task.score_sample(sample, prediction)
        except Exception:  # noqa: BLE001 - a per-sample score is informative only
            score = None
        records.append(
            {
                "id": sample.id,
                "prompt": prompt,
                "instruction": instruction,
                "input_text": build_prompt(processor, prompt, len(images[b])),
                "output": text,
                "prediction": _json_safe(prediction),
                "answer": _json_safe(sample.answer),
                "score": score,
                "layout": layouts[b],
                "image_tokens_per_layer": [int(row[b]) for row in per_layer],
            }
        )
    return records
