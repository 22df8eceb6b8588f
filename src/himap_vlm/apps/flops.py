"""FLOPs and KV-cache calculator for image-token pruning.

Everything here is a pure function of a model's dimensions (:class:`TextDims`, optionally
:class:`VisionDims`), a token layout (:class:`Layout`: tokens before the image, image tokens,
tokens after) and the number of image tokens present in each decoder layer. A pruning method is
described to the calculator *only* by that per-layer count (``image_tokens_per_layer``): dense is
``[n] * L``, FastV ``K=2, R=50 %`` on 576 tokens is ``[576, 576, 288, ..., 288]``, and so on
(:func:`schedule_for` builds these lists for the static methods; measured counts, e.g.
VisiPruner's ``run.image_tokens_per_layer``, are accepted directly).

Two conventions
---------------
``"paper"``
    Image tokens only, as in the FastV and HiMAP papers: a decoder layer in which ``n`` image
    tokens are present costs ``4*n*d**2 + 2*n**2*d + 2*n*d*m`` FLOPs (``d`` hidden size, ``m`` FFN
    size): Q/K/V/O projections, the image-to-image attention square, and a two-matrix FFN.
    Text tokens, grouped-query heads, the gated third FFN matrix, the LM head and the vision
    tower are ignored. This is the formula behind the published LLaVA-1.5-7B numbers (576 image
    tokens, 32 layers): dense 2.986 TFLOPs, HiMAP ``K1=2 R1=50% K2=8 R2=75%`` 0.735 TFLOPs
    (24.6 %), FastV ``K=2 R=50%`` 1.566 TFLOPs (52.4 %); LLaVA-1.5-13B dense 5.813 TFLOPs. The
    papers print these *truncated* to two decimals (2.98, 0.73, 1.56, 5.81; 24 %).
``"exact"``
    Every token present in the layer (before + image + after), with the model's real shapes:
    Q and O projections ``d x H*hd``, K and V projections ``d x KV*hd`` (grouped-query
    attention), attention scores ``Q K^T`` and the weighted sum ``A V`` over the *causal
    triangle* (``s*(s+1)/2`` query-key pairs for ``s`` tokens; pass ``causal=False`` for the full
    ``s**2`` square that eager and SDPA kernels actually multiply), a gated FFN (gate, up and
    down matrices), the LM head (by default only the last position, as generation runs with
    ``logits_to_keep=1``), and optionally a CLIP-style vision tower plus the two-layer MLP
    projector of LLaVA. Element-wise work (norms, rotary embeddings, softmax, activations,
    residual adds) and the cost of computing pruning scores are not counted.

A multiply-add counts as 2 FLOPs in both conventions; 1 TFLOP is ``1e12`` FLOPs.

KV cache
--------
:func:`kv_cache_bytes` returns, per decoder layer, ``2 (K and V) * KV * hd * tokens_in_layer *
bytes_per_element``, summed over the batch: a pruned layer stores only the tokens still present
in it.

Batched measured counts
-----------------------
``run.image_tokens_per_layer`` from the engine is a list over layers of a list over the batch
(``[[n_0_b0, n_0_b1, ...], [n_1_b0, ...], ...]``). Every function here accepts that shape as
well as a flat list of ``L`` ints. FLOPs are then computed *per sample* (the layout applies to
every sample) and combined with ``batch_reduce``: ``"mean"`` (default; FLOPs of an average
sample, as in the papers), ``"sum"`` (the whole batch) or ``"first"`` (sample 0 only). KV-cache
bytes are always summed over the samples.

Examples
--------
>>> from himap_vlm.apps.flops import Layout, TextDims, prefill_flops, schedule_for
>>> dims = TextDims.from_config("llava-1.5-7b")
>>> counts = schedule_for("himap", 576, dims.num_layers, k1=2, r1=0.5, k2=8, r2=0.75)
>>> report = prefill_flops(dims, Layout(35, 576, 60), counts, convention="paper")
>>> round(report.tflops_dense, 3), round(report.tflops, 3), round(report.ratio, 3)
(2.986, 0.735, 0.246)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from himap_vlm.core.methods.base import kept_count

__all__ = [
    "CONVENTIONS",
    "FlopsReport",
    "Layout",
    "TextDims",
    "VisionDims",
    "bytes_per_element",
    "LLAVA_15_LAYOUT",
    "decode_step_flops",
    "default_layout",
    "flops_ratio_for_run",
    "keep_count",
    "kv_cache_bytes",
    "layout_from_inputs",
    "list_presets",
    "load_config",
    "paper_layer_flops",
    "prefill_flops",
    "schedule_for",
]

CONVENTIONS: tuple[str, ...] = ("exact", "paper")
"""Names accepted by the ``convention`` parameter."""

_BATCH_REDUCE = ("mean", "sum", "first")
_LOGITS = ("last", "all", "none")

Convention = Literal["exact", "paper"]
BatchReduce = Literal["mean", "sum", "first"]
Counts = Sequence[int] | Sequence[Sequence[int]]

# Vision towers named by the original LLaVA checkpoints (``mm_vision_tower``), which carry no
# ``vision_config``. CLIP ViT-L/14 at 336 px is the LLaVA-1.5 tower.
_KNOWN_TOWERS: dict[str, dict[str, int]] = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    ),
    "openai/clip-vit-large-patch14": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
    ),
}


# ---------------------------------------------------------------------------------------------
# configuration input
# ---------------------------------------------------------------------------------------------
def list_presets() -> list[str]:
    """Names of the model presets shipped with the package (``src/himap_vlm/apps/presets/*.json``).

    Returns
    -------
    list of str
        For example ``["llava-1.5-13b", "llava-1.5-7b"]``.
    """
    root = resources.files("himap_vlm.apps.presets")
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def _load_preset(name: str) -> dict[str, Any]:
    key = name.strip().lower()
    path = resources.files("himap_vlm.apps.presets") / f"{key}.json"
    if not path.is_file():
        raise ValueError(
            f"unknown preset {name!r} (config); available presets: {', '.join(list_presets())}, "
            "or pass a path to a Hugging Face config.json / model directory"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def load_config(config: Any) -> dict[str, Any] | Any:
    """Resolve a config argument to a ``dict`` or a ``transformers`` config object.

    Parameters
    ----------
    config : str, os.PathLike, dict or transformers.PretrainedConfig
        A preset name (see :func:`list_presets`), a path to a ``config.json`` or to a directory
        holding one, a parsed ``config.json`` dict, or a config object (returned unchanged).

    Returns
    -------
    dict or transformers.PretrainedConfig

    Raises
    ------
    ValueError
        For an unknown preset or a missing / unreadable file.
    """
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        text = os.fspath(config)
        path = Path(text).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ValueError(
                    f"config: cannot read {path} as JSON ({exc}); pass a Hugging Face config.json"
                ) from exc
        if text.endswith(".json") or os.sep in text:
            raise ValueError(
                f"config: file {text!r} not found; pass an existing config.json or a preset name ({', '.join(list_presets())})"
            )
        return _load_preset(text)
    if hasattr(config, "to_dict"):
        return config
    raise ValueError(
        f"config must be a preset name, a path to config.json, a dict or a transformers config; got {type(config).__name__}"
    )


def _transformers_config(d: Mapping[str, Any]) -> Any | None:
    """Build a transformers config object from a dict with a known ``model_type`` (fills defaults)."""
    model_type = d.get("model_type")
    if not isinstance(model_type, str):
        return None
    try:
        from transformers import CONFIG_MAPPING

        cls = CONFIG_MAPPING[model_type]
    except (ImportError, KeyError):
        return None
    kwargs = {k: v for k, v in d.items() if k != "model_type"}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError):
        return None


def _get(source: Any, key: str) -> Any:
    if isinstance(source, Mapping):
        return source.get(key)
    return getattr(source, key, None)


_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _text_source(cfg: Any) -> Any:
    """The text-model part of a (possibly multimodal) config, as a dict or config object."""
    if isinstance(cfg, Mapping):
        sub = cfg.get("text_config")
        if isinstance(sub, Mapping):
            if all(sub.get(k) is not None for k in _TEXT_KEYS):
                return sub
            # llava-hf configs list only non-default keys: complete them from transformers.
            for candidate in (sub, cfg):
                obj = _transformers_config(candidate)
                if obj is not None:
                    return _text_source(obj)
            return sub
        if all(cfg.get(k) is not None for k in _TEXT_KEYS):
            return cfg
        obj = _transformers_config(cfg)
        return _text_source(obj) if obj is not None else cfg
    getter = getattr(cfg, "get_text_config", None)
    if callable(getter):
        try:
            return getter(decoder=True)
        except TypeError:
            return getter()
    return getattr(cfg, "text_config", None) or cfg


def _positive_int(name: str, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{where}: {name} must be a positive integer; got {value!r}. Fix the config or the preset"
        )
    return value


@dataclass(frozen=True)
class TextDims:
    """Dimensions of a decoder-only text model.

    Parameters
    ----------
    hidden_size : int
        ``d``.
    intermediate_size : int
        FFN size ``m`` (gated FFN: gate and up ``d x m``, down ``m x d``).
    num_layers : int
        Number of decoder layers ``L``.
    num_heads : int
        Query heads ``H``.
    num_kv_heads : int
        Key/value heads ``KV`` (``KV < H``: grouped-query attention).
    head_dim : int
        Per-head dimension ``hd`` (usually ``d // H``).
    vocab_size : int
        LM-head output size ``V``.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
        ):
            _positive_int(name, getattr(self, name), "TextDims")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TextDims: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_config(cls, config: Any) -> TextDims:
        """Read the text-model dimensions from a config, a path or a preset name.

        Parameters
        ----------
        config : str, os.PathLike, dict or transformers.PretrainedConfig
            A preset name (``"llava-1.5-7b"``, ``"llava-1.5-13b"``), a path to a Hugging Face
            ``config.json`` (or its directory), a parsed dict, or a config object. Multimodal
            configs (with a ``text_config``) are reduced to their text model; keys missing from a
            llava-hf style ``text_config`` are filled with the defaults of its ``model_type``.

        Returns
        -------
        TextDims

        Raises
        ------
        ValueError
            For an unknown preset, an unreadable file, or a config lacking a required key.
        """
        src = _text_source(load_config(config))
        missing = [k for k in _TEXT_KEYS if _get(src, k) is None]
        if missing:
            raise ValueError(
                f"config: the text config lacks {', '.join(missing)}; pass a Hugging Face config.json of a "
                "decoder-only text model or of a LLaVA-style model with a text_config"
            )
        d = _get(src, "hidden_size")
        heads = _get(src, "num_attention_heads")
        kv = _get(src, "num_key_value_heads") or heads
        head_dim = _get(src, "head_dim") or (
            d // heads if isinstance(d, int) and isinstance(heads, int) else None
        )
        return cls(
            hidden_size=d,
            intermediate_size=_get(src, "intermediate_size"),
            num_layers=_get(src, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            vocab_size=_get(src, "vocab_size"),
        )


@dataclass(frozen=True)
class VisionDims:
    """Dimensions of a CLIP-style vision tower and LLaVA's two-layer MLP projector.

    Parameters
    ----------
    hidden_size, intermediate_size, num_layers, num_heads : int
        ViT width, MLP size, depth and heads (CLIP ViT-L/14: 1024, 4096, 24, 16).
    image_size, patch_size : int
        Input resolution and patch size (336 and 14 give 576 patches plus one CLS token).
    projector_hidden, projector_out : int
        Projector ``Linear(hidden_size, projector_hidden) -> GELU -> Linear(projector_hidden,
        projector_out)``; both equal the text hidden size in LLaVA.
    num_channels : int
        Image channels (3).
    keep_cls : bool
        ``False`` (LLaVA's ``vision_feature_select_strategy="default"``): the CLS token is
        dropped before the projector, so an image yields ``num_patches`` image tokens.

    Notes
    -----
    Every ViT layer is counted, even when LLaVA reads the features of the penultimate layer:
    transformers (and the original LLaVA code) run the whole tower.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    projector_hidden: int
    projector_out: int
    num_channels: int = 3
    keep_cls: bool = False

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "image_size",
            "patch_size",
            "projector_hidden",
            "projector_out",
            "num_channels",
        ):
            _positive_int(name, getattr(self, name), "VisionDims")

    @property
    def num_patches(self) -> int:
        """Patches per image, ``(image_size // patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        """Tokens inside the ViT: patches plus the CLS token."""
        return self.num_patches + 1

    @property
    def num_image_tokens(self) -> int:
        """Image tokens one image contributes to the language model."""
        return self.seq_len if self.keep_cls else self.num_patches

    @classmethod
    def from_config(cls, config: Any) -> VisionDims:
        """Read vision-tower and projector dimensions from a LLaVA-style config or a preset.

        Parameters
        ----------
        config : str, os.PathLike, dict or transformers.PretrainedConfig
            Same inputs as :meth:`TextDims.from_config`. The config needs a ``vision_config``
            (llava-hf layout) or an ``mm_vision_tower`` naming a known CLIP tower (original
            LLaVA layout).

        Returns
        -------
        VisionDims

        Raises
        ------
        ValueError
            When the config describes no vision tower.
        """
        cfg = load_config(config)
        text = TextDims.from_config(cfg)
        vision = _get(cfg, "vision_config")
        if vision is not None and not isinstance(vision, Mapping):
            vision = vision.to_dict()
        if isinstance(vision, Mapping):
            vision = dict(vision)
            need = (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "image_size",
                "patch_size",
            )
            if any(vision.get(k) is None for k in need):
                obj = _transformers_config(vision)
                if obj is not None:
                    vision = {**obj.to_dict(), **{k: v for k, v in vision.items() if v is not None}}
        else:
            tower = _get(cfg, "mm_vision_tower")
            if not isinstance(tower, str) or tower not in _KNOWN_TOWERS:
                raise ValueError(
                    "config: no vision_config (and no known mm_vision_tower) in this config; pass a LLaVA-style "
                    f"config or a preset ({', '.join(list_presets())}), or leave the vision tower out"
                )
            vision = dict(_KNOWN_TOWERS[tower])
        projector = _get(cfg, "projector") or {}
        strategy = (
            _get(cfg, "vision_feature_select_strategy") or _get(cfg, "mm_vision_select_feature") or "default"
        )
        try:
            return cls(
                hidden_size=vision["hidden_size"],
                intermediate_size=vision["intermediate_size"],
                num_layers=vision["num_hidden_layers"],
                num_heads=vision["num_attention_heads"],
                image_size=vision["image_size"],
                patch_size=vision["patch_size"],
                projector_hidden=projector.get("hidden_features", text.hidden_size),
                projector_out=projector.get("out_features", text.hidden_size),
                num_channels=vision.get("num_channels", 3) or 3,
                keep_cls=strategy in ("full", "cls_patch"),
            )
        except KeyError as exc:
            raise ValueError(
                f"config: vision_config lacks {exc.args[0]}; pass a complete CLIP vision config"
            ) from exc


# ---------------------------------------------------------------------------------------------
# layout and schedules
# ---------------------------------------------------------------------------------------------
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


def _check_ratio(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= 1
    ):
        raise ValueError(
            f"{name} must be a number in [0, 1] (fraction of image tokens pruned); got {value!r}"
        )
    return float(value)


def _check_layer(name: str, value: Any, num_layers: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= num_layers:
        raise ValueError(
            f"{name} must be a layer index in [0, {num_layers}] for a model with {num_layers} decoder layers; got {value!r}"
        )
    return value


_METHOD_PARAMS: dict[str, dict[str, Any]] = {
    "dense": {},
    "fastv": {"k": 2, "r": 0.5},
    "random": {"k": 2, "r": 0.5, "seed": 0},
    "himap": {"k1": 2, "r1": 0.5, "k2": 8, "r2": 0.75},
    "vtw": {"k": 16},
}
_METHOD_ALIASES = {
    "randomprune": "random",
    "random_prune": "random",
    "random-prune": "random",
    "none": "dense",
}


def schedule_for(method_name: str, n_img: int, L: int, **kwargs: Any) -> list[int]:
    """Image tokens present in each decoder layer for a static method.

    A prune step "at layer K" means layers ``K, K+1, ...`` run without the pruned tokens;
    the kept count is :func:`keep_count`. Parameters not given take the papers' defaults.

    Parameters
    ----------
    method_name : str
        ``"dense"``; ``"fastv"`` (``k=2, r=0.5``); ``"random"`` (``k=2, r=0.5, seed=0``; the
        seed does not change the counts); ``"himap"`` (``k1=2, r1=0.5, k2=8, r2=0.75``; ``r2`` is
        the fraction of the tokens left after ``k1``); ``"vtw"`` (``k=16``: every image token is
        removed from layer ``k`` on).
    n_img : int
        Image tokens in the input.
    L : int
        Number of decoder layers.
    **kwargs
        Method parameters (``k``, ``r``, ``k1``, ``r1``, ``k2``, ``r2``, ``seed``).

    Returns
    -------
    list of int
        ``L`` counts.

    Raises
    ------
    ValueError
        For an unknown or input-dependent method (VisiPruner: pass measured counts instead), an
        unknown parameter, or a parameter out of range.
    """
    name = _METHOD_ALIASES.get(method_name.strip().lower(), method_name.strip().lower())
    if name == "visipruner":
        raise ValueError(
            "method 'visipruner' keeps an input-dependent number of image tokens; pass the measured "
            "counts (run.image_tokens_per_layer) as image_tokens_per_layer / --counts instead"
        )
    if name not in _METHOD_PARAMS:
        raise ValueError(
            f"unknown method {method_name!r}; known methods: {', '.join(sorted(_METHOD_PARAMS))}"
        )
    n_img = _non_negative_int("n_img", n_img)
    L = _positive_int("L (number of layers)", L, "schedule_for")
    unknown = sorted(set(kwargs) - set(_METHOD_PARAMS[name]))
    if unknown:
        accepted = ", ".join(_METHOD_PARAMS[name]) or "none"
        raise ValueError(
            f"method {name!r} takes no parameter {', '.join(unknown)}; its parameters: {accepted}"
        )
    p = {**_METHOD_PARAMS[name], **kwargs}
    if name == "dense":
        return [n_img] * L
    if name in ("fastv", "random"):
        k = _check_layer("k", p["k"], L)
        kept = keep_count(n_img, _check_ratio("r", p["r"]))
        return [n_img if layer < k else kept for layer in range(L)]
    if name == "vtw":
        k = _check_layer("k", p["k"], L)
        return [n_img if layer < k else 0 for layer in range(L)]
    k1, k2 = _check_layer("k1", p["k1"], L), _check_layer("k2", p["k2"], L)
    if k2 < k1:
        raise ValueError(f"k2={k2} must be >= k1={k1} (the deep pruning step comes after the shallow one)")
    n1 = keep_count(n_img, _check_ratio("r1", p["r1"]))
    n2 = keep_count(n1, _check_ratio("r2", p["r2"]))
    return [n_img if layer < k1 else n1 if layer < k2 else n2 for layer in range(L)]


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


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; use one of: {', '.join(repr(c) for c in choices)}")
    return value


# ---------------------------------------------------------------------------------------------
# per-layer formulas
# ---------------------------------------------------------------------------------------------
def paper_layer_flops(n: int, d: int, m: int) -> int:
    """FLOPs of ``n`` image tokens in one decoder layer, paper convention.

    ``4*n*d**2 + 2*n**2*d + 2*n*d*m`` (FastV, HiMAP).

    Parameters
    ----------
    n : int
        Image tokens present in the layer.
    d, m : int
        Hidden size and FFN size.
    """
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def _exact_layer_flops(dims: TextDims, s: int, causal: bool) -> int:
    """Prefill FLOPs of one decoder layer over ``s`` tokens (exact convention)."""
    d, hd = dims.hidden_size, dims.head_dim
    q_width, kv_width = dims.num_heads * hd, dims.num_kv_heads * hd
    proj = 2 * s * d * (2 * q_width + 2 * kv_width)  # q, o: d x H*hd; k, v: d x KV*hd
    pairs = s * (s + 1) // 2 if causal else s * s  # query-key pairs per head
    attn = 2 * (2 * pairs * hd) * dims.num_heads  # QK^T and AV
    ffn = 3 * 2 * s * d * dims.intermediate_size  # gate, up, down
    return proj + attn + ffn


def _exact_decode_layer_flops(dims: TextDims, kv_len: int) -> int:
    """FLOPs of one new token in one decoder layer attending to ``kv_len`` keys (itself included)."""
    d, hd = dims.hidden_size, dims.head_dim
    proj = 2 * d * (2 * dims.num_heads * hd + 2 * dims.num_kv_heads * hd)
    attn = 2 * (2 * kv_len * hd) * dims.num_heads
    ffn = 3 * 2 * d * dims.intermediate_size
    return proj + attn + ffn


def _vision_flops(vision: VisionDims, num_images: int) -> dict[str, int]:
    s, h = vision.seq_len, vision.hidden_size
    patch = 2 * vision.num_patches * (vision.num_channels * vision.patch_size**2) * h
    layer = 4 * 2 * s * h * h + 2 * 2 * s * s * h + 2 * 2 * s * h * vision.intermediate_size
    n = vision.num_image_tokens
    projector = 2 * n * h * vision.projector_hidden + 2 * n * vision.projector_hidden * vision.projector_out
    return {
        "vision_tower": num_images * (patch + vision.num_layers * layer),
        "projector": num_images * projector,
    }


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlopsReport:
    """FLOPs of one forward pass (prefill or one decode step), with the dense reference.

    Attributes
    ----------
    convention : {"exact", "paper"}
    phase : {"prefill", "decode"}
    image_tokens_per_layer : list of float
        Image tokens present in each decoder layer (batch-reduced like the FLOPs).
    per_layer : list of float
        FLOPs of each decoder layer.
    dense_per_layer : list of float
        The same with every image token in every layer.
    other : dict of str to float
        FLOPs outside the decoder layers (``"lm_head"``, ``"vision_tower"``, ``"projector"``);
        empty in the paper convention.
    dense_other : dict of str to float
        The same for the dense reference (differs from :attr:`other` only for the LM head over
        all positions, ``logits="all"``).
    """

    convention: str
    phase: str
    image_tokens_per_layer: list[float]
    per_layer: list[float]
    dense_per_layer: list[float]
    other: dict[str, float] = field(default_factory=dict)
    dense_other: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """FLOPs of the pass: decoder layers plus :attr:`other`."""
        return sum(self.per_layer) + sum(self.other.values())

    @property
    def dense_total(self) -> float:
        """FLOPs of the same pass without pruning."""
        return sum(self.dense_per_layer) + sum(self.dense_other.values())

    @property
    def ratio(self) -> float:
        """``total / dense_total`` (1.0 for dense; 0.246 for HiMAP on LLaVA-1.5-7B, paper)."""
        return self.total / self.dense_total if self.dense_total else 1.0

    @property
    def tflops(self) -> float:
        """:attr:`total` in TFLOPs (1e12)."""
        return self.total / 1e12

    @property
    def tflops_dense(self) -> float:
        """:attr:`dense_total` in TFLOPs (1e12)."""
        return self.dense_total / 1e12

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (totals, ratio and per-layer lists)."""
        return {
            "convention": self.convention,
            "phase": self.phase,
            "flops": self.total,
            "flops_dense": self.dense_total,
            "tflops": self.tflops,
            "tflops_dense": self.tflops_dense,
            "ratio": self.ratio,
            "image_tokens_per_layer": list(self.image_tokens_per_layer),
            "per_layer_flops": list(self.per_layer),
            "per_layer_flops_dense": list(self.dense_per_layer),
            "other_flops": dict(self.other),
            "other_flops_dense": dict(self.dense_other),
        }


def _reduce(rows: list[list[int]], how: str) -> list[float]:
    if how == "first" or len(rows) == 1:
        return list(rows[0])
    sums = [sum(col) for col in zip(*rows, strict=True)]
    if how == "sum":
        return sums
    return [v / len(rows) for v in sums]


def _prepare(
    dims: TextDims, layout: Layout, counts: Any, convention: str, batch_reduce: str
) -> list[list[int]]:
    if not isinstance(dims, TextDims):
        raise ValueError(
            f"dims must be a TextDims (use TextDims.from_config(...)); got {type(dims).__name__}"
        )
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be a Layout(before, image, after); got {type(layout).__name__}")
    _check_choice("convention", convention, CONVENTIONS)
    _check_choice("batch_reduce", batch_reduce, _BATCH_REDUCE)
    return _per_sample_counts(counts, dims.num_layers, layout.image)


def prefill_flops(
    dims: TextDims,
    layout: Layout,
    image_tokens_per_layer: Counts | None = None,
    convention: Convention = "exact",
    *,
    causal: bool = True,
    logits: Literal["last", "all", "none"] = "last",
    vision: VisionDims | None = None,
    batch_reduce: BatchReduce = "mean",
) -> FlopsReport:
    """FLOPs of the prefill (the forward pass over the prompt).

    Parameters
    ----------
    dims : TextDims
        Text-model dimensions.
    layout : Layout
        Prompt layout; ``layout.image`` is the image-token count before any pruning.
    image_tokens_per_layer : list of int, or list over layers of lists over the batch, optional
        Image tokens present in each decoder layer (``None``: dense). See the module docstring
        for the batched shape.
    convention : {"exact", "paper"}
        See the module docstring.
    causal : bool
        Exact convention: count the causal triangle of attention (default) or, with ``False``,
        the full ``s x s`` square that attention kernels compute (and that
        ``torch.utils.flop_counter`` reports).
    logits : {"last", "all", "none"}
        Exact convention: LM head on the last position only (generation), on every position
        still present in the last layer, or not at all.
    vision : VisionDims, optional
        Exact convention: also count the vision tower and projector, for
        ``layout.image // vision.num_image_tokens`` images.
    batch_reduce : {"mean", "sum", "first"}
        How per-sample FLOPs of batched counts are combined.

    Returns
    -------
    FlopsReport

    Raises
    ------
    ValueError
        For an unknown convention / option, bad counts, or options that apply only to the exact
        convention.
    """
    samples = _prepare(dims, layout, image_tokens_per_layer, convention, batch_reduce)
    _check_choice("logits", logits, _LOGITS)
    scale = len(samples) if batch_reduce == "sum" else 1
    other: dict[str, float] = {}
    dense_other: dict[str, float] = {}
    if convention == "paper":
        if vision is not None:
            raise ValueError(
                "vision applies only to convention='exact' (the paper formula counts image tokens in the LLM only)"
            )
        d, m = dims.hidden_size, dims.intermediate_size
        per_sample = [[paper_layer_flops(n, d, m) for n in sample] for sample in samples]
        dense = [paper_layer_flops(layout.image, d, m)] * dims.num_layers
    else:
        text = layout.text
        per_sample = [[_exact_layer_flops(dims, text + n, causal) for n in sample] for sample in samples]
        dense = [_exact_layer_flops(dims, layout.total, causal)] * dims.num_layers
        lm_per_position = 2 * dims.hidden_size * dims.vocab_size
        if logits == "last":
            other["lm_head"] = dense_other["lm_head"] = lm_per_position * scale
        elif logits == "all":
            # every position still present after the last decoder layer
            other["lm_head"] = _reduce([[lm_per_position * (text + s[-1])] for s in samples], batch_reduce)[0]
            dense_other["lm_head"] = lm_per_position * layout.total * scale
        if vision is not None:
            if not isinstance(vision, VisionDims):
                raise ValueError(
                    f"vision must be a VisionDims (use VisionDims.from_config(...)); got {type(vision).__name__}"
                )
            per_image = vision.num_image_tokens
            if layout.image % per_image:
                raise ValueError(
                    f"layout.image = {layout.image} is not a multiple of the {per_image} tokens one image yields with this "
                    "vision tower; fix the layout or leave vision out"
                )
            for key, value in _vision_flops(vision, layout.image // per_image).items():
                other[key] = dense_other[key] = value * scale
    return FlopsReport(
        convention=convention,
        phase="prefill",
        image_tokens_per_layer=_reduce(samples, batch_reduce),
        per_layer=_reduce(per_sample, batch_reduce),
        dense_per_layer=[v * scale for v in dense],
        other=other,
        dense_other=dense_other,
    )


def decode_step_flops(
    dims: TextDims,
    layout: Layout,
    image_tokens_per_layer: Counts | None = None,
    convention: Convention = "exact",
    *,
    generated: int = 0,
    batch_reduce: BatchReduce = "mean",
) -> FlopsReport:
    """FLOPs of one decode step: one new token attending to each layer's KV cache.

    In layer ``l`` the new token attends to ``kv_len = text + image_tokens_per_layer[l] +
    generated + 1`` keys: the prompt tokens cached in that layer at prefill, the ``generated``
    tokens decoded before it, and itself.

    Parameters
    ----------
    dims, layout, image_tokens_per_layer, batch_reduce
        As in :func:`prefill_flops`.
    convention : {"exact", "paper"}
        ``"exact"``: projections, attention over ``kv_len`` keys, gated FFN and the LM head on
        the new token. ``"paper"``: the part of the step due to image tokens only, i.e. the new
        query's scores and weighted sum over the ``n`` cached image tokens, ``4*n*d`` per layer
        (the image tokens themselves are not recomputed during decoding).
    generated : int
        Tokens decoded (and cached) before this step; 0 for the first decode step after the
        prefill.

    Returns
    -------
    FlopsReport
    """
    samples = _prepare(dims, layout, image_tokens_per_layer, convention, batch_reduce)
    generated = _non_negative_int("generated", generated)
    scale = len(samples) if batch_reduce == "sum" else 1
    if convention == "paper":
        d = dims.hidden_size
        per_sample = [[4 * n * d for n in sample] for sample in samples]
        dense = [4 * layout.image * d] * dims.num_layers
        other: dict[str, float] = {}
    else:
        base = layout.text + generated + 1
        per_sample = [[_exact_decode_layer_flops(dims, base + n) for n in sample] for sample in samples]
        dense = [_exact_decode_layer_flops(dims, base + layout.image)] * dims.num_layers
        other = {"lm_head": 2 * dims.hidden_size * dims.vocab_size * scale}
    return FlopsReport(
        convention=convention,
        phase="decode",
        image_tokens_per_layer=_reduce(samples, batch_reduce),
        per_layer=_reduce(per_sample, batch_reduce),
        dense_per_layer=[v * scale for v in dense],
        other=other,
        dense_other=dict(other),
    )


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------
_DTYPE_ALIASES = {
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
    "fp8": "float8_e4m3fn",
}


def bytes_per_element(dtype: torch.dtype | str | int) -> int:
    """Bytes of one cache element.

    Parameters
    ----------
    dtype : torch.dtype, str or int
        A torch dtype, its name (``"float16"``, ``"bf16"``, ``"fp32"``, ``"int8"``, ...) or a
        number of bytes.

    Raises
    ------
    ValueError
        For an unknown name or a non-positive size.
    """
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype <= 0:
            raise ValueError(f"dtype as a byte count must be positive; got {dtype}")
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        resolved = getattr(torch, _DTYPE_ALIASES.get(name, name), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(
                f"unknown dtype {dtype!r}; use a torch dtype name such as 'float16', 'bfloat16' or 'float32'"
            )
        dtype = resolved
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, a dtype name or a byte count; got {dtype!r}")
    return dtype.itemsize


def kv_cache_bytes(
    dims: TextDims,
    layout: Layout,
    image_tokens_per_layer: Counts | None = None,
    dtype: torch.dtype | str | int = torch.float16,
    batch: int = 1,
    *,
    generated: int = 0,
) -> list[int]:
    """KV-cache bytes of each decoder layer after the prefill (plus ``generated`` tokens).

    ``2 * KV * hd * (text + image_tokens_per_layer[l] + generated) * bytes_per_element``, summed
    over the batch.

    Parameters
    ----------
    dims, layout
        As in :func:`prefill_flops`.
    image_tokens_per_layer : list of int, or list over layers of lists over the batch, optional
        ``None``: dense. With batched counts, each sample's own counts are used and ``batch``
        must be 1 (the default) or the batch size of the counts.
    dtype : torch.dtype, str or int
        Cache element type (see :func:`bytes_per_element`).
    batch : int
        Samples sharing a flat (per-layer) count list.
    generated : int
        Tokens decoded after the prefill and appended to every layer's cache.

    Returns
    -------
    list of int
        ``L`` byte counts. Padding of batched caches is not counted.
    """
    if not isinstance(dims, TextDims):
        raise ValueError(
            f"dims must be a TextDims (use TextDims.from_config(...)); got {type(dims).__name__}"
        )
    if not isinstance(layout, Layout):
        raise ValueError(f"layout must be a Layout(before, image, after); got {type(layout).__name__}")
    size = bytes_per_element(dtype)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer; got {batch!r}")
    generated = _non_negative_int("generated", generated)
    samples = _per_sample_counts(image_tokens_per_layer, dims.num_layers, layout.image)
    if len(samples) > 1:
        if batch not in (1, len(samples)):
            raise ValueError(
                f"batch={batch} disagrees with the {len(samples)} samples in image_tokens_per_layer; leave batch at 1 "
                "when passing per-sample counts"
            )
    else:
        samples = samples * batch
    per_token = 2 * dims.num_kv_heads * dims.head_dim * size
    base = layout.text + generated
    return [sum(per_token * (base + s[layer]) for s in samples) for layer in range(dims.num_layers)]


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


# ---------------------------------------------------------------------------------------------
# from a model run
# ---------------------------------------------------------------------------------------------
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


def flops_ratio_for_run(
    model: Any,
    inputs: Mapping[str, Any],
    image_tokens_per_layer: Counts,
    convention: Convention = "exact",
    *,
    sample: int = 0,
) -> float:
    """Prefill FLOPs of a pruned run over the dense prefill of the same input.

    The layout comes from ``inputs`` (:func:`layout_from_inputs`, sample ``sample``), the text
    dimensions from the model's text config, and the counts are what the engine measured
    (``[c[sample] for c in run.image_tokens_per_layer]``, or the batched list itself).

    Parameters
    ----------
    model : transformers model
        A supported multimodal model (its config has an ``image_token_id``).
    inputs : mapping
        The processor's output (``input_ids``, optionally ``attention_mask``).
    image_tokens_per_layer : list of int, or list over layers of lists over the batch
        Image tokens present in each decoder layer; batched counts are reduced to ``sample``.
    convention : {"exact", "paper"}
        See the module docstring; the exact convention counts the LM head on the last position.
    sample : int
        Which sample of the batch (layout and, for batched counts, the counts).

    Returns
    -------
    float
        ``prefill_flops(...).ratio``: 1.0 for dense.
    """
    config = model.config
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    if token_id is None:
        raise ValueError("the model config has no image_token_id: cannot locate image tokens in the inputs")
    layout = layout_from_inputs(inputs["input_ids"], int(token_id), inputs.get("attention_mask"), sample)
    counts: Any = image_tokens_per_layer
    if counts and isinstance(counts[0], Sequence):
        counts = [int(c[sample]) for c in counts]
    dims = TextDims.from_config(config)
    return prefill_flops(dims, layout, counts, convention).ratio
