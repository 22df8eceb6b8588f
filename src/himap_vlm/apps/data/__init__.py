"""Datasets for training and evaluating token pruning (see :mod:`himap_vlm.apps.data.synthetic`)."""

from __future__ import annotations

from himap_vlm.apps.data.synthetic import (
    CHOICE_INSTRUCTION,
    COLORS,
    FAMILIES,
    LETTERS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    SPLITS,
    VOCABULARY,
    SceneQAConfig,
    generate_questions,
    generate_scenes,
    load_synthetic,
    read_jsonl,
    render_scene,
    score,
    split_words,
    to_hf_dataset,
    write_jsonl,
)

__all__ = [
    "CHOICE_INSTRUCTION",
    "COLORS",
    "FAMILIES",
    "LETTERS",
    "NUMBER_WORDS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "VOCABULARY",
    "SceneQAConfig",
    "generate_questions",
    "generate_scenes",
    "load_synthetic",
    "read_jsonl",
    "render_scene",
    "score",
    "split_words",
    "to_hf_dataset",
    "write_jsonl",
]
