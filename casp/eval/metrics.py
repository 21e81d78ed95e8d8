"""Answer normalization and scoring for VQA and multiple choice.

Normalization follows the standard VQA evaluation (Antol et al. 2015, the official ``vqaEval.py``):
lowercase; its punctuation set removed (commas inside numbers and periods not part of a decimal
dropped; other marks dropped at word edges and turned into a space inside a word, so ``t-shirt`` ->
``t shirt``; characters outside that set, such as ``:`` and ``%``, kept); number words
``zero``..``ten`` -> digits; articles ``a an the`` removed; whitespace collapsed. Predictions and
ground-truth answers go through the same function, so apostrophes are simply removed on both sides
(``don't`` and ``dont`` compare equal) instead of the official contraction table.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import combinations

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d)")  # "1,000" -> "1000"
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period survives only as a decimal point
# The punctuation the official VQA evaluation strips; others (":", "%", "$", "&", "#", ...) are kept,
# so "3:30" and "50%" stay answers of their own.
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_INNER_PUNCT = re.compile(rf"(?<=\w)[{re.escape(_PUNCT)}](?=\w)")  # between two word characters -> space
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def normalize_answer(text: str) -> str:
    """VQA-style normalization of one answer string (see the module docstring)."""
    s = text.lower().replace("\n", " ").replace("\t", " ").strip()
    s = _NUMBER_COMMA.sub("", s)
    s = s.replace("'", "")
    s = _INNER_PUNCT.sub(" ", s)
    s = s.translate(str.maketrans("", "", _PUNCT))
    s = _NON_DECIMAL_PERIOD.sub("", s)
    words = [_NUMBER_WORDS.get(w, w) for w in s.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized reference answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers.

    With the standard 10 human answers: acc = mean over the 10 subsets of 9 answers of
    min(#humans in the subset who gave the prediction / 3, 1). With any other number of answers
    (GQA, TextVQA-style single answers) it is plain exact match against any answer.
    """
    if len(answers) != 10:
        return exact_match(prediction, answers)
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    subsets = combinations(range(10), 9)
    return sum(min(sum(hits[i] for i in s) / 3.0, 1.0) for s in subsets) / 10.0


def option_letter(index: int) -> str:
    """0 -> "A", 1 -> "B", ..."""
    return _LETTERS[index]


def parse_choice(prediction: str, options: Sequence[str]) -> int | None:
    """Index of the option a free-form prediction picks, or None when it picks none.

    Accepted forms: a bare letter ("B", "(B)", "B.", "B) cat", "Answer: B"), or the option text
    itself (normalized equality first, then the only option whose normalized text occurs in the
    prediction as whole words).
    """
    text = prediction.strip()
    pred = normalize_answer(text)
    normalized = [normalize_answer(o) for o in options]
    # Option text first: "A cat" for options ["cat", "dog"] means "cat", not letter A.
    for i, opt in enumerate(normalized):
        if opt and pred == opt:
            return i
    letters = _LETTERS[: len(options)]
    m = re.match(rf"^\s*(?:answer\s*(?:is)?\s*[:\-]?\s*)?\(?([{letters}])\)?(?:[.:)\s]|$)", text, re.I)
    if m and (m.group(1).isupper() or len(text) <= 3):
        return letters.index(m.group(1).upper())
    contained = [i for i, opt in enumerate(normalized) if opt and re.search(rf"\b{re.escape(opt)}\b", pred)]
    return contained[0] if len(contained) == 1 else None


def answer_index(answer: int | str, options: Sequence[str]) -> int | None:
    """The gold option index from an int, a letter, or the option text (None if unresolvable)."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < len(options) else None
    a = answer.strip()
    if len(a) == 1 and a.upper() in _LETTERS[: len(options)]:
        return _LETTERS.index(a.upper())
    normalized = [normalize_answer(o) for o in options]
    target = normalize_answer(a)
    return normalized.index(target) if target in normalized else None


def mc_correct(prediction: str, options: Sequence[str], answer: int | str) -> float:
    """1.0 when the prediction picks the gold option (by letter or by text), else 0.0."""
    gold = answer_index(answer, options)
    return float(gold is not None and parse_choice(prediction, options) == gold)
