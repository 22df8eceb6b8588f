"""Evaluation tasks and their registry.

>>> from himap_vlm.apps.eval.tasks import get_task, list_tasks
>>> list_tasks()[:3]
['aokvqa_mc', 'flickr30k', 'gqa']
>>> get_task("pope").prompt  # doctest: +ELLIPSIS
<bound method POPE.prompt of POPE(name='pope')>
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .aokvqa import AOKVQAMultipleChoice
from .base import CAPTION_PROMPT, SHORT_ANSWER_INSTRUCTION, Sample, Task
from .captioning import CaptioningTask, Flickr30k, NoCaps
from .gqa import GQA
from .mmbench import MMBench
from .mme import MME
from .pope import POPE
from .scienceqa import ScienceQAImg
from .synthetic import Synthetic
from .textvqa import TextVQA
from .vqav2 import VQAv2

__all__ = [
    "Sample",
    "Task",
    "CaptioningTask",
    "SHORT_ANSWER_INSTRUCTION",
    "CAPTION_PROMPT",
    "get_task",
    "list_tasks",
    "register_task",
    "AOKVQAMultipleChoice",
    "Flickr30k",
    "GQA",
    "MMBench",
    "MME",
    "NoCaps",
    "POPE",
    "ScienceQAImg",
    "Synthetic",
    "TextVQA",
    "VQAv2",
]

_REGISTRY: dict[str, Callable[..., Task]] = {}


def register_task(name: str, factory: Callable[..., Task], *, overwrite: bool = False) -> None:
    """Make a task available to :func:`get_task`.

    Parameters
    ----------
    name
        Registry name (lowercase, ``_`` separated).
    factory
        A :class:`Task` subclass or any callable returning a task; keyword options given to
        :func:`get_task` are passed to it.
    overwrite
        Replace an existing registration instead of raising.
    """
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"Task {name!r} is already registered")
    _REGISTRY[name] = factory


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_REGISTRY)


def get_task(name: str, **options: Any) -> Task:
    """Instantiate a registered task.

    Parameters
    ----------
    name
        Task name (case-insensitive; ``-`` and ``_`` are interchangeable).
    **options
        Task options (e.g. ``use_ocr_tokens=False`` for ``textvqa``).

    Raises
    ------
    ValueError
        For an unknown name, listing the known tasks.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"Unknown task {name!r}. Known tasks: {', '.join(list_tasks())}")
    return _REGISTRY[key](**options)


for _cls in (
    ScienceQAImg,
    AOKVQAMultipleChoice,
    MMBench,
    POPE,
    MME,
    GQA,
    VQAv2,
    TextVQA,
    NoCaps,
    Flickr30k,
    Synthetic,
):
    register_task(_cls.name, _cls)
del _cls
