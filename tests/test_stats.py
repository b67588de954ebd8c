"""Intervals and paired comparisons: degenerate cases, a case checked against theory and
against a direct computation, exact McNemar values, determinism given the seed."""

import math

import numpy as np
import pytest

from langmerge.evaluate import stats


def test_all_correct_predictions_give_a_degenerate_interval():
    assert stats.interval([1.0] * 37) == (1.0, 1.0)
    assert stats.interval([0.0]) == (0.0, 0.0)


def test_the_interval_of_30_right_of_40_matches_the_bootstrap_computed_directly():
    values = np.array([1.0] * 30 + [0.0] * 10)
    rng = np.random.default_rng(0)
    means = values[rng.integers(0, 40, size=(2000, 40))].mean(axis=1)
    assert stats.interval(values) == tuple(np.quantile(means, [0.025, 0.975]))
    # and the normal approximation, 0.75 ± 1.96·sqrt(0.75·0.25/40), to within a point or two
    half = 1.96 * math.sqrt(0.75 * 0.25 / 40)
    low, high = stats.interval(values)
    assert low == pytest.approx(0.75 - half, abs=0.02) and high == pytest.approx(
        0.75 + half, abs=0.02
    )


def test_the_bootstrap_is_deterministic_given_its_seed():
    values = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0]
    assert stats.interval(values, seed=3) == stats.interval(values, seed=3)
    assert stats.compare(values, values[::-1], seed=3) == stats.compare(
        values, values[::-1], seed=3
    )


def test_mcnemar_exact_values():
    assert stats.mcnemar_exact(0, 6) == 2 / 64
    assert stats.mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert stats.mcnemar_exact(3, 3) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0


def test_a_paired_comparison_of_right_and_wrong_uses_mcnemar():
    a = [1] * 10 + [1, 0] * 5
    b = [0] * 10 + [1, 0] * 5  # a is right on 10 examples b gets wrong, never the reverse
    c = stats.compare(a, b)
    assert c.difference == 0.5 and c.test == "McNemar exact" and c.n == 20
    assert c.p == 2 / 1024 and c.significant(0.05)
    assert 0.25 <= c.low <= 0.5 <= c.high <= 0.75


def test_equal_models_are_not_significantly_different():
    scores = [0.2, 0.9, 0.4, 0.7]
    c = stats.compare(scores, scores)
    assert (c.difference, c.low, c.high, c.p) == (0.0, 0.0, 0.0, 1.0)
    assert c.test == "paired bootstrap" and not c.significant(0.05)


def test_mismatched_examples_are_refused():
    with pytest.raises(ValueError, match="same examples"):
        stats.compare([1, 0], [1, 0, 1])


def test_a_comparison_over_languages_resamples_within_each_language():
    better = {"en": [1.0] * 20, "de": [1.0] * 15}
    worse = {"en": [0.0] * 20, "de": [0.0] * 15}
    c = stats.compare_languages(better, worse)
    assert (c.difference, c.low, c.high, c.p, c.n) == (1.0, 1.0, 1.0, 0.0, 35)
    same = stats.compare_languages(better, better, "worst")
    assert same.difference == 0.0 and same.p == 1.0
    # the worst language decides with "worst": en equal, de 2 of 15 apart
    a = {"en": [1.0] * 20, "de": [1.0] * 10 + [0.0] * 5}
    b = {"en": [1.0] * 20, "de": [1.0] * 8 + [0.0] * 7}
    worst = stats.compare_languages(a, b, "worst")
    assert worst.difference == pytest.approx(2 / 15) and not worst.significant(0.05)
    assert stats.compare_languages(a, b, "worst") == worst  # seeded
