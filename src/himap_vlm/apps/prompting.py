"""Model inputs from (processor, image, question): one place for the prompt format.

Used by the calibration (:mod:`himap_vlm.apps.calibrate`) and meant for every command that asks a
multimodal model a question about an image (``himap generate``, evaluation, benchmarks).

The prompt is the processor's chat template when it has one (a user turn with one image entry per
image, then the question, plus the generation prompt); otherwise LLaVA-1.5's format
``"USER: <image>\\n{question} ASSISTANT:"``. A question that already contains the processor's
image token is used as written.

Question conventions
--------------------
A model may declare how it was trained to read questions, so that the convention travels with
the model's files: ``question_convention`` in its ``tokenizer_config.json`` (kept by the
tokenizer's ``save_pretrained``), or in its ``config.json``, or set as an attribute of the
processor. Values (:data:`QUESTION_CONVENTIONS`): ``"task"`` -- the evaluation task's
answer-format instructions are appended (LLaVA-1.5's convention, what the papers evaluate);
``"plain"`` -- the question as written, no instruction appended (a model trained on bare
questions). :func:`declared_question_convention` reads it; :mod:`himap_vlm.apps.eval.prompts`
applies it, with :func:`unreadable_words` for models that declare nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "QUESTION_CONVENTIONS",
    "build_inputs",
    "build_prompt",
    "declared_question_convention",
    "image_token",
    "to_model",
    "unreadable_words",
]

import torch

DEFAULT_IMAGE_TOKEN = "<image>"
QUESTION_CONVENTION_KEY = "question_convention"
QUESTION_CONVENTIONS = ("task", "plain")
"""Values of a model's declared question convention (see the module docstring)."""


def declared_question_convention(processor: Any, model: Any = None) -> tuple[str, str] | None:
    """The question convention a model declares, and where: ``(convention, source)`` or ``None``.

    Looked up in order: the processor's ``question_convention`` attribute, its tokenizer's
    ``tokenizer_config.json`` (``init_kwargs``), ``model.config``.

    Raises
    ------
    ValueError
        For a declared value that is not one of :data:`QUESTION_CONVENTIONS`.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    init_kwargs = getattr(tokenizer, "init_kwargs", None)
    places = [
        ("processor attribute", getattr(processor, QUESTION_CONVENTION_KEY, None)),
        ("tokenizer_config.json", init_kwargs.get(QUESTION_CONVENTION_KEY) if isinstance(init_kwargs, dict) else None),
        ("config.json", getattr(getattr(model, "config", None), QUESTION_CONVENTION_KEY, None)),
    ]
    for where, value in places:
        if value is None:
            continue
        if value not in QUESTION_CONVENTIONS:
            raise ValueError(
                f"the model declares {QUESTION_CONVENTION_KEY}={value!r} ({where}); expected one of "
                f"{', '.join(QUESTION_CONVENTIONS)}"
            )
        return str(value), f"{QUESTION_CONVENTION_KEY}={value!r} in the model's {where}"
    return None


def unreadable_words(processor: Any, text: str) -> list[str]:
    """Words of ``text`` that ``processor``'s tokenizer turns into its unknown token (in order, unique).

    Empty for byte-level tokenizers (every text is spelled) and for tokenizers without an unknown
    token; a closed-vocabulary tokenizer (the shipped tiny LLaVA's) cannot spell words it was not
    built with.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not callable(tokenizer):
        return []
    out: list[str] = []
    for word in re.findall(r"[^\W_](?:[\w']*\w)?|[^\w\s]", text):
        try:
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        except Exception:  # noqa: BLE001 - a tokenizer that cannot encode a word cannot spell it
            ids = [unk]
        if unk in ids and word not in out:
            out.append(word)
    return out


def image_token(processor: Any) -> str:
    """The placeholder string of ``processor`` for one image (``"<image>"`` when it names none)."""
    token = getattr(processor, "image_token", None)
    return token if isinstance(token, str) and token else DEFAULT_IMAGE_TOKEN


def build_prompt(processor: Any, question: str, num_images: int = 1) -> str:
    """The text that asks ``question`` about ``num_images`` images, in ``processor``'s format.

    Parameters
    ----------
    processor
        A transformers processor (``chat_template`` and ``image_token`` are used when present).
    question : str
        The question or instruction.
    num_images : int
        Images the prompt refers to (one image entry / placeholder each, before the question).

    Returns
    -------
    str
    """
    token = image_token(processor)
    if token in question:
        return question
    if getattr(processor, "chat_template", None):
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": question})
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = (token + "\n") * num_images
    return f"USER: {images}{question} ASSISTANT:"


def build_inputs(
    processor: Any,
    images: Any,
    questions: str | Sequence[str],
    *,
    model: torch.nn.Module | None = None,
    padding_side: str = "left",
) -> Any:
    """Processor outputs (``input_ids``, ``attention_mask``, ``pixel_values``) for one or more samples.

    Parameters
    ----------
    processor
        A transformers processor.
    images
        For one question: a PIL image, a list of PIL images, or ``None``. For a list of
        questions: one entry per question, each a PIL image, a list of PIL images, or ``None``.
    questions : str or sequence of str
        One question, or one per sample (a batch, padded on ``padding_side``).
    model : nn.Module, optional
        When given, tensors move to the model's device and ``pixel_values`` to its dtype.
    padding_side : {"left", "right"}
        Padding of a batch (left keeps the last position of every row real, as ``generate``
        expects).

    Returns
    -------
    transformers.BatchFeature
        ``input_ids`` and ``attention_mask`` of shape (B, S); ``pixel_values`` (N images, 3, H, W)
        when there are images.
    """
    single = isinstance(questions, str)
    qs = [questions] if single else list(questions)
    per = [images] if single else list(images) if images is not None else [None] * len(qs)
    if len(per) != len(qs):
        raise ValueError(f"build_inputs: got {len(qs)} questions but {len(per)} image entries")
    sample_images: list[list[Any]] = []
    for entry in per:
        if entry is None:
            sample_images.append([])
        elif isinstance(entry, (list, tuple)):
            sample_images.append(list(entry))
        else:
            sample_images.append([entry])
    texts = [build_prompt(processor, q, len(im)) for q, im in zip(qs, sample_images, strict=True)]
    flat = [im for ims in sample_images for im in ims]
    tokenizer = getattr(processor, "tokenizer", None)
    previous = getattr(tokenizer, "padding_side", None)
    if tokenizer is not None:
        tokenizer.padding_side = padding_side
    try:
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if flat:
            kwargs["images"] = flat if single else [ims for ims in sample_images]
        batch = processor(**kwargs)
    finally:
        if tokenizer is not None and previous is not None:
            tokenizer.padding_side = previous
    if model is not None:
        batch = to_model(batch, model)
    return batch


def to_model(batch: Any, model: torch.nn.Module) -> Any:
    """Move a processor output to ``model``'s device; floating tensors take the model's dtype."""
    param = next(model.parameters())
    for key in list(batch.keys()):
        value = batch[key]
        if isinstance(value, torch.Tensor):
            batch[key] = value.to(param.device, dtype=param.dtype) if value.is_floating_point() else value.to(
                param.device
            )
    return batch
