"""CIDEr-D against hand-computed values (and pycocoevalcap when it is importable)."""

import math
import random

import pytest

from casp.eval.cider import cider_d, ngram_counts, tokenize_caption
from casp.eval.errors import EvalError


def test_ngram_counts():
    c = ngram_counts("a b a b", n=2)
    assert c[("a",)] == 2 and c[("a", "b")] == 2 and c[("b", "a")] == 1 and len(c) == 4


def test_identical_pairs_score_ten():
    # Disjoint vocabularies across images: every n-gram has df = 1, so candidate == reference
    # gives cosine 1 for n = 1..4 and no length penalty: 10 * mean(1, 1, 1, 1) = 10.
    cands = ["a red circle on the left", "two blue squares near one tree", "green cat sleeps all day"]
    mean, scores = cider_d(cands, [[c] for c in cands])
    assert scores == pytest.approx([10.0, 10.0, 10.0])
    assert mean == pytest.approx(10.0)


def test_identical_short_sentences_have_no_trigrams():
    # Two-word sentences have no 3- or 4-grams: those orders contribute 0, so the score is 10 * 2/4.
    mean, scores = cider_d(["a b", "c d"], [["a b"], ["c d"]])
    assert scores == pytest.approx([5.0, 5.0])


def test_hand_computed_pair():
    # Image 1: candidate "a b", reference "a b c". Image 2: candidate "x", reference "a d".
    # df(a) = 2 -> idf 0; every other reference n-gram has df 1 -> idf log 2 =: L.
    # n=1: c = {a: 0, b: L}, r = {a: 0, b: L, c: L}: dot L^2, |c| = L, |r| = sqrt(2) L -> 1/sqrt 2.
    # n=2: c = {ab: L}, r = {ab: L, bc: L} -> 1/sqrt 2.   n=3, 4: the candidate is empty -> 0.
    # Length (bigrams) 1 vs 2 -> penalty exp(-1 / (2 * 36)).
    # score_1 = 10 * (2 / sqrt 2) / 4 * exp(-1/72); image 2 has no overlap -> 0.
    s1 = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    mean, scores = cider_d(["a b", "x"], [["a b c"], ["a d"]])
    assert scores == pytest.approx([s1, 0.0])
    assert mean == pytest.approx(s1 / 2)


def test_two_references_average():
    # Same setting with a second, disjoint reference for image 1: its similarity is 0 and the
    # sum over references is divided by 2 (and the extra n-grams do not change df of a, b).
    s1 = 10 * (2 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    _, scores = cider_d(["a b", "x"], [["a b c", "q r"], ["a d"]])
    assert scores[0] == pytest.approx(s1 / 2)


def test_zero_overlap_is_zero():
    mean, scores = cider_d(["x y z w", "p q"], [["a b c d"], ["e f g"]])
    assert scores == [0.0, 0.0] and mean == 0.0


def test_bad_input():
    with pytest.raises(EvalError, match="candidates"):
        cider_d(["a"], [["a"], ["b"]])
    with pytest.raises(EvalError, match="reference"):
        cider_d(["a", "b"], [["a"], []])
    with pytest.raises(EvalError, match="nothing"):
        cider_d([], [])


def test_tokenize_caption():
    assert tokenize_caption("A Red, circle.  On the LEFT!") == "a red circle on the left"


def test_matches_pycocoevalcap_when_installed():
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    rng = random.Random(0)
    words = "a red circle on the left of blue square green big small two three is there".split()

    def sent():
        return " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))

    cands = [sent() for _ in range(25)]
    refs = [[sent() for _ in range(rng.randint(1, 5))] for _ in range(25)]
    refs[3].append(cands[3])
    mean, scores = cider_d(cands, refs)
    ref_mean, ref_scores = cider_mod.Cider().compute_score(
        {i: refs[i] for i in range(25)}, {i: [cands[i]] for i in range(25)}
    )
    assert mean == pytest.approx(ref_mean, abs=1e-9)
    assert scores == pytest.approx(list(ref_scores), abs=1e-9)
