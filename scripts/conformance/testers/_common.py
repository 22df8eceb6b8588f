"""Shared pieces of himap's conformance testers (copied next to the archive's ``test_modeling_common.py``).

transformers' source archive on the package index ships its shared test mixins
(``tests/test_modeling_common.py``) but not the per-model tiny testers of ``tests/models/*`` (nor
``tests/generation``). The testers in this folder are himap's own: each builds a tiny random
model of one supported family (2 decoder layers, hidden size 32, a handful of image tokens) and
hands the archive's ``ModelTesterMixin`` the config and inputs it reads. They follow the
conventions of transformers' testers (``prepare_config_and_inputs_for_common``, a batch of 3,
image placeholders first and text after them, ``all_model_classes``, ``_is_composite``) so the
mixin's tests run unchanged.

``all_model_classes`` holds only the ``*ForConditionalGeneration`` class of each family: that is
the class himap applies methods to; the bare ``*Model`` classes would get no method and run
identically in every mode.
"""

from __future__ import annotations

import torch

from ..generation.test_utils import GenerationTesterMixin
from ..test_modeling_common import ModelTesterMixin, ids_tensor

TEXT_LAYERS = 2
TEXT_HIDDEN = 32
TEXT_HEADS = 4
VOCAB = 99
PAD_ID = 1


def text_config(model_type: str, **extra) -> dict:
    """A tiny text config (2 layers, hidden 32, 4 query heads, 2 key/value heads)."""
    return {
        "model_type": model_type,
        "vocab_size": VOCAB,
        "hidden_size": TEXT_HIDDEN,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": 2,
        "intermediate_size": 37,
        "max_position_embeddings": 512,
        "pad_token_id": PAD_ID,
        **extra,
    }


def text_ids(batch: int, length: int, reserved: tuple[int, ...]) -> torch.Tensor:
    """Random text ids in ``[2, VOCAB)`` that never hit one of the ``reserved`` (special) ids."""
    ids = ids_tensor([batch, length], VOCAB - 2) + 2
    for rid in reserved:
        ids[ids == rid] = max(reserved) + 1
    return ids


class BaseVLMTester:
    """What ``ModelTesterMixin`` reads from a tester, for a composite vision-language model.

    Subclasses set ``num_image_tokens``, ``text_config``, ``vision_config`` and define
    ``get_config()`` and ``pixel_inputs(config)``; ``prefix``/``suffix`` are special tokens written
    around the image placeholders.
    """

    batch_size = 3
    text_length = 7  # text tokens after the image span
    is_training = True
    num_hidden_layers = TEXT_LAYERS
    hidden_size = TEXT_HIDDEN
    num_attention_heads = TEXT_HEADS
    vocab_size = VOCAB
    pad_token_id = PAD_ID
    num_image_tokens: int
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    def __init__(self, parent):
        self.parent = parent
        self.seq_length = len(self.prefix) + self.num_image_tokens + len(self.suffix) + self.text_length
        self.encoder_seq_length = self.seq_length

    def prepare_config_and_inputs(self):
        config = self.get_config()
        return config, self.pixel_inputs(config)

    def prepare_config_and_inputs_for_common(self):
        config, pixels = self.prepare_config_and_inputs()
        ids = self.input_ids(config)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **pixels, **self.token_inputs(ids)}
        return config, inputs

    def reserved_ids(self, config) -> tuple[int, ...]:
        return (config.image_token_id, *self.prefix, *self.suffix)

    def input_ids(self, config) -> torch.Tensor:
        """``prefix``, the image placeholders, ``suffix``, then random text."""
        ids = text_ids(self.batch_size, self.seq_length, self.reserved_ids(config))
        span = [*self.prefix, *[config.image_token_id] * self.num_image_tokens, *self.suffix]
        ids[:, : len(span)] = torch.tensor(span)
        return ids

    def token_inputs(self, ids: torch.Tensor) -> dict:
        """Extra per-token inputs the family's forward takes (token types)."""
        return {}


class ConformanceTest(ModelTesterMixin, GenerationTesterMixin):
    """Base of every conformance test class (the family's file sets the tester and the class)."""

    model_tester_class: type
    _is_composite = True

    def setUp(self):
        self.model_tester = self.model_tester_class(self)
