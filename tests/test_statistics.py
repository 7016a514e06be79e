"""The study's statistics against their definitions: interval coverage and test error rates by
simulation with a known truth, and a textbook power value."""

from __future__ import annotations

import math
import random

import pytest

from fishertune.errors import FishertuneError
from fishertune.experiments.statistics import (
    equivalence_test,
    paired_difference,
    scaling_slope,
    seeds_for_power,
)


def _normal(rng: random.Random, mean: float, sd: float, n: int) -> list[float]:
    return [rng.gauss(mean, sd) for _ in range(n)]


def test_paired_interval_covers_the_true_difference_at_its_level():
    """2,000 experiments of 5 seeds: the 95% interval holds the true mean difference in
    95% +- 1.5% of them (binomial sd 0.5%), paired out of a shared per-seed effect."""
    rng = random.Random(0)
    covered = 0
    for _ in range(2000):
        shared = _normal(rng, 0.0, 5.0, 5)  # seed effects both methods share: they cancel
        reference = [s + rng.gauss(0, 0.1) for s in shared]
        values = [s + 0.03 + rng.gauss(0, 0.1) for s in shared]
        result = paired_difference(values, reference)
        covered += result.low <= 0.03 <= result.high
    assert abs(covered / 2000 - 0.95) < 0.015
    assert result.high - result.low < 1.0  # the shared effect (sd 5) did not enter the interval


def test_paired_difference_matches_the_t_formula():
    diffs = [0.3, -0.1, 0.2, 0.5]
    result = paired_difference(diffs)
    mean, sd = 0.225, math.sqrt(sum((d - 0.225) ** 2 for d in diffs) / 3)
    half = 3.182446305284263 * sd / 2  # t_{0.975, 3}
    assert result.mean == pytest.approx(mean)
    assert (result.low, result.high) == pytest.approx((mean - half, mean + half))
    assert not result.detected


def test_equivalence_is_claimed_only_inside_the_margin():
    """TOST rejects non-equivalence at most alpha of the time when the truth sits on the margin,
    and claims equivalence most of the time when the truth is 0 and the seeds are enough."""
    rng = random.Random(1)
    on_margin = sum(
        equivalence_test(_normal(rng, 0.01, 0.01, 10), margin=0.01).equivalent for _ in range(2000)
    )
    assert on_margin / 2000 <= 0.05 + 0.015
    at_zero = sum(
        equivalence_test(_normal(rng, 0.0, 0.01, 20), margin=0.01).equivalent for _ in range(500)
    )
    assert at_zero / 500 > 0.9


def test_no_difference_found_is_not_equivalence():
    """Three noisy seeds: the paired test finds nothing, and TOST does not call it equivalent."""
    values = [0.02, -0.015, 0.01]
    assert not paired_difference(values).detected
    assert not equivalence_test(values, margin=0.01).equivalent


def test_scaling_slope_recovers_a_known_slope():
    rng = random.Random(2)
    x = [a for a in (0.01, 0.04, 0.25, 1.0) for _ in range(10)]
    y = [0.02 * xi + rng.gauss(0, 0.002) for xi in x]
    fit = scaling_slope(x, y)
    assert fit.low < 0.02 < fit.high
    assert fit.low > 0.015 and fit.p_value < 1e-6


def test_seeds_for_power_matches_the_textbook_value_and_a_simulation():
    """Standardized effect 0.5 needs 34 pairs for 80% power at alpha 0.05 (Cohen's tables;
    G*Power's one-sample t). A simulation at that n rejects in 80% +- 3% of experiments."""
    assert seeds_for_power(0.5, 1.0) == 34
    rng = random.Random(3)
    rejected = sum(paired_difference(_normal(rng, 0.5, 1.0, 34)).detected for _ in range(1500))
    assert abs(rejected / 1500 - 0.80) < 0.035


def test_bad_inputs_are_named():
    with pytest.raises(FishertuneError, match="one reference value per seed"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(FishertuneError, match="at least 2 seeds"):
        paired_difference([1.0])
    with pytest.raises(FishertuneError, match="margin"):
        equivalence_test([0.1, 0.2], margin=0.0)
    with pytest.raises(FishertuneError, match="non-finite"):
        paired_difference([0.1, float("nan")])
