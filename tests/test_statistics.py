"""The study's statistics against their definitions: interval coverage and test error rates by
simulation with a known truth, and a textbook power value."""

from __future__ import annotations

import math
import random

import pytest
from scipy import optimize, stats

from fishertune.errors import FishertuneError
from fishertune.statistics import (
    equivalence_test,
    fieller_ratio,
    holm,
    paired_difference,
    ratio_equivalence,
    scaled_prediction,
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


def _effects(rng: random.Random, ratio: float, n: int, *, effect: float = 0.013,
             sd: float = 0.003) -> tuple[list[float], list[float]]:  # fmt: skip
    """Per-seed effects against a shared baseline: ``y`` NEFTune's (true mean ``effect``), ``x``
    a regularizer's (true mean ``ratio * effect``); the baseline's seed noise enters both, so they
    are correlated, as in the study."""
    base = _normal(rng, 0.0, sd, n)
    y = [effect + rng.gauss(0, sd) - b for b in base]
    x = [ratio * effect + rng.gauss(0, sd) - b for b in base]
    return x, y


def test_fieller_interval_is_the_set_the_paired_t_test_does_not_reject():
    """Hand definition: the bounds are where the t statistic of ``x - R y`` equals the critical
    value; the point estimate is the ratio of means."""
    x = [0.004, 0.002, 0.005, 0.001, 0.003, 0.0045]
    y = [0.012, 0.015, 0.011, 0.014, 0.013, 0.016]
    result = fieller_ratio(x, y)
    assert result.kind == "bounded"
    assert result.ratio == pytest.approx(sum(x) / sum(y))
    critical = stats.t.ppf(0.975, len(x) - 1)

    def t_of(r: float) -> float:
        return stats.ttest_1samp([a - r * b for a, b in zip(x, y, strict=True)], 0.0).statistic

    low = optimize.brentq(lambda r: abs(t_of(r)) - critical, -5.0, result.ratio)
    high = optimize.brentq(lambda r: abs(t_of(r)) - critical, result.ratio, 5.0)
    assert (result.low, result.high) == pytest.approx((low, high), rel=1e-9)


def test_fieller_interval_covers_the_true_ratio_and_opens_without_a_denominator_effect():
    """1,000 experiments of 10 seeds at a true ratio of 0.2: coverage 95% +- 2%. When the
    denominator's true effect is 0, the interval is not bounded (nothing to take a ratio of)."""
    rng = random.Random(4)
    covered = 0
    for _ in range(1000):
        x, y = _effects(rng, 0.2, 10)
        covered += fieller_ratio(x, y).contains(0.2)
    assert abs(covered / 1000 - 0.95) < 0.02
    x, y = _effects(random.Random(5), 0.0, 10, effect=0.0)
    assert fieller_ratio(x, y).kind != "bounded"
    assert fieller_ratio(x, y).contains(1.0) and fieller_ratio(x, y).contains(-50.0)


def test_ratio_equivalence_holds_its_level_on_the_margin_and_finds_a_true_match():
    """True ratio on the margin (0.75 of [0.75, 1.25]): equivalence claimed in at most 5% +- 1.5%
    of experiments; true ratio 1 with 10 seeds and a clear effect: claimed almost always; a
    regularizer that reproduces 19% of the effect: never. Also with NEFTune's effect negative."""
    rng = random.Random(6)
    on_margin = sum(
        ratio_equivalence(*_effects(rng, 0.75, 10), lower=0.75, upper=1.25).equivalent
        for _ in range(2000)
    )
    assert on_margin / 2000 <= 0.05 + 0.015
    matched = [ratio_equivalence(*_effects(rng, 1.0, 10, sd=0.001), lower=0.75, upper=1.25)
               for _ in range(200)]  # fmt: skip
    assert sum(m.equivalent for m in matched) / 200 > 0.9
    for m in matched:  # the same decision as the 90% Fieller interval inside the margin
        inside = m.interval.kind == "bounded" and m.interval.low > 0.75 and m.interval.high < 1.25
        assert m.equivalent == inside
    weak = [ratio_equivalence(*_effects(rng, 0.19, 10), lower=0.75, upper=1.25)
            for _ in range(200)]  # fmt: skip
    assert not any(w.equivalent for w in weak)
    x, y = _effects(rng, 1.0, 10, effect=-0.013, sd=0.001)
    assert ratio_equivalence(x, y, lower=0.75, upper=1.25).equivalent
    x, y = _effects(rng, 0.19, 10, effect=-0.013, sd=0.001)
    assert not ratio_equivalence(x, y, lower=0.75, upper=1.25).equivalent


def test_scaled_prediction_accepts_the_true_law_and_rejects_a_flat_effect():
    """Effects exactly ``k a^2`` at a/rms 0.3 and 1 (plus seed noise): the interval of measured
    minus predicted covers 0 at its level; an effect that is absent at 0.3 (the old study's
    reading) is told apart, which a slope through both levels would not do."""
    rng = random.Random(7)
    factor = 0.3**2
    covered = 0
    for _ in range(1000):
        top = _normal(rng, 0.013, 0.003, 10)
        low = _normal(rng, 0.013 * factor, 0.001, 10)
        covered += (
            scaled_prediction(low, top, factor).low
            <= 0.0
            <= scaled_prediction(low, top, factor).high
        )
    assert abs(covered / 1000 - 0.95) < 0.02
    top = _normal(rng, 0.013, 0.001, 10)
    flat = _normal(rng, 0.0, 0.0005, 10)
    result = scaled_prediction(flat, top, factor)
    assert result.high < 0 and result.mean == pytest.approx(sum(flat) / 10 - factor * sum(top) / 10)


def test_holm_matches_the_hand_computation_and_holds_the_family_error():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # 2 x 0.5 capped at 1, then the running maximum
    rng = random.Random(8)
    raw = adjusted = 0
    for _ in range(4000):  # 15 true null hypotheses: uniform p-values
        p = [rng.random() for _ in range(15)]
        raw += min(p) < 0.05
        adjusted += min(holm(p)) < 0.05
    assert adjusted / 4000 <= 0.05 + 0.01
    assert raw / 4000 > 0.45  # uncorrected, "something differs" in 1 - 0.95^15 = 54%
