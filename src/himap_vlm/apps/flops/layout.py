"""Token layouts and per-layer image-token counts: what the FLOPs formulas are evaluated on.

A :class:`Layout` is one prompt's ``before + image + after`` token counts; per-layer counts
(``image_tokens_per_layer``) are either a method's schedule
(:meth:`~himap_vlm.core.methods.base.PruningMethod.image_tokens_schedule`, read from the method
itself) or what the engine measured (``run.image_tokens_per_layer``), flat or batched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from himap_vlm.apps.flops.configs import VisionDims, _get, load_config
from himap_vlm.core.methods.base import kept_count

__all__ = ["LLAVA_15_LAYOUT", "Counts", "Layout", "default_layout", "keep_count", "layout_from_inputs"]

Counts = Sequence[int] | Sequence[Sequence[int]]
"""Image tokens per decoder layer: ``L`` ints, or ``L`` lists over the batch."""


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0; got {value}")
    return value


@dataclass(frozen=True)
class Layout:
    """Token layout of one prompt: text before the image, image tokens, text after.

    Parameters
    ----------
    before : int
        Tokens before the image (system prompt, ...). LLaVA-1.5's prompt has 35.
    image : int
        Image tokens entering the language model (576 for LLaVA-1.5 at 336 px).
    after : int
        Tokens after the image (the instruction; 60 is a typical LLaVA-1.5 benchmark question).
    """

    before: int
    image: int
    after: int

    def __post_init__(self) -> None:
        for name in ("before", "image", "after"):
            _non_negative_int(f"layout.{name}", getattr(self, name))

    @property
    def total(self) -> int:
        """All tokens of the prompt."""
        return self.before + self.image + self.after

    @property
    def text(self) -> int:
        """Non-image tokens."""
        return self.before + self.after

    @classmethod
    def parse(cls, text: str) -> Layout:
        """Parse ``"before,image,after"`` (e.g. ``"35,576,60"``).

        Raises
        ------
        ValueError
            If the string is not three comma-separated non-negative integers.
        """
        parts = [p.strip() for p in str(text).split(",")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 3:
            raise ValueError(
                f"layout must be three comma-separated integers 'before,image,after' such as '35,576,60'; got {text!r}"
            )
        return cls(*values)


LLAVA_15_LAYOUT = Layout(35, 576, 60)
"""LLaVA-1.5 convention: 35 tokens before the image, 576 image tokens, 60 after."""


keep_count = kept_count
"""Image tokens kept when a fraction ``r`` of ``n`` is pruned (the methods' own rule,
:func:`himap_vlm.core.methods.base.kept_count`: ``n - floor(r*n + 0.5)``)."""


def _per_sample_counts(counts: Any, num_layers: int, num_image: int) -> list[list[int]]:
    """Validate ``image_tokens_per_layer`` and return it as a list over samples of ``L`` ints."""
    if counts is None:
        return [[num_image] * num_layers]
    if hasattr(counts, "tolist") and not isinstance(counts, (list, tuple)):
        counts = counts.tolist()
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence):
        raise ValueError(
            f"image_tokens_per_layer must be a list of {num_layers} ints (one per decoder layer) or a list over "
            f"layers of lists over the batch; got {type(counts).__name__}"
        )
    counts = list(counts)
    nested = [isinstance(c, Sequence) and not isinstance(c, (str, bytes)) for c in counts]
    if any(nested) and not all(nested):
        raise ValueError(
            "image_tokens_per_layer mixes ints and lists; pass either L ints or L lists (one int per sample)"
        )
    if len(counts) != num_layers:
        hint = ""
        if counts and all(nested) and all(len(c) == num_layers for c in counts):
            hint = " (it looks batch-major: transpose it to a list over layers of lists over the batch)"
        raise ValueError(
            f"image_tokens_per_layer has {len(counts)} entries but the model has {num_layers} decoder layers; "
            f"pass one count per decoder layer{hint}"
        )
    if all(nested):
        widths = {len(c) for c in counts}
        if len(widths) != 1 or 0 in widths:
            raise ValueError(
                "image_tokens_per_layer: every layer must list one count per sample, with the same batch size in every layer"
            )
        samples = [[row[b] for row in counts] for b in range(widths.pop())]
    else:
        samples = [counts]
    for sample in samples:
        for layer, value in enumerate(sample):
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                    sample[layer] = value
                else:
                    raise ValueError(
                        f"image_tokens_per_layer[{layer}] must be an integer count; got {value!r}"
                    )
            if value < 0:
                raise ValueError(
                    f"image_tokens_per_layer[{layer}] = {value} is negative; counts must be >= 0"
                )
            if value > num_image:
                raise ValueError(
                    f"image_tokens_per_layer[{layer}] = {value} exceeds layout.image = {num_image}; a layer cannot hold "
                    "more image tokens than the input has (fix the layout or the counts)"
                )
    return samples


def default_layout(config: Any) -> Layout:
    """The layout used when none is given: the preset's ``default_layout``, else LLaVA-1.5's.

    LLaVA-1.5 convention: 35 tokens before the image (system prompt and ``USER:``), the image
    tokens (576 at 336 px; from the config's vision tower when it has one) and 60 tokens after
    (a typical benchmark question and ``ASSISTANT:``).

    Parameters
    ----------
    config : str, os.PathLike, dict or transformers.PretrainedConfig
        As in :meth:`TextDims.from_config`.

    Returns
    -------
    Layout
    """
    cfg = load_config(config)
    preset = _get(cfg, "default_layout")
    if isinstance(preset, Mapping):
        return Layout(int(preset["before"]), int(preset["image"]), int(preset["after"]))
    try:
        image = VisionDims.from_config(cfg).num_image_tokens
    except ValueError:
        image = LLAVA_15_LAYOUT.image
    return Layout(LLAVA_15_LAYOUT.before, image, LLAVA_15_LAYOUT.after)



def layout_from_inputs(
    input_ids: torch.Tensor,
    image_token_id: int,
    attention_mask: torch.Tensor | None = None,
    sample: int = 0,
) -> Layout:
    """The :class:`Layout` of one sample of a processed batch.

    ``before`` counts the (non-padding) tokens before the first image token, ``image`` every
    image token, and ``after`` every other non-padding token (the instruction, and any text
    between images, which the exact convention treats like any text token).

    Parameters
    ----------
    input_ids : LongTensor, shape (B, S) or (S,)
    image_token_id : int
        The model's image placeholder token.
    attention_mask : Tensor, shape like ``input_ids``, optional
        Padding positions (0) are not counted.
    sample : int
        Row of the batch.

    Returns
    -------
    Layout
    """
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if not 0 <= sample < ids.shape[0]:
        raise ValueError(f"sample={sample} is out of range for a batch of {ids.shape[0]}")
    row = ids[sample]
    real = torch.ones_like(row, dtype=torch.bool)
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask)
        real = (mask[None] if mask.dim() == 1 else mask)[sample].to(row.device).bool()
    is_image = (row == int(image_token_id)) & real
    n_image = int(is_image.sum())
    if n_image:
        first = int(torch.nonzero(is_image).flatten()[0])
        before = int(real[:first].sum())
    else:
        before = int(real.sum())
    return Layout(before, n_image, int(real.sum()) - before - n_image)
