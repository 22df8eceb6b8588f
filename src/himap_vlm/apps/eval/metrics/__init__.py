"""Metrics of the evaluation tasks, usable on their own.

* :mod:`~himap_vlm.apps.eval.metrics.vqa`: official VQA accuracy with the EvalAI answer normalisation;
* :mod:`~himap_vlm.apps.eval.metrics.cider`: CIDEr-D as in pycocoevalcap;
* :mod:`~himap_vlm.apps.eval.metrics.classification`: accuracy, yes/no precision/recall/F1 (POPE);
* :mod:`~himap_vlm.apps.eval.metrics.choice`: multiple-choice option formatting and letter extraction.
"""

from __future__ import annotations

from .choice import LETTERS, MC_INSTRUCTION, format_options, parse_option_letter, split_options
from .cider import CiderD, cider_d, tokenize_caption
from .classification import BinaryStats, binary_stats, mean
from .vqa import normalize_vqa_answer, vqa_accuracy

__all__ = [
    "LETTERS",
    "MC_INSTRUCTION",
    "BinaryStats",
    "CiderD",
    "binary_stats",
    "cider_d",
    "format_options",
    "mean",
    "normalize_vqa_answer",
    "parse_option_letter",
    "split_options",
    "tokenize_caption",
    "vqa_accuracy",
]
