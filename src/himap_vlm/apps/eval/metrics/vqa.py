"""The official VQA accuracy with the EvalAI answer normalisation (VQAv2, TextVQA).

The normalisation is the ``EvalAIAnswerProcessor`` that LLaVA ships in
``llava/eval/m4c_evaluator.py`` (copied from MMF/Pythia, itself a port of the VQA challenge's
``vqaEval.py``): lowercase, commas/question marks dropped, ``'s`` split off, punctuation
removed or turned into spaces, periods not followed by a digit stripped, number words up to
ten turned into digits, articles removed, missing apostrophes in contractions restored. The
quirks of the original are kept on purpose (the period regex ``(?!<=\\d)`` that is a
look-ahead, not a look-behind; ``'s`` split before punctuation), so that scores match the
evaluation server and LLaVA's scripts.

The accuracy of a prediction against the (usually 10) human answers is
``min(#humans among the other 9 who gave that answer / 3, 1)`` averaged over the 10 ways of
leaving one human out, which is what ``vqaEval.py`` and the TextVQA evaluator compute. As in
LLaVA's TextVQA evaluator, both the prediction and the human answers are normalised.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["normalize_vqa_answer", "vqa_accuracy", "CONTRACTIONS", "NUMBER_MAP", "ARTICLES"]

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip

NUMBER_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES: tuple[str, ...] = ("a", "an", "the")

# Kept verbatim from the official script: "(?!<=\d)" is a (always true) look-ahead, so every
# period not followed by a digit is stripped ("dog." -> "dog", "3.5" stays).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCTUATIONS: tuple[str, ...] = (
    ";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip


def _word_tokenize(text: str) -> str:
    text = text.lower()
    text = text.replace(",", "").replace("?", "").replace("'s", " 's")
    return text.strip()


def _process_punctuation(text: str) -> str:
    out = text
    strip_all = _COMMA_STRIP.search(text) is not None
    for p in _PUNCTUATIONS:
        if (p + " " in text or " " + p in text) or strip_all:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The original passes re.UNICODE (= 32) positionally, i.e. as ``count``.
    return _PERIOD_STRIP.sub("", out, count=32)


def _process_digit_article(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """Normalise an answer exactly like EvalAI / LLaVA's ``EvalAIAnswerProcessor``.

    Parameters
    ----------
    answer
        A predicted or human answer.

    Returns
    -------
    str
        The normalised answer.

    Examples
    --------
    >>> normalize_vqa_answer("Two")
    '2'
    >>> normalize_vqa_answer("a dog.")
    'dog'
    >>> normalize_vqa_answer("Isnt it")
    "isn't it"
    """
    text = _word_tokenize(answer)
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _process_punctuation(text)
    return _process_digit_article(text)


def vqa_accuracy(prediction: str, answers: Sequence[str], *, normalize: bool = True) -> float:
    """Official VQA accuracy of one prediction against the human answers.

    Parameters
    ----------
    prediction
        The model's answer.
    answers
        The human answers (10 for VQAv2 and TextVQA; any number >= 1 works).
    normalize
        Normalise prediction and answers with :func:`normalize_vqa_answer` first.

    Returns
    -------
    float
        ``mean over i of min(#{j != i : answers[j] == prediction} / 3, 1)``, in ``[0, 1]``.

    Examples
    --------
    Three of ten humans gave the answer: leaving out one of those three leaves 2 matches (2/3),
    leaving out any of the seven others leaves 3 (1), so the accuracy is (3 * 2/3 + 7) / 10:

    >>> round(vqa_accuracy("2", ["2"] * 3 + ["3"] * 7), 4)
    0.9
    >>> round(vqa_accuracy("2", ["2"] * 4 + ["3"] * 6), 4)
    1.0
    >>> round(vqa_accuracy("2", ["2"] + ["3"] * 9), 4)
    0.3

    With a single reference answer (not VQA's protocol) this is an exact match.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    if normalize:
        prediction = normalize_vqa_answer(prediction)
        answers = [normalize_vqa_answer(a) for a in answers]
    n = len(answers)
    matches = sum(1 for a in answers if a == prediction)
    if n == 1:
        return 1.0 if matches else 0.0
    total = 0.0
    for a in answers:
        others = matches - (1 if a == prediction else 0)
        total += min(1.0, others / 3.0)
    return total / n
