"""Scenes: drawing objects on the grid (content-disjoint splits) and rendering them."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .config import _SPLIT_BOUNDS, _SPLIT_CODES, SceneQAConfig, _check_int, _resolve_split
from .vocab import COLOR_RGB, SIZES

__all__ = ["generate_scenes", "render_scene"]


def _content_key(objects: Sequence[Mapping[str, Any]]) -> str:
    return ";".join(sorted(f"{o['shape']},{o['color']},{o['size']},{o['row']},{o['col']}" for o in objects))


def _content_split(objects: Sequence[Mapping[str, Any]]) -> str:
    """The split a scene content belongs to (seed-independent hash bucket)."""
    digest = hashlib.blake2b(_content_key(objects).encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    for name, (lo, hi) in _SPLIT_BOUNDS.items():
        if lo <= u < hi:
            return name
    return "test"  # pragma: no cover  (u < 1 always)


def _make_scene(config: SceneQAConfig, split: str, index: int) -> dict[str, Any]:
    rng = np.random.default_rng([config.seed, _SPLIT_CODES[split], index, 0])
    cells = config.grid**2
    for _ in range(100_000):
        k = int(rng.integers(config.min_objects, config.max_objects + 1))
        chosen = rng.choice(cells, size=k, replace=False)
        shapes = rng.integers(0, len(config.shapes), size=k)
        colors = rng.integers(0, len(config.colors), size=k)
        sizes = rng.integers(0, len(SIZES), size=k)
        offsets = rng.uniform(-1.0, 1.0, size=(k, 2))
        objects = [
            {
                "shape": config.shapes[int(shapes[j])],
                "color": config.colors[int(colors[j])],
                "size": SIZES[int(sizes[j])],
                "row": int(chosen[j]) // config.grid,
                "col": int(chosen[j]) % config.grid,
            }
            for j in range(k)
        ]
        if _content_split(objects) == split:
            order = sorted(range(k), key=lambda j: (objects[j]["row"], objects[j]["col"]))
            return {
                "scene_id": f"{split}-s{config.seed}-{index:06d}",
                "split": split,
                "index": index,
                "objects": [objects[j] for j in order],
                "offsets": [(round(float(offsets[j, 0]), 6), round(float(offsets[j, 1]), 6)) for j in order],
            }
    raise RuntimeError(f"could not draw a scene for split {split!r}")  # pragma: no cover


def _star_points(cx: float, cy: float, r: float, inner: float = 0.48) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * inner
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def render_scene(scene: Mapping[str, Any], config: SceneQAConfig | None = None) -> Image.Image:
    """Draw a scene.

    Parameters
    ----------
    scene : mapping
        A scene as returned by :func:`generate_scenes` (``objects`` and, optionally,
        ``offsets``: per-object jitter in ``[-1, 1]^2``, a fraction of the free space in the cell).
    config : SceneQAConfig, optional
        Image size, grid, background and supersampling (default ``SceneQAConfig()``).

    Returns
    -------
    PIL.Image.Image
        An RGB image of side ``config.image_size``.
    """
    config = config or SceneQAConfig()
    ss = config.supersample
    size = config.image_size
    canvas = Image.new("RGB", (size * ss, size * ss), config.background)
    draw = ImageDraw.Draw(canvas)
    offsets = scene.get("offsets") or [(0.0, 0.0)] * len(scene["objects"])
    g = config.grid
    for obj, (ox, oy) in zip(scene["objects"], offsets, strict=True):
        r, c = int(obj["row"]), int(obj["col"])
        if not (0 <= r < g and 0 <= c < g):
            raise ValueError(f"object {obj} lies outside the {g}x{g} grid")
        x0, x1 = c * size * ss // g, (c + 1) * size * ss // g
        y0, y1 = r * size * ss // g, (r + 1) * size * ss // g
        cell = min(x1 - x0, y1 - y0)
        d = cell * (0.86 if obj["size"] == "large" else 0.5)
        slack = (cell - d) / 2 * 0.8
        cx = (x0 + x1) / 2 + float(ox) * slack
        cy = (y0 + y1) / 2 + float(oy) * slack
        h = d / 2
        rgb = COLOR_RGB[obj["color"]]
        shape = obj["shape"]
        if shape == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=rgb)
        elif shape == "square":
            s = h * 0.86
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=rgb)
        elif shape == "triangle":
            draw.polygon([(cx, cy - h), (cx + h, cy + h * 0.8), (cx - h, cy + h * 0.8)], fill=rgb)
        elif shape == "star":
            draw.polygon(_star_points(cx, cy + h * 0.08, h * 1.05), fill=rgb)
        elif shape == "cross":
            t = h * 0.36
            draw.rectangle([cx - t, cy - h, cx + t, cy + h], fill=rgb)
            draw.rectangle([cx - h, cy - t, cx + h, cy + t], fill=rgb)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    return canvas.reduce(ss) if ss > 1 else canvas


def generate_scenes(
    n: int, split: str = "train", config: SceneQAConfig | None = None
) -> list[dict[str, Any]]:
    """Generate the first ``n`` scenes of a split.

    Parameters
    ----------
    n : int
        Number of scenes (>= 0).
    split : {"train", "validation", "test"}
        Split; ``"val"`` is accepted for ``"validation"``.
    config : SceneQAConfig, optional
        Generation parameters (default ``SceneQAConfig()``).

    Returns
    -------
    list of dict
        Scenes ``{"scene_id", "split", "index", "objects", "offsets", "image"}``, where
        ``objects`` is a list of ``{"shape", "color", "size", "row", "col"}`` sorted by cell.
        Scene ``i`` depends only on ``(config.seed, split, i)`` and the scene parameters.
    """
    config = config or SceneQAConfig()
    split = _resolve_split(split)
    _check_int("n", n, 0)
    scenes = []
    for i in range(n):
        scene = _make_scene(config, split, i)
        scene["image"] = render_scene(scene, config)
        scenes.append(scene)
    return scenes
