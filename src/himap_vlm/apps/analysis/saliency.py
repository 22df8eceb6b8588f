"""Taylor-expansion saliency of the attention maps (HiMAP paper §2.2 eq. 1–4, §3.1 eq. 5–6).

For decoder layer ``l`` with post-softmax attention ``A_l[h, i, j]`` (query ``i``, key ``j``) and
``L`` the cross-entropy of the target token at the last input position::

    paper   (eq. 1):       I_l[i, j] = mean_h | A_l[h, i, j]   · ∂L/∂A_l[h, i, j] |
    authors (their code):  I_l[i, j] = mean_h | A_l[h, i, j]^2 · ∂L/∂A_l[h, i, j] |

(absolute value per head, then the mean over heads, in both). The authors' attention adapter
(``src/HiMAP/analysis/atten_adapter.py``) multiplies the post-softmax map by a ones tensor that
requires grad, whose gradient is ``A · ∂L/∂A``; ``saliency_scivqa.py`` then multiplies that
gradient by ``A`` once more. The target token differs too (``paper``: first id of the tokenized
answer; ``authors``: ``convert_tokens_to_ids(answer)``, see
:mod:`himap_vlm.apps.analysis.conventions`). ``I_l[i, j]`` is the importance of the flow from
token ``j`` to token ``i``. From it, per layer:

* group importance (Fig. 3), for ``X`` in ``sys``/``img``/``ins``:
  ``S_X = (1/|X|) Σ_{i∈X} Σ_j I_l[i, j]`` — the group's tokens as *queries* (receivers), their
  row sums averaged over the group, as the authors' code computes it. The paper's wording ("flow
  from X to other tokens") would be the *column* version ``(1/|X|) Σ_{j∈X} Σ_i I_l[i, j]``, also
  reported (``"<X>_from"``).
* ``S_vv = Σ_{i,j∈img} I_l[i, j]`` (intra-visual flow) and ``S_vt = Σ_{i∈ins, j∈img} I_l[i, j]``
  (visual → textual flow) (Fig. 4).
* the 3 × 3 block sums ``Σ_{i∈X, j∈Y} I_l[i, j]`` (rows: receiving group ``X``, columns: source
  group ``Y``) for the heat maps.

The attention maps come from an *eager* forward pass (switched on for this measurement only) whose
weights are captured by forward hooks on the attention modules; their gradients are reduced by
tensor hooks during the backward pass, one layer at a time, so no layer's full map is kept.
Samples are processed one at a time (no padding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from himap_vlm.apps.analysis._common import (
    AnalysisSession,
    Progress,
    as_list,
    jsonable,
    nanmean,
    nanstd,
    prepare_sample,
)
from himap_vlm.apps.analysis.conventions import DEFAULT_CONVENTION, check_targets, get_convention
from himap_vlm.apps.analysis.groups import GROUPS, TokenGroups, group_sums
from himap_vlm.core import contract

LayerCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
"""``on_layer(layer, A, dL_dA)`` with ``A`` and ``dL_dA`` of shape (H, S, S) (one sample)."""

_MAP_DEFINITIONS = {
    "authors": "mean over heads of |A_l[h,i,j]^2 * dL/dA_l[h,i,j]| (abs per head first; the authors' code: "
    "gradient of a ones tensor multiplying A, times A); L = cross-entropy at the last input position of "
    "tokenizer.convert_tokens_to_ids(answer); flow from token j (key) to token i (query)",
    "paper": "mean over heads of |A_l[h,i,j] * dL/dA_l[h,i,j]| (abs per head first; paper eq. 1); L = "
    "cross-entropy at the last input position of the first token of the tokenized answer; flow from token j "
    "(key) to token i (query)",
}

DEFINITIONS: dict[str, str] = {
    "I_l[i,j]": _MAP_DEFINITIONS["paper"],
    "sys/img/ins": "group importance: mean over the group's tokens (as queries) of their saliency row sums "
    "(authors' code; HiMAP Fig. 3)",
    "sys_from/img_from/ins_from": "mean over the group's tokens (as keys) of their saliency column sums "
    "(the paper's 'flow from the group' wording)",
    "s_vv": "sum of I_l[i,j] for i, j image tokens (intra-visual flow; HiMAP Fig. 4)",
    "s_vt": "sum of I_l[i,j] for i instruction token, j image token (visual-textual flow; HiMAP Fig. 4)",
    "blocks": "[X, Y] = sum of I_l[i,j] for i in X (receiver), j in Y (source), X, Y in (sys, img, ins)",
    "block_share": "blocks divided by the layer's total saliency sum_ij I_l[i,j], mean over samples",
    "groups": "sys = tokens before the first image token, img = image tokens, ins = tokens after the last "
    "image token (text between images is in none of them)",
    "std": "population standard deviation over samples",
}

PER_SAMPLE_KEYS: tuple[str, ...] = (
    "sys",
    "img",
    "ins",
    "sys_from",
    "img_from",
    "ins_from",
    "s_vv",
    "s_vt",
    "total",
)


def _taylor_pass(session: AnalysisSession, inputs: Any, target_id: int, on_layer: LayerCallback) -> float:
    """One forward + backward under an open eager, frozen session; returns the loss."""
    handles = []

    def leaf_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, kwargs

    def capture(layer_idx: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            weights = contract.attention_weights(output)
            if weights is None:
                raise RuntimeError(
                    f"layer {layer_idx}: the attention module returned no weights; the saliency needs the "
                    "eager attention implementation"
                )
            if not weights.requires_grad:
                raise RuntimeError(f"layer {layer_idx}: attention weights are not part of the autograd graph")
            a = weights.detach()

            def grad_hook(grad: torch.Tensor) -> None:
                on_layer(layer_idx, a[0], grad[0])

            weights.register_hook(grad_hook)

        return hook

    try:
        handles.append(session.layers[0].register_forward_pre_hook(leaf_pre_hook, with_kwargs=True))
        for idx, attn in enumerate(session.attn_modules):
            handles.append(attn.register_forward_hook(capture(idx)))
        with torch.enable_grad():
            out = session.model(**inputs, use_cache=False, logits_to_keep=1)
            logits = out.logits[0, -1].float()
            target = torch.tensor([target_id], device=logits.device)
            loss = F.cross_entropy(logits[None], target)
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    return float(loss.detach())


def taylor_terms(model: torch.nn.Module, inputs: Any, target_id: int, on_layer: LayerCallback) -> float:
    """Attention maps and their gradients, layer by layer, for one sample (low-level).

    Runs one eager forward pass of ``model(**inputs)`` (batch of one, no padding), the loss
    ``L = CE(logits[0, -1], target_id)`` and its backward pass. During the backward pass
    ``on_layer(l, A_l, dL/dA_l)`` is called for every decoder layer (in reverse order) with
    tensors of shape (H, S, S); they are freed after the call. The model is restored afterwards
    (attention implementation, ``requires_grad`` flags, no hooks, no parameter gradients).

    Parameters
    ----------
    model : nn.Module
        A supported model.
    inputs : Mapping
        Processor output of one sample on the model's device.
    target_id : int
        The token whose cross-entropy is differentiated (first answer token).
    on_layer : callable
        See above.

    Returns
    -------
    float
        The loss ``L``.
    """
    with AnalysisSession(model, attn_implementation="eager", freeze=True) as session:
        return _taylor_pass(session, inputs, target_id, on_layer)


def saliency_map(a: torch.Tensor, grad: torch.Tensor, convention: str = DEFAULT_CONVENTION) -> torch.Tensor:
    """One layer's saliency map from its attention and gradient.

    ``authors``: ``I = mean_h |A ⊙ A ⊙ ∂L/∂A|`` (``src/HiMAP/analysis/atten_adapter.py`` +
    ``saliency_scivqa.py``); ``paper``: ``I = mean_h |A ⊙ ∂L/∂A|`` (HiMAP eq. 1). Computed in
    float32, or in float64 when either input is float64.

    Parameters
    ----------
    a, grad : Tensor, shape (H, S, S)
        Post-softmax attention of one sample and ``∂L/∂A``.
    convention : {"authors", "paper"}

    Returns
    -------
    Tensor, shape (S, S)
    """
    power = get_convention(convention).saliency_power
    dtype = torch.float64 if torch.float64 in (a.dtype, grad.dtype) else torch.float32
    a, grad = a.to(dtype), grad.to(dtype)
    weight = a * a if power == 2 else a
    return (weight * grad).abs().mean(0)


@dataclass
class SaliencyResult:
    """Per-layer saliency measurements over a set of samples.

    Attributes
    ----------
    num_layers : int
        Decoder layers ``L``.
    per_sample : dict of str -> ndarray, shape (N, L)
        Keys :data:`PER_SAMPLE_KEYS`: ``sys``/``img``/``ins`` (group importance, queries),
        ``sys_from``/``img_from``/``ins_from`` (keys), ``s_vv``, ``s_vt`` and ``total``
        (``Σ_ij I_l[i, j]``). NaN where a group is empty in a sample.
    blocks : ndarray, shape (N, L, 3, 3)
        ``blocks[n, l, X, Y] = Σ_{i∈X, j∈Y} I_l[i, j]``, groups in :data:`GROUPS` order.
    loss : ndarray, shape (N,)
        Cross-entropy of the target token per sample.
    target_ids : list of int
        Target token per sample (rule of the convention).
    group_sizes : dict of str -> ndarray, shape (N,)
        Tokens per group (``sys``, ``img``, ``ins``, ``other``) per sample.
    convention : {"authors", "paper"}
        Which convention produced the numbers (:mod:`himap_vlm.apps.analysis.conventions`).
    target_tokens : list of str
        The vocabulary piece of every target id (e.g. ``"A"`` vs ``"▁A"``).
    groups : tuple of str
        :data:`GROUPS`.
    definitions : dict
        :data:`DEFINITIONS`.
    """

    num_layers: int
    per_sample: dict[str, np.ndarray]
    blocks: np.ndarray
    loss: np.ndarray
    target_ids: list[int]
    group_sizes: dict[str, np.ndarray]
    convention: str = DEFAULT_CONVENTION
    target_tokens: list[str] = field(default_factory=list)
    groups: tuple[str, ...] = GROUPS
    definitions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_convention(self.convention)
        if not self.definitions:
            self.definitions = {**DEFINITIONS, "I_l[i,j]": _MAP_DEFINITIONS[self.convention]}

    @property
    def n_samples(self) -> int:
        return int(self.loss.shape[0])

    @property
    def per_layer(self) -> dict[str, np.ndarray]:
        """Mean over samples of every :attr:`per_sample` entry, shape (L,)."""
        return {k: nanmean(v) for k, v in self.per_sample.items()}

    @property
    def per_layer_std(self) -> dict[str, np.ndarray]:
        """Standard deviation over samples of every :attr:`per_sample` entry, shape (L,)."""
        return {k: nanstd(v) for k, v in self.per_sample.items()}

    @property
    def block_share(self) -> np.ndarray:
        """Mean over samples of ``blocks / total``, shape (L, 3, 3)."""
        total = self.per_sample["total"][:, :, None, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            return nanmean(self.blocks / total)

    @property
    def block_mean(self) -> np.ndarray:
        """Mean over samples of the block sums, shape (L, 3, 3)."""
        return nanmean(self.blocks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (NaN -> ``None``)."""
        return jsonable(
            {
                "measurement": "saliency",
                "convention": self.convention,
                "convention_settings": get_convention(self.convention).to_dict(),
                "reference": "HiMAP paper §2.2 eq. 1-4 (Fig. 3), §3.1 eq. 5-6 (Fig. 4)",
                "definitions": self.definitions,
                "num_layers": self.num_layers,
                "n_samples": self.n_samples,
                "groups": list(self.groups),
                "per_layer": self.per_layer,
                "per_layer_std": self.per_layer_std,
                "block_share": self.block_share,
                "block_sum": self.block_mean,
                "loss": self.loss,
                "target_ids": self.target_ids,
                "target_tokens": self.target_tokens,
                "group_sizes": self.group_sizes,
                "per_sample": self.per_sample,
            }
        )


class _SaliencyReducer:
    """Turns one sample's per-layer (A, dL/dA) into the per-layer numbers of :class:`SaliencyResult`."""

    def __init__(self, groups: TokenGroups, num_layers: int, device: torch.device, convention: str):
        self.groups = groups
        self.convention = convention
        self.values = {k: np.full(num_layers, np.nan) for k in PER_SAMPLE_KEYS}
        self.blocks = np.full((num_layers, 3, 3), np.nan)
        self.idx = {g: torch.as_tensor(groups[g], dtype=torch.long, device=device) for g in GROUPS}

    def __call__(self, layer: int, a: torch.Tensor, grad: torch.Tensor) -> None:
        sal = saliency_map(a, grad, self.convention)
        rows, cols = sal.sum(1), sal.sum(0)
        for g in GROUPS:
            idx = self.idx[g]
            if idx.numel():
                self.values[g][layer] = float(rows.index_select(0, idx).sum()) / idx.numel()
                self.values[f"{g}_from"][layer] = float(cols.index_select(0, idx).sum()) / idx.numel()
        blocks = group_sums(sal, self.groups, GROUPS).double().cpu().numpy()
        self.blocks[layer] = blocks
        self.values["s_vv"][layer] = blocks[1, 1]
        self.values["s_vt"][layer] = blocks[2, 1]
        self.values["total"][layer] = float(sal.sum())


def saliency(
    model: torch.nn.Module,
    processor: Any,
    samples: Iterable[Mapping[str, Any]],
    *,
    convention: str = DEFAULT_CONVENTION,
    progress: Progress | None = None,
) -> SaliencyResult:
    """Taylor saliency of every layer's attention, reduced to the paper's group metrics.

    Parameters
    ----------
    model : nn.Module
        A supported model (any attention implementation; eager is used for this run only).
    processor
        Its processor.
    samples : iterable of mapping
        ``{image, question, answer}`` records (``image``: PIL image, path, or a list of them). The
        records of :func:`himap_vlm.apps.data.synthetic.load_synthetic` / ``read_jsonl`` work directly.
    convention : {"authors", "paper"}
        ``"authors"`` (default; the code behind the published figures): ``mean_h |A²·∂L/∂A|`` with
        target ``tokenizer.convert_tokens_to_ids(answer)``. ``"paper"``: eq. 1,
        ``mean_h |A·∂L/∂A|``, target the first id of the tokenized answer.
    progress : callable, optional
        Called with ``1`` after every sample.

    Returns
    -------
    SaliencyResult
        Per-sample and per-layer (mean, std) values; see :data:`DEFINITIONS`.

    Raises
    ------
    ValueError
        Before any model run, when a sample has no target token under the convention (``authors``:
        an answer that is not one vocabulary piece), naming every such sample.

    Notes
    -----
    Memory: one sample at a time; during the backward pass only the current layer's map and
    gradient are reduced (the forward pass keeps what autograd keeps anyway).
    """
    records = as_list(samples)
    conv = get_convention(convention).name
    for n, record in enumerate(records):
        if "answer" not in record:
            raise ValueError(f"sample {n} has no 'answer' field (samples are {{image, question, answer}} records)")
    target_ids = check_targets(processor, [str(r["answer"]) for r in records], conv)
    tokenizer = getattr(processor, "tokenizer", processor)
    with AnalysisSession(model, attn_implementation="eager", freeze=True) as session:
        n_layers = session.num_layers
        per_sample = {k: np.full((len(records), n_layers), np.nan) for k in PER_SAMPLE_KEYS}
        blocks = np.full((len(records), n_layers, 3, 3), np.nan)
        losses = np.zeros(len(records))
        targets: list[int] = []
        sizes: dict[str, list[int]] = {g: [] for g in ("sys", "img", "ins", "other")}
        for n, record in enumerate(records):
            prep = prepare_sample(session, processor, record)
            reducer = _SaliencyReducer(prep.groups, n_layers, prep.inputs["input_ids"].device, conv)
            losses[n] = _taylor_pass(session, prep.inputs, target_ids[n], reducer)
            for k in PER_SAMPLE_KEYS:
                per_sample[k][n] = reducer.values[k]
            blocks[n] = reducer.blocks
            targets.append(target_ids[n])
            for g, size in prep.groups.sizes.items():
                sizes[g].append(size)
            if progress is not None:
                progress(1)
    return SaliencyResult(
        num_layers=n_layers,
        per_sample=per_sample,
        blocks=blocks,
        loss=losses,
        target_ids=targets,
        group_sizes={g: np.asarray(v) for g, v in sizes.items()},
        convention=conv,
        target_tokens=[str(t) for t in tokenizer.convert_ids_to_tokens(targets)],
    )
