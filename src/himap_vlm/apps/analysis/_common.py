"""What every measurement of :mod:`himap_vlm.apps.analysis` shares.

* :class:`AnalysisSession`: a context manager that temporarily changes a model for one
  measurement (attention implementation of the language model, ``requires_grad`` flags, eval mode,
  hooks) and restores every one of them on exit, also after an exception.
* :func:`prepare_sample`: one record ``{image, question, answer}`` -> model inputs (batch of one),
  token groups and the first answer token.
* small statistics / JSON helpers.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from himap_vlm.apps.analysis.conventions import first_answer_token
from himap_vlm.apps.analysis.groups import TokenGroups, token_groups
from himap_vlm.core import contract
from himap_vlm.core.families import ModelFamily, resolve_family

Progress = Callable[[int], None]
"""Progress callback: called with the number of samples just finished (``1``)."""


class AnalysisSession:
    """Temporarily prepare a model for a measurement; restore it on exit.

    Parameters
    ----------
    model : nn.Module
        A supported model (see :func:`himap_vlm.core.families.supported_classes`).
    attn_implementation : str, optional
        Attention implementation of the *language model* during the session (e.g. ``"eager"``
        to get attention weights); the vision tower is not touched. ``None`` keeps it.
    freeze : bool
        Set ``requires_grad=False`` on every parameter during the session (gradients are then
        taken only with respect to activations; no parameter ``.grad`` is ever written).

    Attributes
    ----------
    family : ModelFamily
    decoder : nn.Module
        The language model.
    layers : nn.ModuleList
        Its decoder layers.
    attn_modules : list of nn.Module
        The attention module of every decoder layer.
    image_token_id : int
    """

    def __init__(self, model: nn.Module, attn_implementation: str | None = None, freeze: bool = False):
        self.model = model
        self.family: ModelFamily = resolve_family(model)
        self.decoder = self.family.decoder(model)
        self.layers: nn.ModuleList = getattr(self.decoder, self.family.layers_attr)
        self.attn_modules = [getattr(layer, self.family.attn_attr) for layer in self.layers]
        self.num_layers = len(self.layers)
        self.image_token_id = int(self.family.image_token_id(model.config))
        self.contract = contract.check_model(
            model, self.decoder, self.layers[0], self.attn_modules[0], needs_projections=False
        )
        self._attn = attn_implementation
        self._freeze = freeze
        self._handles: list[Any] = []
        self._saved_attn: str | None = None
        self._saved_grad: list[tuple[nn.Parameter, bool]] = []
        self._saved_training = False

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> AnalysisSession:
        self._saved_training = self.model.training
        self._saved_attn = self.attn_implementation
        try:
            self.model.eval()
            if self._attn is not None and self._attn != self._saved_attn:
                contract.set_attn_implementation(self.decoder, self._attn)
            if self._freeze:
                self._saved_grad = [(p, p.requires_grad) for p in self.model.parameters()]
                for p, _ in self._saved_grad:
                    p.requires_grad_(False)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        for p, flag in self._saved_grad:
            p.requires_grad_(flag)
        self._saved_grad = []
        if self._saved_attn is not None and self.attn_implementation != self._saved_attn:
            contract.set_attn_implementation(self.decoder, self._saved_attn)
        self.model.train(self._saved_training)

    # ------------------------------------------------------------------ helpers
    @property
    def attn_implementation(self) -> str:
        """The language model's current attention implementation."""
        return contract.attn_implementation(self.decoder.config)

    def hook(self, handle: Any) -> Any:
        """Remember a hook handle; it is removed when the session ends."""
        self._handles.append(handle)
        return handle

    def remove_hooks(self) -> None:
        """Remove the hooks installed so far (the session stays open)."""
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()

    @property
    def norm(self) -> nn.Module:
        """The language model's final norm."""
        return getattr(self.decoder, self.family.norm_attr)

    @property
    def lm_head(self) -> nn.Module:
        """The output embedding (``model.get_output_embeddings()``)."""
        head = self.model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(self.model).__name__} has no output embeddings (lm_head)")
        return head


# ---------------------------------------------------------------------- samples


@dataclass
class PreparedSample:
    """One record turned into model inputs.

    Attributes
    ----------
    inputs : transformers.BatchFeature
        Processor output for a batch of one (``input_ids`` (1, S), ``attention_mask``,
        ``pixel_values``, ...), on the model's device.
    groups : TokenGroups
        Index sets of the prompt.
    target_id : int
        First token id of the reference answer (tokenized without special tokens).
    answer : str
        The reference answer.
    family : str or None
        The record's question family (synthetic benchmark), used to judge answers.
    """

    inputs: Any
    groups: TokenGroups
    target_id: int
    answer: str
    family: str | None = None

    @property
    def length(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


def _load_image(image: Any) -> Any:
    from PIL import Image

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        with Image.open(path) as im:
            return im.convert("RGB")
    return image


def prepare_sample(session: AnalysisSession, processor: Any, record: Mapping[str, Any]) -> PreparedSample:
    """Build the inputs of one ``{image, question, answer}`` record.

    ``image`` may be a PIL image, a path, or a list of them (several images: the prompt gets one
    image entry per image, or the question holds the image placeholders itself). The prompt comes
    from :func:`himap_vlm.apps.prompting.build_prompt` (chat template when the processor has one, else
    ``"USER: <image>\\n{question} ASSISTANT:"``).
    """
    from himap_vlm.apps.prompting import build_inputs

    for key in ("image", "question", "answer"):
        if key not in record:
            raise ValueError(f"sample has no {key!r} field (samples are {{image, question, answer}} records)")
    image = record["image"]
    images = [_load_image(im) for im in image] if isinstance(image, (list, tuple)) else _load_image(image)
    inputs = build_inputs(processor, images, str(record["question"]), model=session.model)
    mask = inputs.get("attention_mask", None)
    groups = token_groups(inputs["input_ids"][0], session.image_token_id, None if mask is None else mask[0])
    answer = str(record["answer"])
    return PreparedSample(
        inputs=inputs,
        groups=groups,
        target_id=first_answer_token(processor, answer),
        answer=answer,
        family=record.get("family"),
    )


# ---------------------------------------------------------------------- answers

_NORM_RE = re.compile(r"[^\w\s]")


def normalise_answer(text: str) -> str:
    """Lower-case, punctuation removed, whitespace collapsed."""
    return " ".join(_NORM_RE.sub(" ", text.lower()).split())


def answer_in_output(prediction: str, answer: str, family: str | None, rule: str) -> bool:
    """Whether ``prediction`` contains the reference ``answer`` under ``rule``.

    ``"substring"``: the authors' ``answer in prediction.strip()`` (``validate/attn_disruption.py``:
    raw, case-sensitive; ``"A"`` is found in ``"Answer: B"``). ``"whole_word"``: :func:`contains_answer`.
    """
    if rule == "substring":
        return answer in prediction.strip()
    if rule == "whole_word":
        return contains_answer(prediction, answer, family)
    raise ValueError(f"unknown answer rule {rule!r}; use 'substring' or 'whole_word'")


def contains_answer(prediction: str, answer: str, family: str | None = None) -> bool:
    """Whether ``prediction`` contains the reference ``answer``.

    Records of the synthetic benchmark (``family`` set) are judged by
    :func:`himap_vlm.apps.data.synthetic.score`; otherwise the normalised answer must occur as whole words
    in the normalised prediction.
    """
    from himap_vlm.apps.data.synthetic import FAMILIES, score

    if family in FAMILIES:
        return bool(score(prediction, answer, family))
    ref = normalise_answer(answer)
    if not ref:
        return False
    return f" {ref} " in f" {normalise_answer(prediction)} "


# ---------------------------------------------------------------------- statistics / JSON


def nanmean(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN (all-NaN -> NaN, silently)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(x, dtype=np.float64), axis=axis)


def nanstd(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Population standard deviation (ddof=0) over ``axis`` ignoring NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanstd(np.asarray(x, dtype=np.float64), axis=axis)


def jsonable(value: Any) -> Any:
    """Convert arrays / numpy scalars / tuples to JSON-ready values; NaN and ±inf become ``None``."""
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def as_list(samples: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    out = list(samples)
    if not out:
        raise ValueError("no samples given")
    return out


def resolve_layers(layers: int | Sequence[int] | None, num_layers: int) -> list[int]:
    """``None`` -> every layer; an int or a sequence -> that list, validated (negatives count from the end)."""
    if layers is None:
        return list(range(num_layers))
    seq = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for layer in seq:
        idx = int(layer) + num_layers if int(layer) < 0 else int(layer)
        if not 0 <= idx < num_layers:
            raise ValueError(f"layer {layer} is out of range for a model with {num_layers} decoder layers")
        out.append(idx)
    if not out:
        raise ValueError("no layers given")
    return out
