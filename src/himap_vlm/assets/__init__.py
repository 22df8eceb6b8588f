"""Files shipped inside the himap package: the embedded tiny trained LLaVA.

``tiny_llava/`` (when this build ships it) is a ``save_pretrained`` directory of the tiny
LLaVA trained on the synthetic scene-QA benchmark by ``scripts/train_tiny_llava.py``
(``config.json``, ``model.safetensors``, the processor files and the model card as
``README.md``). It loads offline with the stock classes::

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from himap_vlm.assets import tiny_llava_path

    path = tiny_llava_path()
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)

It is package data: the wheel includes every file under ``src/himap``, this folder included.
``himap demo`` uses it by default.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["TINY_LLAVA_DIRNAME", "has_tiny_llava", "tiny_llava_path"]

TINY_LLAVA_DIRNAME = "tiny_llava"
"""Name of the embedded model's folder inside :mod:`himap_vlm.assets`."""

_REQUIRED = ("config.json",)


def tiny_llava_path() -> Path:
    """Where the embedded tiny trained LLaVA lives in the installed package.

    The path is returned whether or not the folder exists (a build without the model has no
    such folder): check with :func:`has_tiny_llava`.

    Returns
    -------
    Path
        ``<site-packages>/himap_vlm/assets/tiny_llava`` (``src/himap_vlm/assets/tiny_llava`` in a
        source checkout).
    """
    return Path(str(files("himap_vlm").joinpath("assets", TINY_LLAVA_DIRNAME)))


def has_tiny_llava(path: Path | None = None) -> bool:
    """Whether the embedded model is shipped (its folder exists with a ``config.json``).

    Parameters
    ----------
    path : Path, optional
        The folder to check (default :func:`tiny_llava_path`).

    Returns
    -------
    bool
    """
    folder = tiny_llava_path() if path is None else Path(path)
    return folder.is_dir() and all((folder / name).is_file() for name in _REQUIRED)
