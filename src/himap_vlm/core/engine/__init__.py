"""The pruning engine: the one place that drops image tokens inside a language model.

A :class:`PruningRun` (what ``method(model)`` returns) installs forward hooks — never patched
forward methods — on a stock transformers model:

* a pre-hook on the top-level model remembers ``input_ids`` (image tokens are found where
  ``input_ids == config.image_token_id``; no hard-coded offsets, any number of images);
* a pre-hook on the language model decides whether this forward is a *prefill* (no cached
  tokens: pruning happens here), a *continuation* (decode steps on the shortened per-layer
  caches), or a pass-through (no ``input_ids`` to locate images);
* a pre-hook on every decoder layer swaps in the gathered hidden states, rotary tables,
  ``position_ids`` and a rebuilt attention mask once tokens have been dropped;
* a pre-hook on the attention module of each scoring layer recomputes *only the attention rows
  (or per-token features) a method asked for* from that layer's own queries and keys (so SDPA /
  flash stay in use), and hands dynamic methods a :class:`~himap_vlm.core.interface.LayerView`;
* hooks on the attention modules of layers with attention edits apply post-softmax edits between
  text queries and image keys while the module keeps its own kernel;
* a hook on the language model's output scatters what it returns back to the input's positions.

Batches: every sample keeps its own index set; rows are left-filled with masked filler slots
when samples keep different numbers of tokens. Several images in one sample: the image tokens are
*all* placeholder positions of the sample; the instruction tokens are those after its last image
placeholder; a method's budget applies to all image tokens of the sample together. Masks and
positions of pruned layers follow the family record (:mod:`himap_vlm.core.families`).

Parts: :mod:`~himap_vlm.core.engine.run` (hook lifetime and modes), :mod:`~.layout` (pure
gather/scatter of slots), :mod:`~.scoring` (the attention-row kernel), :mod:`~.edits` (attention
edits), :mod:`~.state` (per-forward state). Everything read from transformers internals goes
through :mod:`himap_vlm.core.contract`.
"""

from __future__ import annotations

from himap_vlm.core.engine.layout import Layout
from himap_vlm.core.engine.run import SELECTIONS, PruningRun
from himap_vlm.core.interface import LastTokenContributions, LayerView

__all__ = ["SELECTIONS", "LastTokenContributions", "LayerView", "Layout", "PruningRun"]
