"""The tiny *trained* LLaVA of himap: tokenizer, processor, prompt format and model shape.

The model is a stock :class:`~transformers.LlavaForConditionalGeneration` (CLIP vision tower,
Llama text model) trained from scratch on the synthetic scene-QA benchmark of
:mod:`himap_vlm.apps.data.synthetic` by ``scripts/train_tiny_llava.py``. Everything here is offline:
the tokenizer is word-level over :data:`himap_vlm.apps.data.synthetic.VOCABULARY`, and the processor is
built from the PIL image processor of LLaVA.

Prompt format (single turn; :func:`format_prompt` and the chat template produce it)::

    <s>USER: <image>
    {question} ASSISTANT:

and the model answers ``{answer}</s>``, with ``answer`` a single word (``yes``/``no``, a colour,
a shape, a size, a number word or an option letter). Several turns about the same image are
written ``<s>USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...``.

The same builders serve training (``scripts/train_tiny_llava.py``), evaluation
(``scripts/eval_tiny_llava.py``) and loading the shipped checkpoint (:func:`load_trained`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from himap_vlm.apps.data.synthetic import VOCABULARY
from himap_vlm.core import contract

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "PROMPT_WORDS",
    "SPECIAL_TOKENS",
    "TrainedTinyLlavaSpec",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "format_conversation",
    "format_prompt",
    "load_trained",
]

IMAGE_TOKEN = "<image>"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, IMAGE_TOKEN)
PROMPT_WORDS: tuple[str, ...] = ("USER", "ASSISTANT", ":")
"""Words of the chat format that are not in the question vocabulary."""

# Pre-tokenisation that reproduces :func:`himap_vlm.apps.data.synthetic.split_words` (``option's`` stays
# one token; other punctuation is split off).
_WORD_PATTERN = r"[A-Za-z]+(?:'[A-Za-z]+)?|\d+|[^\sA-Za-z\d]"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""Jinja chat template (LLaVA-1.5 style ``USER: ... ASSISTANT:``, BOS first, EOS after answers)."""


@dataclass(frozen=True)
class TrainedTinyLlavaSpec:
    """Shape of the tiny trained LLaVA.

    Parameters
    ----------
    image_size, patch_size : int
        Vision geometry; ``(image_size // patch_size) ** 2`` image tokens (default 144).
    vision_hidden, vision_intermediate, vision_layers, vision_heads : int
        CLIP vision tower dimensions.
    hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads : int
        Llama text model dimensions (``num_kv_heads < num_heads``: grouped-query attention).
    seed : int
        Seed of the random initialisation.
    """

    image_size: int = 48
    patch_size: int = 4
    vision_hidden: int = 64
    vision_intermediate: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    seed: int = 0

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per image (CLS dropped: ``vision_feature_select_strategy="default"``)."""
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dictionary (for logs and checkpoints)."""
        return asdict(self)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the word-level fast tokenizer of the trained tiny LLaVA, offline.

    The vocabulary is :data:`SPECIAL_TOKENS`, :data:`PROMPT_WORDS` and
    :data:`himap_vlm.apps.data.synthetic.VOCABULARY`, in that order (ids are stable). The tokenizer adds
    no special tokens by itself: the chat template writes BOS and EOS.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        With ``pad``/``unk``/``bos``/``eos`` tokens, ``<image>`` as a special token, left
        padding, :data:`CHAT_TEMPLATE` and ``question_convention="plain"`` (see
        :func:`himap_vlm.apps.prompting.declared_question_convention`).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, *PROMPT_WORDS, *VOCABULARY):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="isolated")]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        question_convention="plain",  # trained on bare questions: no task instruction appended
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    fast.padding_side = "left"
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(spec: TrainedTinyLlavaSpec | None = None) -> LlavaProcessor:
    """Build the :class:`~transformers.LlavaProcessor` of the trained tiny LLaVA, offline.

    Parameters
    ----------
    spec : TrainedTinyLlavaSpec, optional
        Image and patch size (default ``TrainedTinyLlavaSpec()``).

    Returns
    -------
    transformers.LlavaProcessor
        CLIP normalisation, ``<image>`` expanded to ``spec.num_image_tokens`` tokens, with
        :data:`CHAT_TEMPLATE`.
    """
    from transformers import LlavaProcessor
    LlavaImageProcessorPil = contract.llava_image_processor_class()

    spec = spec or TrainedTinyLlavaSpec()
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(spec: TrainedTinyLlavaSpec | None = None) -> LlavaForConditionalGeneration:
    """Build a randomly initialised (seeded) tiny LLaVA of the given shape, in train mode.

    Parameters
    ----------
    spec : TrainedTinyLlavaSpec, optional
        Shape (default ``TrainedTinyLlavaSpec()``).

    Returns
    -------
    transformers.LlavaForConditionalGeneration
        Stock LLaVA: CLIP vision tower, GELU projector, Llama text model, untied LM head, SDPA.
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    spec = spec or TrainedTinyLlavaSpec()
    tok = build_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.max_new_tokens = 4
    model.generation_config.do_sample = False
    contract.set_attn_implementation(model, "sdpa")
    model.train()
    return model


def format_prompt(question: str) -> str:
    """The single-turn prompt for a question (what the chat template gives with one image).

    Parameters
    ----------
    question : str
        Question text (may span several lines, as ``choice`` questions do).

    Returns
    -------
    str
        ``"<s>USER: <image>\\n{question} ASSISTANT:"``
    """
    return f"{BOS}USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def format_conversation(turns: Sequence[tuple[str, str]]) -> str:
    """A multi-turn conversation about one image, with answers (training text).

    Parameters
    ----------
    turns : sequence of (question, answer)
        At least one turn; the image goes in the first.

    Returns
    -------
    str
        ``"<s>USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>..."``
    """
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    parts = [BOS]
    for t, (question, answer) in enumerate(turns):
        image = f"{IMAGE_TOKEN}\n" if t == 0 else ""
        parts.append(f"USER: {image}{question} ASSISTANT: {answer}{EOS}")
    return "".join(parts)


def load_trained(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a trained tiny LLaVA directory (``save_pretrained`` output), offline, in eval mode.

    Parameters
    ----------
    path : str or Path
        Directory with ``config.json``, ``model.safetensors`` and the processor files.
    device : str or torch.device, default "cpu"

    Returns
    -------
    (model, processor)
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(path)).to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(str(path))
    return model, processor
