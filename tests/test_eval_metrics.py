"""VQA normalization, exact match, VQA accuracy and multiple-choice scoring: hand-computed cases."""

import pytest

from casp.eval.metrics import (
    answer_index,
    exact_match,
    mc_correct,
    normalize_answer,
    parse_choice,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes.", "yes"),
        ("  The RED Circle!  ", "red circle"),
        ("two", "2"),
        ("There are Three dogs", "there are 3 dogs"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("t-shirt", "t shirt"),
        ("don't", "dont"),
        ("an apple, a pear", "apple pear"),
        ("none", "0"),
        ("left\nside", "left side"),
        ("3:30", "3:30"),  # ":" and "%" are not in the VQA punctuation set
        ("50%", "50%"),
        ("a/b", "b"),  # "/" inside a word -> space, then the article "a" goes
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_any_answer():
    assert exact_match("Two", ["2"]) == 1.0
    assert exact_match("the cat", ["dog", "Cat."]) == 1.0
    assert exact_match("cats", ["cat"]) == 0.0


def test_vqa_accuracy_ten_answers_hand_computed():
    # The prediction was given by k of the 10 humans. Leaving out one of those k humans
    # (k subsets) leaves k-1 matches; leaving out another one (10-k subsets) leaves k.
    def expected(k):
        return (k * min((k - 1) / 3, 1) + (10 - k) * min(k / 3, 1)) / 10

    for k in range(0, 11):
        answers = ["red"] * k + ["blue"] * (10 - k)
        assert vqa_accuracy("Red", answers) == pytest.approx(expected(k))
    # Spot values: 1 human -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.
    answers = ["red", "blue", "blue", "blue", "blue", "blue", "blue", "blue", "blue", "blue"]
    assert vqa_accuracy("red", answers) == pytest.approx(0.3)
    assert vqa_accuracy("red", ["red"] * 3 + ["x"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("red", ["red"] * 4 + ["x"] * 6) == pytest.approx(1.0)


def test_vqa_accuracy_other_counts_is_exact_match():
    assert vqa_accuracy("2", ["two", "three"]) == 1.0
    assert vqa_accuracy("4", ["two", "three"]) == 0.0


def test_parse_choice_letters_and_text():
    options = ["cat", "dog", "red circle"]
    assert parse_choice("B", options) == 1
    assert parse_choice("(C)", options) == 2
    assert parse_choice("A. cat", options) == 0
    assert parse_choice("Answer: B", options) == 1
    assert parse_choice("b", options) == 1
    assert parse_choice("The Dog.", options) == 1
    assert parse_choice("it is a red circle", options) == 2
    assert parse_choice("A cat", ["dog", "cat"]) == 1  # option text wins over the article "A"
    assert parse_choice("D", options) is None  # only three options
    assert parse_choice("cat or dog", options) is None  # ambiguous
    assert parse_choice("", options) is None


def test_answer_index_and_mc_correct():
    options = ["cat", "dog"]
    assert answer_index(1, options) == 1
    assert answer_index("a", options) == 0
    assert answer_index("Dog", options) == 1
    assert answer_index(5, options) is None
    assert mc_correct("B", options, "dog") == 1.0
    assert mc_correct("dog", options, 1) == 1.0
    assert mc_correct("A", options, 1) == 0.0
    assert mc_correct("B", options, 7) == 0.0  # unresolvable gold never counts as correct
