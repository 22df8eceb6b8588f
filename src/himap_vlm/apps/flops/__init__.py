"""FLOPs and KV-cache calculator for image-token pruning.

Everything here is a pure function of a model's dimensions (:class:`TextDims`, optionally
:class:`VisionDims`), a token layout (:class:`Layout`: tokens before the image, image tokens,
tokens after) and the number of image tokens present in each decoder layer. A pruning method is
described to the calculator *only* by that per-layer count (``image_tokens_per_layer``): dense is
``[n] * L``, FastV ``K=2, R=50 %`` on 576 tokens is ``[576, 576, 288, ..., 288]``, and so on
(a static method gives its own with
:meth:`~himap_vlm.core.methods.base.PruningMethod.image_tokens_schedule`; measured counts, e.g.
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

Modules
-------
:mod:`~himap_vlm.apps.flops.configs` (model dimensions from presets and configs),
:mod:`~himap_vlm.apps.flops.layout` (token layouts, per-layer counts),
:mod:`~himap_vlm.apps.flops.formulas` (per-layer formulas, KV-cache bytes),
:mod:`~himap_vlm.apps.flops.report` (prefill / decode reports). Every public name is importable
from :mod:`himap_vlm.apps.flops`.

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
>>> from himap_vlm.apps.flops import Layout, TextDims, prefill_flops
>>> from himap_vlm.core.methods import MethodSpec
>>> dims = TextDims.from_config("llava-1.5-7b")
>>> himap = MethodSpec.parse("himap(k1=2,r1=0.5,k2=8,r2=0.75)", num_layers=dims.num_layers).build()
>>> counts = himap.image_tokens_schedule(576, dims.num_layers)
>>> report = prefill_flops(dims, Layout(35, 576, 60), counts, convention="paper")
>>> round(report.tflops_dense, 3), round(report.tflops, 3), round(report.ratio, 3)
(2.986, 0.735, 0.246)
"""

from __future__ import annotations

from himap_vlm.apps.flops.configs import TextDims, VisionDims, list_presets, load_config
from himap_vlm.apps.flops.formulas import bytes_per_element, kv_cache_bytes, paper_layer_flops
from himap_vlm.apps.flops.layout import (
    LLAVA_15_LAYOUT,
    Counts,
    Layout,
    default_layout,
    keep_count,
    layout_from_inputs,
)
from himap_vlm.apps.flops.report import (
    CONVENTIONS,
    FlopsReport,
    decode_step_flops,
    flops_ratio_for_run,
    prefill_flops,
)

__all__ = [
    "CONVENTIONS",
    "LLAVA_15_LAYOUT",
    "Counts",
    "FlopsReport",
    "Layout",
    "TextDims",
    "VisionDims",
    "bytes_per_element",
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
]
