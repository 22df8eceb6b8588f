"""Accuracy and yes/no detection statistics (POPE)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BinaryStats", "binary_stats", "mean"]


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; ``nan`` for an empty sequence."""
    return sum(values) / len(values) if values else float("nan")


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


@dataclass(frozen=True)
class BinaryStats:
    """Confusion counts of yes/no predictions, "yes" being the positive class.

    Attributes
    ----------
    tp, fp, tn, fn
        True/false positives/negatives.
    """

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def total(self) -> int:
        """Number of predictions."""
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        """``(TP + TN) / total``."""
        return _ratio(self.tp + self.tn, self.total)

    @property
    def precision(self) -> float:
        """``TP / (TP + FP)`` (0 when nothing was predicted positive)."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        """``TP / (TP + FN)`` (0 when there are no positives)."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall (0 when both are 0)."""
        p, r = self.precision, self.recall
        return _ratio(2 * p * r, p + r)

    @property
    def yes_ratio(self) -> float:
        """Fraction of predictions that are "yes"."""
        return _ratio(self.tp + self.fp, self.total)


def binary_stats(predictions: Sequence[str], labels: Sequence[str], positive: str = "yes") -> BinaryStats:
    """Count TP/FP/TN/FN; anything other than ``positive`` counts as negative (as in LLaVA's eval_pope).

    Parameters
    ----------
    predictions, labels
        Parsed predictions and gold labels (e.g. ``"yes"``/``"no"``).
    positive
        The positive class.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    tp = fp = tn = fn = 0
    for p, y in zip(predictions, labels, strict=False):
        pp, yy = p == positive, y == positive
        if pp and yy:
            tp += 1
        elif pp:
            fp += 1
        elif yy:
            fn += 1
        else:
            tn += 1
    return BinaryStats(tp=tp, fp=fp, tn=tn, fn=fn)
