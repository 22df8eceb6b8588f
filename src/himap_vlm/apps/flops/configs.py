"""Model dimensions for the FLOPs calculator: presets, ``config.json`` files and config objects.

:class:`TextDims` (decoder-only text model) and :class:`VisionDims` (CLIP-style tower plus LLaVA's
projector) are read from a preset name (:func:`list_presets`), a Hugging Face ``config.json`` (or
its directory), a parsed dict or a ``transformers`` config object; keys a llava-hf config leaves
out are completed with the defaults of its ``model_type``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["TextDims", "VisionDims", "list_presets", "load_config"]

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
