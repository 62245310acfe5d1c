"""Answer metrics against hand-computed cases."""

import pytest

from qwen2vl_jax import metrics as M


@pytest.mark.parametrize("raw, norm", [
    ("Two dogs.", "2 dogs"),                 # number word -> digit, final period stripped
    ("The cat's toy", "cat 's toy"),         # article dropped, possessive split as EvalAI does
    ("dont", "don't"),                       # contraction table
    ("Yes!", "yes"),                         # '!' not beside a space -> becomes a space, then trimmed
    ("1,000", "1000"),                       # commas removed before anything else
    ("black-and-white", "black and white"),  # '-' inside a word splits it
    ("red - blue", "red blue"),              # a mark beside a space is deleted outright
    ("3.5", "3.5"),                          # a period before a digit stays
    ("  An\tapple\n", "apple"),
])
def test_vqa_normalisation(raw, norm):
    assert M.normalize_vqa(raw) == norm


def test_vqa_accuracy_leave_one_out():
    others = ["cat"] * 10
    # m of 10 humans said "dog": leaving out a "dog" answer leaves m-1 matches, any other leaves m;
    # accuracy = [m * min(1, (m-1)/3) + (10-m) * min(1, m/3)] / 10.
    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 10: 1.0}
    for m, acc in expected.items():
        refs = ["dog"] * m + others[m:]
        assert M.vqa_accuracy("Dog.", refs) == pytest.approx(acc), m
    assert M.vqa_accuracy("two", "2") == 1.0                      # one reference: normalised exact match
    assert M.vqa_accuracy("a red car", ["red car"]) == 1.0
    assert M.vqa_accuracy("blue", ["red"]) == 0.0


def test_levenshtein():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("", "abc") == 3
    assert M.levenshtein("flaw", "lawn") == 2


def test_anls_threshold():
    assert M.anls("hallo", "hello") == pytest.approx(0.8)             # 1 edit / 5 chars
    assert M.anls("abcde", "abxye") == pytest.approx(0.6)             # NL 0.4 < 0.5
    assert M.anls("abcd", "abxy") == 0.0                              # NL exactly 0.5: not below the threshold
    assert M.anls("abc", "xyz") == 0.0
    assert M.anls("  HELLO  World ", "hello world") == 1.0             # case and spaces do not count
    assert M.anls("hallo", ["xyzzy", "hello", "hallo!"]) == pytest.approx(1 - 1 / 6)   # best of the references
    assert M.anls("", "") == 1.0


def test_relaxed_accuracy():
    assert M.relaxed_accuracy("12.5", "12") == 1.0        # 0.5/12 = 4.2 % <= 5 %
    assert M.relaxed_accuracy("12.61", "12") == 0.0       # 5.08 %
    assert M.relaxed_accuracy("5%", "0.05") == 1.0        # percentages read as fractions
    assert M.relaxed_accuracy("Yes", "yes") == 1.0        # non-numbers: case-insensitive exact match
    assert M.relaxed_accuracy("0", "0") == 1.0            # a zero reference falls back to the string test
    assert M.relaxed_accuracy("0.0", "0") == 0.0
    assert M.relaxed_accuracy("13", ["20", "12.9"]) == 1.0


def test_exact_match():
    assert M.exact_match("Red.", "red") == 1.0
    assert M.exact_match("  red ", ["blue", "RED"]) == 1.0
    assert M.exact_match("red car", "red") == 0.0


def test_score_and_aggregate():
    scored = [M.score_all("2", "two"), M.score_all("three", "3")]
    assert [s["vqa_accuracy"] for s in scored] == [1.0, 1.0]
    assert [s["exact_match"] for s in scored] == [0.0, 0.0]
    agg = M.aggregate(scored)
    assert agg["count"] == 2 and agg["vqa_accuracy"] == 1.0 and agg["exact_match"] == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        M.score_all("a", "a", ["bleu"])
    with pytest.raises(ValueError, match="no reference"):
        M.exact_match("a", [])
