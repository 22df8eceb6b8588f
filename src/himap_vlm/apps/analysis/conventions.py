"""The two conventions of the information-flow analysis: the HiMAP authors' code and the paper's text.

The HiMAP paper (§2–3, supplement §10–11) describes its analysis in words and equations; the
figures were produced by the authors' code (repository ``ustc-hyin/HiMAP``), which differs from
the text in ways that change the numbers. Every measurement that depends on it takes
``convention="authors"`` (default: reproduces the published figures) or ``convention="paper"``.

=====================  ==========================================  ==========================================
item                   ``authors`` (code that made the figures)    ``paper`` (the text)
=====================  ==========================================  ==========================================
saliency map           ``mean_h |A² · ∂L/∂A|``                     ``mean_h |A · ∂L/∂A|`` (eq. 1)
                       (``analysis/atten_adapter.py``,
                       ``analysis/saliency_scivqa.py``)
saliency target        ``tokenizer.convert_tokens_to_ids(answer)``  first id of ``tokenizer(answer)``
                       — the bare piece, e.g. ``A`` not ``▁A``      (no special tokens)
                       (``analysis/saliency_scivqa.py``)
blocked layers         ``l … L−1`` (mask edited in place, reused    ``l`` only (``span`` layers)
                       by every later layer;
                       ``validate/disruption_forward.py``)
``img2rnd`` rows       redrawn at every forward pass (every         drawn once per sample and layer
                       generated token, full recompute); count =
                       tokens after the image incl. generated
                       (``validate/disruption_forward.py``)
generated tokens       8 (``validate/attn_disruption.py``)          5
answer judged present  raw substring ``answer in output.strip()``   normalised whole-word containment
                       (``validate/attn_disruption.py``)            (synthetic records: their scorer)
label consistency      ``answer_retained``: the blocked output      ``output_unchanged``: the blocked text
                       still contains the answer                    equals the undisturbed text
samples averaged       those the undisturbed model answers          all
                       correctly (the authors ran on a pre-
                       filtered question file, ``data/scienceqa/
                       himap-inference-MCQ-VC-*.json``)
saliency figures       mean over samples, the curves of a figure    mean ± std over samples, raw values
                       min-max scaled jointly, bars                 (log scale)
                       (``output_example/plot_props.py``)
=====================  ==========================================  ==========================================

Paths are relative to ``src/HiMAP/`` of the authors' repository except ``data/`` and
``output_example/``. ``docs/analysis.md`` gives the details and what could not be reproduced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

CONVENTIONS: tuple[str, str] = ("authors", "paper")
"""Valid ``convention`` values, the default first."""

DEFAULT_CONVENTION = "authors"

AUTHORS_REPO = "https://github.com/ustc-hyin/HiMAP"


@dataclass(frozen=True)
class Convention:
    """Every setting that differs between the two conventions.

    Attributes
    ----------
    name : {"authors", "paper"}
    saliency_power : int
        Power of ``A`` in ``mean_h |A^p · ∂L/∂A|``: 2 (authors) or 1 (paper eq. 1).
    target_rule : {"bare_piece", "first_id"}
        How the saliency loss picks its target token from the reference answer.
    window : {"to_last_layer", "span"}
        Layers blocked by a run that starts at layer ``l``: ``l … L−1`` or ``l … l+span−1``.
    default_span : int or None
        ``span`` when none is given (``None``: to the last layer).
    random_rows : {"per_forward_pass", "per_sample_layer"}
        When the ``img2rnd`` control draws its query rows.
    max_new_tokens : int
        Greedy tokens generated per blocking run.
    answer_rule : {"substring", "whole_word"}
        How a prediction is judged to contain the reference answer.
    label_metric : {"answer_retained", "output_unchanged"}
        Which metric plays the paper's "label consistency".
    samples : {"dense_correct", "all"}
        Which samples the blocking means are taken over.
    figure_scale : {"joint_minmax", "raw"}
        How the saliency figures scale their curves.
    sources : dict
        Item -> the authors' file it comes from (paths in ``ustc-hyin/HiMAP``).
    """

    name: str
    saliency_power: int
    target_rule: str
    window: str
    default_span: int | None
    random_rows: str
    max_new_tokens: int
    answer_rule: str
    label_metric: str
    samples: str
    figure_scale: str
    sources: Mapping[str, str]

    @property
    def title(self) -> str:
        """Short label for figures and tables."""
        return "authors' code" if self.name == "authors" else "paper text"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sources"] = dict(self.sources)
        out["reference"] = AUTHORS_REPO if self.name == "authors" else "HiMAP paper §2-3, supplement §10-11"
        return out


_AUTHOR_SOURCES = {
    "saliency_power": "src/HiMAP/analysis/atten_adapter.py (A * ones[requires_grad]: grad = A*dL/dA) and "
    "src/HiMAP/analysis/saliency_scivqa.py (abs(grad * A), mean over heads in get_props)",
    "target_rule": "src/HiMAP/analysis/saliency_scivqa.py (label = tokenizer.convert_tokens_to_ids(answer))",
    "window": "src/HiMAP/validate/disruption_forward.py (isolate_attention_mask = attention_mask, edited in "
    "place at idx == isolate_layer, the same tensor reaches every later layer)",
    "random_rows": "src/HiMAP/validate/disruption_forward.py (torch.randperm(seq_length - SYS_LEN)[:TXT_LEN] in "
    "every forward call; generation with use_cache=False)",
    "max_new_tokens": "src/HiMAP/validate/attn_disruption.py (max_new_tokens=8)",
    "answer_rule": "src/HiMAP/validate/attn_disruption.py (if label in outputs)",
    "label_metric": "src/HiMAP/validate/attn_disruption.py (label_consistency counts outputs containing the label)",
    "samples": "data/scienceqa/himap-inference-MCQ-VC-13B.json / -7B.json (question files whose stored "
    "undisturbed top-1 token is the answer letter)",
    "figure_scale": "output_example/plot_props.py (mean over samples, (data - min) / (max - min) over all curves)",
}

AUTHORS = Convention(
    name="authors",
    saliency_power=2,
    target_rule="bare_piece",
    window="to_last_layer",
    default_span=None,
    random_rows="per_forward_pass",
    max_new_tokens=8,
    answer_rule="substring",
    label_metric="answer_retained",
    samples="dense_correct",
    figure_scale="joint_minmax",
    sources=_AUTHOR_SOURCES,
)

PAPER = Convention(
    name="paper",
    saliency_power=1,
    target_rule="first_id",
    window="span",
    default_span=1,
    random_rows="per_sample_layer",
    max_new_tokens=5,
    answer_rule="whole_word",
    label_metric="output_unchanged",
    samples="all",
    figure_scale="raw",
    sources={
        "saliency_power": "HiMAP paper eq. 1",
        "target_rule": "HiMAP paper §2.2 ('cross-entropy objective'); first token of the tokenized answer",
        "window": "HiMAP paper §3.2-3.3 ('in the attention matrix of the l-th layer')",
        "label_metric": "HiMAP paper §3.2 ('how consistent the prediction outcomes are before and after')",
    },
)

_BY_NAME = {"authors": AUTHORS, "paper": PAPER}


def get_convention(convention: str | Convention) -> Convention:
    """The :class:`Convention` named ``convention`` (``"authors"`` or ``"paper"``).

    Raises
    ------
    ValueError
        For any other name (the message lists the valid ones).
    """
    if isinstance(convention, Convention):
        return convention
    if convention not in _BY_NAME:
        raise ValueError(
            f"unknown convention {convention!r}; use 'authors' (the HiMAP authors' code, which made the "
            "published figures) or 'paper' (the paper's text)"
        )
    return _BY_NAME[convention]


# ---------------------------------------------------------------------- target token (item 3)


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def first_answer_token(processor: Any, answer: str) -> int:
    """First id of ``answer`` tokenized without special tokens (the ``paper`` target rule).

    Raises
    ------
    ValueError
        If the answer tokenizes to nothing.
    """
    ids = _tokenizer(processor)(answer, add_special_tokens=False)["input_ids"]
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    if not ids:
        raise ValueError(f"the answer {answer!r} tokenizes to nothing; cannot pick a target token")
    return int(ids[0])


def bare_piece_token(processor: Any, answer: str) -> int:
    """``tokenizer.convert_tokens_to_ids(answer)`` — the ``authors`` target rule, made strict.

    The authors' ``saliency_scivqa.py`` looks the whole answer string up as *one vocabulary piece*.
    For LLaVA-1.5's SentencePiece tokenizer the answer ``"A"`` gives the bare piece ``A`` (id 29909),
    while the model writes ``▁A`` (id 319) after ``ASSISTANT:``. An answer that is no piece of the
    vocabulary would silently become ``<unk>`` there; here it is an error.

    Raises
    ------
    ValueError
        If ``answer`` is not exactly one piece of the tokenizer's vocabulary.
    """
    tok = _tokenizer(processor)
    if not hasattr(tok, "convert_tokens_to_ids"):
        raise ValueError(f"{type(tok).__name__} has no convert_tokens_to_ids; the authors' target rule needs it")
    tid = tok.convert_tokens_to_ids(answer)
    unk = getattr(tok, "unk_token_id", None)
    if tid is None or isinstance(tid, list) or (unk is not None and tid == unk and answer != tok.unk_token):
        raise ValueError(
            f"the answer {answer!r} is not a single piece of the tokenizer's vocabulary, so the authors' target "
            f"rule (tokenizer.convert_tokens_to_ids(answer)) has no token for it (their code would silently use "
            f"{'<unk>' if unk is not None else 'None'}); use convention='paper' (first id of the tokenized "
            "answer) or answers that are single vocabulary pieces (e.g. option letters)"
        )
    return int(tid)


def target_token(processor: Any, answer: str, convention: str | Convention) -> int:
    """The saliency target of ``answer`` under ``convention`` (see :func:`bare_piece_token`)."""
    conv = get_convention(convention)
    if conv.target_rule == "bare_piece":
        return bare_piece_token(processor, answer)
    return first_answer_token(processor, answer)


def check_targets(processor: Any, answers: Sequence[str], convention: str | Convention) -> list[int]:
    """Target ids of every answer, or one ``ValueError`` naming every sample that has none.

    Called before any model run so that a bad record fails fast, not after an hour of work.
    """
    ids, bad = [], []
    for n, answer in enumerate(answers):
        try:
            ids.append(target_token(processor, answer, convention))
        except ValueError as exc:
            bad.append((n, answer, str(exc)))
    if bad:
        listed = ", ".join(f"sample {n} ({a!r})" for n, a, _ in bad[:8])
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        raise ValueError(f"{len(bad)} sample(s) have no target token: {listed}{more}. {bad[0][2]}")
    return ids
