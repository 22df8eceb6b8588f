"""CIDEr-D, as computed by ``pycocoevalcap`` (the "CIDEr" of the COCO, NoCaps and Flickr30k tables).

This is a pure-Python/NumPy port of ``pycocoevalcap/cider/cider_scorer.py``:

* n-grams of order 1..4 (``n=4``), term frequencies per sentence;
* document frequency of an n-gram = number of *images* whose reference set contains it,
  computed over the references of the evaluated corpus; ``idf = log(#images) - log(max(1, df))``;
* each sentence becomes 4 tf-idf vectors; the similarity of candidate and reference at order n
  is ``sum_g min(c_g, r_g) * r_g / (|c| |r|)`` (CIDEr-D's clipping), times the Gaussian length
  penalty ``exp(-(l_c - l_r)^2 / (2 sigma^2))`` with ``sigma = 6``;
* the image score is the mean over n, averaged over the references, times 10; the corpus score
  is the mean image score.

One quirk of the reference implementation is kept: the "length" used in the penalty is the
number of *bigrams* of the sentence (``if n == 1: length += term_freq`` with 0-based n), i.e.
the word count minus one. Papers report the corpus score times 100 (e.g. 105.5).

Tokenisation (:func:`tokenize_caption`) approximates the Stanford PTB tokenizer that
``pycocoevalcap`` runs before scoring: lowercase, clitics split off ("dog's" -> "dog 's",
"don't" -> "do n't"), punctuation removed, whitespace split.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

__all__ = ["tokenize_caption", "cider_d", "CiderD"]

_CLITIC_NT = re.compile(r"(\w)n't\b")
_CLITIC = re.compile(r"(\w)'(s|re|ve|ll|m|d)\b")
# A token: alphanumerics possibly joined by inner hyphens, periods (3.5, e.g) or apostrophes,
# or a clitic ('s, n't). Everything else is punctuation and dropped.
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|m|d)\b|[^\W_]+(?:[-.'][^\W_]+)*")


def tokenize_caption(text: str) -> str:
    """Tokenise a caption the way ``pycocoevalcap``'s PTB tokenizer does (approximately).

    Parameters
    ----------
    text
        A raw caption.

    Returns
    -------
    str
        Lowercased tokens joined by single spaces, punctuation removed.

    Examples
    --------
    >>> tokenize_caption("A dog's ball, on the T-shirt!")
    "a dog 's ball on the t-shirt"
    """
    text = text.lower().replace("\n", " ").replace("\t", " ")
    text = _CLITIC_NT.sub(r"\1 n't", text)
    text = _CLITIC.sub(r"\1 '\2", text)
    return " ".join(_TOKEN.findall(text))


def _ngrams(sentence: str, n: int) -> Counter[tuple[str, ...]]:
    words = sentence.split()
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


class CiderD:
    """CIDEr-D scorer over a corpus of (candidate, references) pairs.

    Parameters
    ----------
    n
        Largest n-gram order (4).
    sigma
        Standard deviation of the Gaussian length penalty (6.0).
    """

    def __init__(self, n: int = 4, sigma: float = 6.0) -> None:
        self.n = n
        self.sigma = sigma

    def _vec(
        self, counts: Counter[tuple[str, ...]], df: dict[tuple[str, ...], float], ref_len: float
    ) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [defaultdict(float) for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, tf in counts.items():
            order = len(ngram) - 1
            w = float(tf) * (ref_len - math.log(max(1.0, df.get(ngram, 0.0))))
            vec[order][ngram] = w
            norm[order] += w * w
            if order == 1:  # pycocoevalcap's quirk: the length is the bigram count
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _sim(
        self,
        vh: list[dict[tuple[str, ...], float]],
        vr: list[dict[tuple[str, ...], float]],
        nh: list[float],
        nr: list[float],
        lh: int,
        lr: int,
    ) -> np.ndarray:
        delta = float(lh - lr)
        val = np.zeros(self.n)
        for k in range(self.n):
            ref_k = vr[k]
            for ngram, w in vh[k].items():
                r = ref_k.get(ngram, 0.0)
                val[k] += min(w, r) * r
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= math.exp(-(delta**2) / (2 * self.sigma**2))
        return val

    def compute(
        self, candidates: Sequence[str], references: Sequence[Sequence[str]]
    ) -> tuple[float, list[float]]:
        """Score tokenised candidates against tokenised references.

        Parameters
        ----------
        candidates
            One tokenised caption per image (tokens separated by spaces).
        references
            For each image, its tokenised reference captions (at least one).

        Returns
        -------
        corpus_score : float
            Mean of the image scores (pycocoevalcap's value, e.g. ~1.0 for a good model).
        image_scores : list of float
            One score per image.
        """
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
        if not candidates:
            raise ValueError("CIDEr needs at least one image")
        crefs = []
        for i, refs in enumerate(references):
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"image {i}: references must be a non-empty list of captions")
            crefs.append([_ngrams(r, self.n) for r in refs])
        ctest = [_ngrams(c, self.n) for c in candidates]
        df: dict[tuple[str, ...], float] = defaultdict(float)
        for refs_counts in crefs:
            for ngram in {g for rc in refs_counts for g in rc}:
                df[ngram] += 1
        ref_len = math.log(float(len(crefs)))
        scores: list[float] = []
        for test, refs_counts in zip(ctest, crefs, strict=False):
            vh, nh, lh = self._vec(test, df, ref_len)
            acc = np.zeros(self.n)
            for rc in refs_counts:
                vr, nr, lr = self._vec(rc, df, ref_len)
                acc += self._sim(vh, vr, nh, nr, lh, lr)
            score = float(np.mean(acc)) / len(refs_counts) * 10.0
            scores.append(score)
        return float(np.mean(scores)), scores


def cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    tokenize: bool = True,
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, list[float]]:
    """CIDEr-D of captions against references (pycocoevalcap's "CIDEr").

    Parameters
    ----------
    candidates
        One generated caption per image.
    references
        The human captions of each image.
    tokenize
        Apply :func:`tokenize_caption` to candidates and references first.
    n, sigma
        n-gram order and length-penalty width (4 and 6, as in pycocoevalcap).

    Returns
    -------
    corpus_score : float
        Mean image score on pycocoevalcap's scale (multiply by 100 for the papers' tables).
    image_scores : list of float
        One score per image.
    """
    if tokenize:
        candidates = [tokenize_caption(c) for c in candidates]
        references = [[tokenize_caption(r) for r in refs] for refs in references]
    return CiderD(n=n, sigma=sigma).compute(candidates, references)
