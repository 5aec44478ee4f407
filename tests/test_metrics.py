"""Metrics against hand-computed values (no call of the code under test to make the expectation)."""

import math

import pytest

from lavender.metrics import (
    anls,
    bleu4,
    cider_d,
    contains_match,
    exact_match,
    extract_choice,
    extract_yes_no,
    format_table,
    normalize_vqa_answer,
    relaxed_accuracy,
    score,
    vqa_accuracy,
)


@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),            # number word, final period
    ("The T-shirt", "t shirt"),         # article, hyphen inside a word -> space
    ("a dog", "dog"),
    ("an apple", "apple"),
    ("dont", "don't"),                  # contraction restored
    ("2,000", "2000"),                  # thousands comma
    ("3.5", "3.5"),                     # decimal point kept
    ("yes!", "yes"),
    ("red, white", "red white"),        # comma before a space is deleted
    ("  Ten\tcats\n", "10 cats"),
    ("none", "0"),
])
def test_vqa_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_soft_accuracy_hand_computed():
    answers = ["2"] * 3 + ["3"] * 7
    # 3 humans said "2": leaving one of them out leaves 2 matches (2/3), leaving another out 3 (1)
    assert vqa_accuracy("two", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    assert vqa_accuracy("4", answers) == 0.0
    two = ["cat"] * 2 + ["dog"] * 8
    assert vqa_accuracy("Cat.", two) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    one = ["cat"] + ["dog"] * 9
    assert vqa_accuracy("a cat", one) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa_accuracy("the dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("dog", ["dog"]) == 1.0  # one reference: exact normalised match
    with pytest.raises(ValueError):
        vqa_accuracy("dog", [])


def test_anls():
    assert anls("hello", ["hallo"]) == pytest.approx(0.8)           # 1 edit / 5 chars
    assert anls("HELLO ", ["hello"]) == 1.0                         # case and spaces
    assert anls("abcd", ["abxy"]) == 0.0                            # NL = 0.5 is not < 0.5
    assert anls("abcd", ["abcx"]) == pytest.approx(0.75)
    assert anls("abc", ["xyz", "abd"]) == pytest.approx(1 - 1 / 3)  # best reference
    assert anls("", ["abc"]) == 0.0


def test_relaxed_accuracy():
    assert relaxed_accuracy("10.4", ["10"]) == 1.0   # 4% off
    assert relaxed_accuracy("10.6", ["10"]) == 0.0   # 6% off
    assert relaxed_accuracy("45%", ["0.45"]) == 1.0
    assert relaxed_accuracy("Yes", ["yes"]) == 1.0
    assert relaxed_accuracy("0", ["0"]) == 1.0
    assert relaxed_accuracy("0.01", ["0"]) == 0.0
    assert relaxed_accuracy("19.", ["20"]) == 1.0    # 5% exactly, trailing period
    assert relaxed_accuracy("Paris", ["London"]) == 0.0


CHOICES = {"A": "cat", "B": "dog", "C": "hot dog", "D": "bird"}


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(B)", "B"), ("b", "B"), ("B.", "B"), ("The answer is B.", "B"), ("Answer: (C)", "C"),
    ("B. dog", "B"), ("D) bird", "D"), ("It is a bird.", "D"), ("A hot dog.", "C"),  # longest option text
    ("A dog runs", "B"), ("I think it is C", "C"), ("B or C", None), ("None of them", None), ("", None),
    ("E", None),  # not an option
])
def test_extract_choice(text, letter):
    assert extract_choice(text, CHOICES) == letter


def test_yes_no_exact_contains():
    assert extract_yes_no("Yes, there is.") == "yes"
    assert extract_yes_no("No.") == "no"
    assert extract_yes_no("There is no cat") == "no"
    assert extract_yes_no("I cannot tell") is None
    assert extract_yes_no("Nothing here, yesterday") is None  # whole words only
    assert exact_match("The Dog.", ["the dog"]) == 1.0
    assert exact_match("The Dog.", ["dog"]) == 0.0
    assert exact_match("1,000", ["1000"]) == 0.0 and exact_match("3.5", ["3.5"]) == 1.0
    assert contains_match("I see 2 dogs here.", ["2 dogs"]) == 1.0
    assert contains_match("I see 2 dogs here.", ["2 do"]) == 0.0


def test_bleu4_hand_computed():
    # precisions 5/6, 4/5, 3/4, 2/3, equal lengths -> no brevity penalty
    assert bleu4(["a cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(
        (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25, rel=1e-6)
    # all precisions 1, candidate 4 words vs reference 6 -> BP = exp(1 - 6/4)
    assert bleu4(["the cat sat on"], [["the cat sat on the mat"]]) == pytest.approx(math.exp(-0.5), rel=1e-6)
    # closest reference length is used (5, not 9): BP = exp(1 - 5/4); punctuation and case ignored
    assert bleu4(["The cat sat, on."], [["the cat sat on it", "x " * 9]]) == pytest.approx(
        math.exp(1 - 5 / 4), rel=1e-6)


def test_cider_d_hand_computed():
    # two images, each candidate equal to its single reference: idf = ln 2 for every n-gram,
    # cosine 1 for n = 1, 2 and 0 for n = 3, 4 (no such n-grams) -> (1 + 1 + 0 + 0) / 4 * 10 = 5
    corpus, each = cider_d(["a b", "c d"], [["a b"], ["c d"]])
    assert each == pytest.approx([5.0, 5.0]) and corpus == pytest.approx(5.0)
    # clipping and length penalty: "a b b" vs "a b" (all idf = ln 2 = L):
    # n=1: cand (a: L, b: 2L), ref (a: L, b: L): clipped dot 2L^2 / (L sqrt5 * L sqrt2) = 2 / sqrt10
    # n=2: cand (ab: L, bb: L), ref (ab: L): L^2 / (L sqrt2 * L) = 1 / sqrt2; n=3: no reference n-gram -> 0
    # length in bigrams 2 vs 1: penalty exp(-1 / (2 * 36))
    corpus, each = cider_d(["a b b", "c d"], [["a b"], ["c d"]])
    expected = (2 / math.sqrt(10) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
    assert each[0] == pytest.approx(expected) and corpus == pytest.approx((expected + 5.0) / 2)


def test_score_mixed_metrics_and_breakdown():
    recs = [
        {"id": "q1", "metric": "vqa", "type": "number", "answers": ["2"] * 10, "prediction": "Two"},
        {"id": "q2", "metric": "vqa", "type": "other", "answers": ["red"] * 10, "prediction": "blue"},
        {"id": "q3", "metric": "mc", "type": "other", "answers": ["B"], "choices": CHOICES, "prediction": "(B)"},
        {"id": "q4", "metric": "yesno", "answers": ["yes"], "prediction": "Yes."},
        {"id": "q5", "metric": "yesno", "answers": ["no"], "prediction": "Yes it is"},
        {"id": "q6", "metric": "anls", "answers": ["hallo"], "prediction": "hello"},
    ]
    out = score(recs)
    assert out["n"] == 6
    assert out["overall"]["vqa"] == {"vqa": 0.5, "n": 2}
    assert out["overall"]["mc"]["mc"] == 1.0
    yn = out["overall"]["yesno"]
    assert yn["yesno"] == 0.5 and yn["precision"] == 0.5 and yn["recall"] == 1.0 and yn["yes_ratio"] == 1.0
    assert out["overall"]["anls"]["anls"] == pytest.approx(0.8)
    assert out["by_type"]["number"]["vqa"]["vqa"] == 1.0
    assert out["by_type"]["other"]["vqa"]["vqa"] == 0.0 and out["by_type"]["other"]["mc"]["mc"] == 1.0
    assert [p["id"] for p in out["per_record"]] == ["q1", "q2", "q3", "q4", "q5", "q6"]
    assert out["per_record"][2]["extracted"] == "B"
    assert "overall" in format_table(out)
    # one metric for all records overrides the field
    assert score(recs[:2], metric="exact")["overall"]["exact"]["exact"] == 0.0


def test_score_captioning_and_errors():
    out = score([{"id": "1", "answers": ["a b"], "prediction": "a b"},
                 {"id": "2", "answers": ["c d"], "prediction": "c d"}], metric="cider")
    assert out["overall"]["cider"]["cider"] == pytest.approx(5.0)
    assert 0 < out["overall"]["cider"]["bleu4"] <= 1
    with pytest.raises(ValueError, match="metric"):
        score([{"id": "x", "answers": ["a"], "prediction": "a"}])
    with pytest.raises(ValueError, match="prediction"):
        score([{"id": "x", "answers": ["a"]}], metric="exact")
    with pytest.raises(ValueError, match="choices"):
        score([{"id": "x", "answers": ["A"], "prediction": "A"}], metric="mc")
