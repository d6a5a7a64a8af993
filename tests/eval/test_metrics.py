"""Metric functions against values computed by hand."""

import math

import pytest

from hycam_ds.engine.lm_loss import perplexity
from hycam_ds.eval.metrics import bleu4, rouge_l


def test_bleu4_hand_computed():
    assert bleu4(["the quick brown fox jumps"], ["the quick brown fox jumps"]) == pytest.approx(100.0)
    # one substitution at the end of 6 tokens: precisions 5/6, 4/5, 3/4, 2/3, brevity penalty 1
    expected = 100 * (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert bleu4(["a b c d e f"], ["a b c d e g"]) == pytest.approx(expected, rel=1e-6)
    # corpus level: counts are pooled before the geometric mean
    assert bleu4(["a b c d", "w x y z"], ["a b c d", "w x y q"]) == pytest.approx(
        100 * ((7 / 8) * (5 / 6) * (3 / 4) * (1 / 2)) ** 0.25, rel=1e-6
    )


def test_rouge_l_hand_computed():
    # LCS 3 of 3 hypothesis tokens and 6 reference tokens: P = 1, R = 0.5, F = 2/3
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(200 / 3, rel=1e-6)
    assert rouge_l(["a b", "x"], ["a b", "y"]) == pytest.approx(50.0)  # mean of 100 and 0
    assert math.isnan(rouge_l([], []))


def test_perplexity():
    assert perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    assert perplexity(1.0, 0) == math.inf
