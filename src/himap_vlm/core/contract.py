"""The transformers contract: everything himap reads from, writes into, or assumes about transformers.

himap works on stock transformers models through hooks, so it depends on internals that are not a
public API: the names under which a model hands its KV cache to the language model, its decoder
layers and their attention modules; how those modules are called; the cache classes and their
per-layer storage; the mask builders of ``masking_utils``; output fields; and a few private import
paths. This module is the only place in himap that touches them. Version differences are handled
here, once, and every assumption is checked:

* when a method is applied (:func:`check_model`, called by the engine): the unwrapped ``forward``
  signatures of the language model, a decoder layer and an attention module accept what the engine
  reads and writes, and the attention module has the projections the engine recomputes;
* at run time (:func:`find_cache` and the engine's length checks): a cache that arrives under a
  name the engine does not read, or a hidden-state length that disagrees with the engine's layout,
  raises :class:`ContractError` naming the installed transformers version and the broken
  assumption -- never a silently different result.

Tested range: transformers ``TESTED_MIN`` (the floor declared in ``pyproject.toml``) to
``TESTED_MAX`` (pinned in ``constraints.txt``); ``.ci/run`` tests the floor, the pin and the newest
release the package index serves. A newer release gets one :class:`UntestedTransformersWarning`
when a method is applied, plus the loud checks above.

Release notes that matter here (see ``shared/reference/transformers-v5-notes.md``):

* 5.24 renamed the cache argument from ``past_key_values`` to ``cache`` (model, decoder layers,
  attention modules, mask builders, output field ``cache``);
* 5.14 added ``layer_idx`` to the mask builders (per-layer cache sizes); before it, a one-layer view
  of the cache (:class:`_OneLayerCache`) gives the builders the pruned layer's own sizes.

Why this module is over 500 lines: it is the contract, kept in one file on purpose so that a
reviewer checking a new transformers release reads one place; each function is small.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from packaging.version import Version
from torch import nn

__all__ = [
    "CACHE_KWARGS",
    "TESTED_MAX",
    "TESTED_MIN",
    "ContractError",
    "ModelContract",
    "UntestedTransformersWarning",
    "attention_weights",
    "attn_hidden",
    "attn_implementation",
    "attn_implementations",
    "blockwise_overlay",
    "cache_call_kwargs",
    "cache_layer_values",
    "cache_length",
    "check_cache_supported",
    "check_model",
    "check_version",
    "decoder_output_hidden",
    "find_cache",
    "image_blocks_override_window",
    "image_size_to_num_patches",
    "layer_hidden",
    "layer_mask",
    "llava_image_processor_class",
    "model_cache_kwarg",
    "output_cache",
    "private_config_class",
    "restore_attn_implementations",
    "rotary_for_positions",
    "rotary_tables",
    "set_attn_implementation",
    "transformers_version",
    "with_decoder_output_hidden",
    "with_layer_hidden",
]

TESTED_MIN = "5.10.1"
"""Oldest transformers release tested (= the floor in ``pyproject.toml``; a test checks both agree)."""
TESTED_MAX = "5.24.0"
"""Newest transformers release tested (= the pin in ``constraints.txt``; a test checks both agree)."""
CACHE_KWARGS = ("cache", "past_key_values")
"""Names transformers has used for the KV-cache argument, newest first."""

_SUPPORTED_CACHE_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


class ContractError(RuntimeError):
    """transformers no longer behaves as himap assumes; the message names the version and the assumption."""

    def __init__(self, assumption: str, detail: str = ""):
        self.assumption = assumption
        text = (
            f"himap-vlm: transformers {transformers_version()} breaks an assumption of himap's engine: {assumption}."
            + (f" {detail}" if detail else "")
            + f" himap-vlm was tested with transformers {TESTED_MIN} to {TESTED_MAX}; install one of those "
            f"(e.g. pip install 'transformers=={TESTED_MAX}') or report this error."
        )
        super().__init__(text)


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is newer than the newest release himap was tested with."""


# ---------------------------------------------------------------------------------------------
# versions
# ---------------------------------------------------------------------------------------------
def transformers_version() -> str:
    """The installed transformers version string."""
    import transformers

    return str(transformers.__version__)


@functools.lru_cache(maxsize=1)
def _version() -> Version:
    return Version(transformers_version())


_warned_untested = False


def check_version() -> None:
    """Refuse a transformers older than the tested floor; warn once about one newer than tested.

    Raises
    ------
    ContractError
        If the installed release is older than :data:`TESTED_MIN`.
    """
    global _warned_untested
    v = _version()
    if v.release < Version(TESTED_MIN).release:
        raise ContractError(
            f"transformers >= {TESTED_MIN} is required",
            "Older releases lack the per-layer mask sizes and cache layout the engine relies on.",
        )
    if v.release > Version(TESTED_MAX).release and not _warned_untested:
        _warned_untested = True
        warnings.warn(
            f"himap-vlm was tested with transformers {TESTED_MIN} to {TESTED_MAX}; you have {transformers_version()}. "
            "Every assumption himap makes about transformers internals is checked when a method is applied and "
            "at run time (a break raises an error rather than changing results), but this release is untested.",
            UntestedTransformersWarning,
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------
# forward signatures (checked when a method is applied)
# ---------------------------------------------------------------------------------------------
def _params(module: nn.Module) -> tuple[list[str], bool]:
    """Parameter names (without ``self``) of the unwrapped ``forward`` of ``module``'s class, and
    whether it takes ``**kwargs``."""
    fn = inspect.unwrap(type(module).forward)
    sig = inspect.signature(fn)
    names = [p.name for p in sig.parameters.values() if p.name != "self"]
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def _cache_name(names: list[str], what: str, module: nn.Module) -> str:
    for name in CACHE_KWARGS:
        if name in names:
            return name
    raise ContractError(
        f"{what} ({type(module).__name__}.forward) takes the KV cache under a known name",
        f"Its parameters are {', '.join(names)}; the engine knows {' or '.join(CACHE_KWARGS)}.",
    )


def _require(names: list[str], required: tuple[str, ...], what: str, module: nn.Module) -> None:
    missing = [n for n in required if n not in names]
    if missing:
        raise ContractError(
            f"{what} ({type(module).__name__}.forward) accepts {', '.join(required)}",
            f"It lacks {', '.join(missing)}; its parameters are {', '.join(names)}.",
        )


@dataclass(frozen=True)
class ModelContract:
    """What the engine reads and writes on one model, checked against its actual classes.

    Attributes
    ----------
    version : str
        The installed transformers version.
    cache_kwarg : str
        The name under which the language model, its decoder layers and their attention modules
        receive the KV cache (``"cache"`` from 5.24, ``"past_key_values"`` before).
    model_cache_kwarg : str
        The name the top-level model's ``forward`` takes a cache under (for callers that drive the
        decode loop themselves).
    """

    version: str
    cache_kwarg: str
    model_cache_kwarg: str

    def find_cache(self, kwargs: Mapping[str, Any], where: str) -> Any:
        """The cache in a forward call's ``kwargs`` (see :func:`find_cache`)."""
        return find_cache(kwargs, self.cache_kwarg, where)


def check_model(
    model: nn.Module, decoder: nn.Module, layer: nn.Module, attn: nn.Module, *, needs_projections: bool
) -> ModelContract:
    """Check the contract on the actual classes of a model; called when a method is applied.

    Parameters
    ----------
    model, decoder, layer, attn : nn.Module
        The top-level model, its language model, one decoder layer and that layer's attention.
    needs_projections : bool
        Whether the method recomputes attention rows or values (``q_proj``, ``k_proj``, ``v_proj``,
        ``o_proj`` and ``head_dim`` must exist on the attention module).

    Returns
    -------
    ModelContract

    Raises
    ------
    ContractError
        Naming the class, the parameter or attribute, and the installed version.
    """
    check_version()
    dec_names, _ = _params(decoder)
    cache = _cache_name(dec_names, "the language model", decoder)
    _require(dec_names, ("input_ids", "inputs_embeds", "attention_mask", "use_cache"), "the language model", decoder)
    layer_names, _ = _params(layer)
    if not layer_names or layer_names[0] != "hidden_states":
        raise ContractError(
            f"a decoder layer ({type(layer).__name__}.forward) takes hidden_states as its first argument",
            f"Its parameters are {', '.join(layer_names)}.",
        )
    _require(layer_names, ("attention_mask", "position_embeddings", cache), "a decoder layer", layer)
    attn_names, _ = _params(attn)
    _require(attn_names, ("hidden_states", "position_embeddings", "attention_mask", cache), "an attention module", attn)
    model_cache = model_cache_kwarg(model)
    if needs_projections:
        missing = [a for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim") if not hasattr(attn, a)]
        if missing:
            raise ContractError(
                f"attention modules ({type(attn).__name__}) expose q_proj, k_proj, v_proj, o_proj and head_dim",
                f"Missing: {', '.join(missing)}.",
            )
    return ModelContract(version=transformers_version(), cache_kwarg=cache, model_cache_kwarg=model_cache)


# ---------------------------------------------------------------------------------------------
# caches
# ---------------------------------------------------------------------------------------------
def _cache_base() -> type:
    from transformers.cache_utils import Cache

    return Cache


def find_cache(kwargs: Mapping[str, Any], name: str, where: str) -> Any:
    """The KV cache passed to a forward call, read under ``name``; loud if it hides elsewhere.

    Parameters
    ----------
    kwargs : mapping
        The keyword arguments of the call (as a forward pre-hook sees them).
    name : str
        The name this transformers uses (:attr:`ModelContract.cache_kwarg`).
    where : str
        What was called (for the error message), e.g. ``"decoder layer 3"``.

    Returns
    -------
    Cache or None

    Raises
    ------
    ContractError
        If a cache object arrives under another keyword, or the value under ``name`` is not a cache.
    """
    base = _cache_base()
    for key, value in kwargs.items():
        if key != name and isinstance(value, base):
            raise ContractError(
                f"{where} receives the KV cache as `{name}`",
                f"It arrived as `{key}`; the engine would have treated every decode step as a new prefill.",
            )
    cache = kwargs.get(name)
    if cache is not None and not isinstance(cache, base):
        raise ContractError(f"`{name}` passed to {where} is a transformers Cache", f"Got {type(cache).__name__}.")
    return cache


def cache_length(cache: Any, layer_idx: int = 0) -> int:
    """Tokens held by layer ``layer_idx`` of ``cache`` (0 when there is no cache)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length(layer_idx))


def check_cache_supported(cache: Any) -> None:
    """Refuse caches whose layers cannot hold a different number of tokens per layer.

    Raises
    ------
    ValueError
        For a static, quantized, offloaded or other non-dynamic cache, naming the fix.
    """
    from transformers import DynamicCache

    bad = None if isinstance(cache, DynamicCache) else type(cache).__name__
    layers = getattr(cache, "layers", None)
    if bad is None and layers:
        kinds = {type(layer).__name__ for layer in layers}
        unknown = kinds - set(_SUPPORTED_CACHE_LAYERS)
        if unknown:
            bad = f"DynamicCache with {', '.join(sorted(unknown))} layers"
    if bad:
        raise ValueError(
            f"himap needs a plain DynamicCache (the default of generate) so that layers after a pruning "
            f"step can hold fewer tokens; got {bad}. Drop cache_implementation=... (e.g. 'static') or pass "
            f"a DynamicCache(config=model.config.text_config) yourself."
        )


def cache_layer_values(cache: Any, layer_idx: int) -> torch.Tensor:
    """The value tensor, shape (B, H_kv, L, head_dim), that layer ``layer_idx`` of a DynamicCache holds.

    Raises
    ------
    ContractError
        If the cache does not store per-layer ``values`` tensors of that shape.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        raise ContractError("a DynamicCache keeps one entry per decoder layer in `cache.layers`")
    values = getattr(layers[layer_idx], "values", None)
    if not isinstance(values, torch.Tensor) or values.dim() != 4:
        raise ContractError(
            "a DynamicCache layer stores its values as a 4-D tensor `values` (batch, kv heads, tokens, head dim)",
            f"Layer {layer_idx} holds {type(values).__name__}.",
        )
    return values


def model_cache_kwarg(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes a KV cache (``"cache"`` from 5.24)."""
    return _cache_name(_params(model)[0], "the model", model)


def cache_call_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to ``model.forward`` (for callers driving decode steps)."""
    return {model_cache_kwarg(model): cache}


def output_cache(output: Any) -> Any:
    """The KV cache a model returned (``output.cache`` from 5.24, ``output.past_key_values`` before).

    Raises
    ------
    ContractError
        If the output has neither field.
    """
    keys = output.keys() if hasattr(output, "keys") else ()
    for name in CACHE_KWARGS:
        if name in keys:
            return output[name]
    raise ContractError(
        "a model output carries its KV cache as `cache` or `past_key_values`",
        f"{type(output).__name__} has fields {', '.join(keys) or 'none'} (was use_cache=True passed?).",
    )


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _mask_signature(fn_name: str) -> tuple[str, bool]:
    from transformers import masking_utils

    names = list(inspect.signature(inspect.unwrap(getattr(masking_utils, fn_name))).parameters)
    cache = next((n for n in CACHE_KWARGS if n in names), None)
    required = ("config", "inputs_embeds", "attention_mask", "position_ids")
    if cache is None or any(n not in names for n in required):
        raise ContractError(
            f"masking_utils.{fn_name} takes config, inputs_embeds, attention_mask, position_ids and a cache",
            f"Its parameters are {', '.join(names)}.",
        )
    return cache, "layer_idx" in names


class _OneLayerCache:
    """One layer of a cache, presented to ``masking_utils`` as a whole cache (transformers < 5.14).

    Releases before 5.14 size masks from the cache's first full-attention layer; a layer that
    dropped tokens holds fewer, so its mask must come from its own sizes.
    """

    is_compileable = False

    def __init__(self, cache: Any, layer_idx: int):
        self._cache = cache
        self._layer = layer_idx

    @property
    def is_sliding(self) -> list[bool]:
        return [bool(self._cache.is_sliding[self._layer])]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self._cache.get_seq_length(self._layer))

    def get_mask_sizes(self, query_length: Any, layer_idx: int = 0) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length, self._layer)


def layer_mask(
    config: Any,
    layer_idx: int,
    hidden: torch.Tensor,
    mask2d: torch.Tensor,
    cache: Any,
    *,
    sliding: bool,
    and_mask_function: Callable[..., Any] | None = None,
    or_mask_function: Callable[..., Any] | None = None,
) -> Any:
    """A decoder layer's attention mask from transformers' own builders, sized to that layer's cache.

    Parameters
    ----------
    config : PretrainedConfig
        The language model's config (its attention implementation picks the mask format).
    layer_idx : int
        The decoder layer (its cache may hold fewer tokens than layer 0's).
    hidden : Tensor, shape (B, Q, D)
        The layer's queries.
    mask2d : BoolTensor, shape (B, K)
        Keys allowed (cached slots then current ones).
    cache : Cache or None
    sliding : bool
        Use ``create_sliding_window_causal_mask`` (its window counts slots) instead of
        ``create_causal_mask``; ignored when mask functions are given (they carry the window).
    and_mask_function, or_mask_function : callable, optional
        Extra mask functions (``masking_utils`` conventions).
    """
    from transformers import masking_utils

    fn_name = "create_sliding_window_causal_mask" if sliding and and_mask_function is None else "create_causal_mask"
    cache_kw, has_layer_idx = _mask_signature(fn_name)
    kwargs: dict[str, Any] = dict(config=config, inputs_embeds=hidden, attention_mask=mask2d, position_ids=None)
    if has_layer_idx:
        kwargs[cache_kw] = cache
        kwargs["layer_idx"] = layer_idx
    else:
        kwargs[cache_kw] = _OneLayerCache(cache, layer_idx) if cache is not None else None
    if and_mask_function is not None:
        kwargs["and_mask_function"] = and_mask_function
    if or_mask_function is not None:
        kwargs["or_mask_function"] = or_mask_function
    return getattr(masking_utils, fn_name)(**kwargs)


def image_blocks_override_window() -> bool:
    """Whether a sliding-window layer lets an image block see all of itself beyond the window.

    Gemma3's sliding layers compose their mask as ``OR(AND(causal, window), block)`` before
    transformers 5.13 and as ``AND(window, OR(causal, block))`` from 5.13 on; pruned layers must
    follow the composition of the installed release.
    """
    return _version().release < (5, 13)


def blockwise_overlay(block_ids: torch.Tensor) -> Callable[..., Any]:
    """``masking_utils.blockwise_overlay``: tokens of one block attend to each other (Gemma3 images)."""
    from transformers import masking_utils

    fn = getattr(masking_utils, "blockwise_overlay", None)
    if fn is None:
        raise ContractError("masking_utils.blockwise_overlay exists (bidirectional image blocks)")
    return fn(block_ids)


# ---------------------------------------------------------------------------------------------
# call conventions
# ---------------------------------------------------------------------------------------------
def layer_hidden(args: tuple, kwargs: Mapping[str, Any], where: str) -> torch.Tensor:
    """The ``hidden_states`` a decoder layer (or attention module) is called with."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ContractError(
            f"{where} is called with hidden_states (batch, tokens, hidden) first or by keyword",
            f"Got {type(hidden).__name__}.",
        )
    return hidden


def with_layer_hidden(args: tuple, kwargs: dict[str, Any], hidden: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` of a decoder-layer call with ``hidden`` as its hidden states."""
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


def attn_hidden(args: tuple, kwargs: Mapping[str, Any], where: str) -> torch.Tensor:
    """The ``hidden_states`` of an attention-module call; the other inputs must come by keyword.

    Raises
    ------
    ContractError
        If the module is called with more than one positional argument (the engine reads
        ``position_embeddings`` and ``attention_mask`` by keyword).
    """
    if len(args) > 1:
        raise ContractError(
            f"{where} is called with hidden_states as its only positional argument",
            f"It got {len(args)} positional arguments.",
        )
    return layer_hidden(args, kwargs, where)


def decoder_output_hidden(output: Any) -> torch.Tensor:
    """The final hidden states a language model returns (``last_hidden_state`` or the tuple's first item)."""
    hidden = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)
    if not isinstance(hidden, torch.Tensor):
        raise ContractError(
            "the language model returns last_hidden_state (or a tuple starting with it)",
            f"Got {type(output).__name__}.",
        )
    return hidden


def with_decoder_output_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its final hidden states replaced by ``hidden``."""
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    output.last_hidden_state = hidden
    return output


def rotary_tables(position_embeddings: Any, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(cos, sin)`` an attention module applies, each of shape (B or 1, L, head_dim).

    Qwen2-VL / Qwen2.5-VL before transformers 5.17 hand their attention modules per-axis tables of
    shape (3, B, L, head_dim) and merge the temporal/height/width sections inside the module
    (``rope_parameters["mrope_section"]``); this merges them the same way.
    """
    cos, sin = position_embeddings
    if cos.dim() == 4:
        params = getattr(getattr(attn, "config", None), "rope_parameters", None) or {}
        section = params.get("mrope_section") if isinstance(params, Mapping) else None
        if not section or cos.shape[0] != 3:
            raise ContractError(
                "4-D rotary tables (3, batch, tokens, head_dim) come with config.rope_parameters['mrope_section']",
                f"Got tables of shape {tuple(cos.shape)} for {type(attn).__name__}.",
            )
        split = [int(s) for s in section] * 2
        cos = torch.cat([m[i % 3] for i, m in enumerate(cos.split(split, dim=-1))], dim=-1)
        sin = torch.cat([m[i % 3] for i, m in enumerate(sin.split(split, dim=-1))], dim=-1)
    if cos.dim() != 3:
        raise ContractError(
            "attention modules receive rotary tables (cos, sin) of shape (batch, tokens, head_dim)",
            f"Got {tuple(cos.shape)}.",
        )
    return cos, sin


def rotary_for_positions(decoder: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str) -> Any:
    """Rotary ``(cos, sin)`` of a language model for explicit 1-D ``position_ids`` (B, L).

    Calls ``decoder.rotary_emb(hidden, position_ids)`` (with the layer type for models whose
    rotary module takes one, e.g. Gemma3's local and global tables).

    Raises
    ------
    ContractError
        If the language model has no ``rotary_emb`` module of a known call convention.
    """
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise ContractError(f"the language model ({type(decoder).__name__}) computes its RoPE tables in `rotary_emb`")
    names = [n for n in inspect.signature(inspect.unwrap(type(rotary).forward)).parameters if n != "self"]
    if len(names) >= 3 and names[2] == "layer_type":
        return rotary(hidden, position_ids, layer_type)
    if len(names) >= 2:
        return rotary(hidden, position_ids)
    raise ContractError(
        f"`rotary_emb` ({type(rotary).__name__}.forward) takes (x, position_ids[, layer_type])",
        f"Its parameters are {', '.join(names)}.",
    )


def attention_weights(output: Any) -> torch.Tensor | None:
    """The attention weights an attention module returned (second item of its output), or ``None``."""
    if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return output[1]
    return None


def attn_implementation(config: Any) -> str:
    """The attention implementation a (text) config selects (``"eager"`` when unset)."""
    return str(getattr(config, "_attn_implementation", None) or "eager")


def attn_implementations(model: nn.Module) -> dict[str, str | None]:
    """The attention implementation of a model's config (key ``""``) and of each of its sub-configs."""
    config = model.config
    out: dict[str, str | None] = {"": getattr(config, "_attn_implementation", None)}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = getattr(sub, "_attn_implementation", None)
    return out


def restore_attn_implementations(model: nn.Module, previous: Mapping[str, str | None]) -> None:
    """Set the implementations :func:`attn_implementations` returned back on ``model``."""
    subs = {k: v for k, v in previous.items() if k and v is not None}
    top = previous.get("")
    if subs:
        set_attn_implementation(model, {"": top, **subs} if top is not None else subs)
    elif top is not None:
        set_attn_implementation(model, top)


def set_attn_implementation(module: nn.Module, implementation: str | dict[str, str]) -> None:
    """Switch a model's (or sub-model's) attention implementation (``set_attn_implementation``)."""
    setter = getattr(module, "set_attn_implementation", None)
    if setter is None:
        raise ContractError(f"{type(module).__name__} has set_attn_implementation")
    setter(implementation)


# ---------------------------------------------------------------------------------------------
# private import paths
# ---------------------------------------------------------------------------------------------
def _private(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(f"transformers.{module}"), name)
    except (ImportError, AttributeError) as exc:
        raise ContractError(f"transformers.{module}.{name} exists", str(exc)) from None


def llava_image_processor_class() -> type:
    """LLaVA's PIL image processor class (no torchvision needed)."""
    return _private("models.llava.image_processing_pil_llava", "LlavaImageProcessorPil")


def image_size_to_num_patches() -> Callable[..., int]:
    """LLaVA-NeXT's ``image_size_to_num_patches`` (how many anyres tiles an image gets)."""
    return _private("models.llava_next.modeling_llava_next", "image_size_to_num_patches")


def private_config_class(model_type: str, name: str) -> type:
    """A sub-config class that transformers does not export at top level (e.g. ``Qwen2VLVisionConfig``)."""
    return _private(f"models.{model_type}.configuration_{model_type}", name)
